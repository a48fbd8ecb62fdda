"""An internal error answers 451 4.3.0 with no exception text (never 500, never a
traceback to the client), and the session and the engine go on. The engine runs
in-process here so a fault can be injected into it."""

from __future__ import annotations

import asyncio
import smtplib
import threading

import pytest

from mailbox_guard import replies
from mailbox_guard.engine import Engine, ListenerSpec


class InProcess:
    def __init__(self, home) -> None:
        self.engine = Engine(home, listeners=[ListenerSpec("inbound", "inbound", "127.0.0.1", 0)])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "InProcess":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.engine.start(), self.loop).result(30)
        self.port = self.engine.bound[0]["port"]
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.engine.shutdown(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def live(tmp_path):
    from mailbox_guard.store.db import PolicyStore, ensure_home
    store = PolicyStore(ensure_home(tmp_path / "home"))
    store.add_domain("example.test", "127.0.0.1:9")
    store.set_setting("smtp.error_sleep", "0")
    store.set_setting("engine.drain_timeout", "2s")
    with InProcess(tmp_path / "home") as ip:
        yield ip


def test_crash_in_a_phase_answers_451_without_details(live):
    real_run = live.engine.pipeline.run

    async def boom(ctx, **kw):
        if ctx.phase.value == "rcpt":
            raise ValueError("SECRET-INTERNAL-DETAIL")
        return await real_run(ctx, **kw)

    live.engine.pipeline.run = boom
    with smtplib.SMTP("127.0.0.1", live.port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("a@sender.test")[0] == 250
        code, text = s.rcpt("b@example.test")
        assert (code, text.decode()) == (451, replies.S451_INTERNAL[4:])
        assert b"SECRET" not in text and b"ValueError" not in text
        # The session is still usable afterwards.
        assert s.noop()[0] == 250
    live.engine.pipeline.run = real_run
    with smtplib.SMTP("127.0.0.1", live.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        assert s.rcpt("b@example.test")[0] == 250


def test_storage_crash_at_commit_answers_451(live):
    async def broken(msgs):
        raise OSError(28, "No space left on device")

    live.engine.session_deps.commit = broken
    with smtplib.SMTP("127.0.0.1", live.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("b@example.test")
        code, text = s.data(b"Subject: x\r\n\r\nbody\r\n")
        assert code == 451 and text.decode() == replies.S451_STORAGE[4:]
