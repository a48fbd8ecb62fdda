"""A missing or misspelled aiosmtpd hook must stop the engine at start-up: without
``handle_DATA`` aiosmtpd answers 250 and the message is gone."""

from __future__ import annotations

import pytest

from mailbox_guard.smtp.handler import REQUIRED_HOOKS, Handler, assert_hooks


def test_the_engine_handler_has_every_hook():
    assert_hooks(Handler())


@pytest.mark.parametrize("hook", REQUIRED_HOOKS)
def test_a_missing_hook_is_refused(hook):
    cls = type("Broken", (Handler,), {f"handle_{hook}": None})
    with pytest.raises(RuntimeError, match=hook):
        assert_hooks(cls())


def test_a_misspelled_hook_is_refused():
    cls = type("Typo", (Handler,), {"handle_DATAA": Handler.handle_DATA})
    with pytest.raises(RuntimeError, match="DATAA"):
        assert_hooks(cls())


def test_data_is_required_in_the_list():
    assert "DATA" in REQUIRED_HOOKS and "RCPT" in REQUIRED_HOOKS and "MAIL" in REQUIRED_HOOKS
