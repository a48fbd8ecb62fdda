"""Checks: one module per check, named by phase (``rcpt_relay``, ...).

A check is ``async run(ctx) -> list[Result]`` with a name, the phases it serves, a
timeout, whether it is a gate, its default mode and a description (see
:class:`mailbox_guard.model.Check`). It returns facts; it never writes SMTP replies
or the database. :func:`default_checks` is their order, which is policy: within a
phase they run top to bottom, and relay control is the first check of RCPT.
"""

from __future__ import annotations


def default_checks() -> list:
    from mailbox_guard.checks.connect_network import TrustedNetwork
    from mailbox_guard.checks.data_auth_results import ForgedAuthResults
    from mailbox_guard.checks.data_hops import HopCount
    from mailbox_guard.checks.data_sender_headers import SenderHeaders
    from mailbox_guard.checks.mail_sender_owner import SenderOwner
    from mailbox_guard.checks.rcpt_postmaster import PostmasterExempt
    from mailbox_guard.checks.rcpt_recipients import RecipientList
    from mailbox_guard.checks.rcpt_relay import RelayControl
    return [TrustedNetwork(), SenderOwner(), RelayControl(), RecipientList(), PostmasterExempt(),
            HopCount(), SenderHeaders(), ForgedAuthResults()]
