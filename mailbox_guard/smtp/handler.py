"""aiosmtpd's hooks: each translates one command to the protocol-free session
(:mod:`mailbox_guard.session.session`) and its answer back to a reply.

A missing hook would make aiosmtpd answer with its defaults (a missing
``handle_DATA`` answers 250 and drops the mail), so :func:`assert_hooks` runs at
start-up and in the tests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mailbox_guard import replies
from mailbox_guard.store.db import LEGACY_MECHANISMS
from mailbox_guard.smtp.sasl import AUTH_ORDER

log = logging.getLogger("mailbox_guard.smtp")

# The hooks aiosmtpd must find on our handler; without any one of them it would
# silently apply its own default (for DATA: "250 OK" and the message is gone).
REQUIRED_HOOKS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "VRFY", "NOOP", "QUIT")


def assert_hooks(handler: Any) -> None:
    """Fail loudly at start-up if a hook is missing or misspelled."""
    missing = [h for h in REQUIRED_HOOKS if not callable(getattr(handler, f"handle_{h}", None))]
    if missing or not callable(getattr(handler, "handle_exception", None)):
        raise RuntimeError(f"SMTP handler lacks hooks: {', '.join(missing) or 'exception'}")
    stray = [m for m in dir(handler) if m.startswith("handle_")
             and m[7:] not in REQUIRED_HOOKS and m[7:] not in ("exception", "STARTTLS", "AUTH")]
    if stray:
        raise RuntimeError(f"SMTP handler has unknown hooks (misspelled?): {', '.join(stray)}")


class Handler:
    """The hooks of one listener's sessions (``server`` is the GuardSMTP)."""

    async def handle_HELO(self, server, session, envelope, hostname: str) -> str:
        reply = await self._helo(server, session, hostname, esmtp=False)
        return reply or f"250 {server.hostname}"

    async def handle_EHLO(self, server, session, envelope, hostname: str, responses: list[str]) -> list[str]:
        reply = await self._helo(server, session, hostname, esmtp=True)
        if reply:
            return [reply]
        # AUTH in the documented order, legacy mechanisms only where a domain enabled
        # them; no AUTH line at all without mechanisms (the inbound listener).
        listener = server.listener
        gss = listener.gssapi()
        legacy = listener.policy().legacy_mechanisms
        offered = [m for m in AUTH_ORDER if m in server._auth_methods
                   and (m not in LEGACY_MECHANISMS or m in legacy)
                   and (m != "GSSAPI" or (gss is not None and gss.available))]
        out = [r for r in responses if r[4:] != "HELP" and not r[4:].startswith("AUTH")]
        if any(r[4:].startswith("AUTH") for r in responses) and offered:
            out.append("250-AUTH " + " ".join(offered))
        out.insert(1, "250-PIPELINING")
        out[-1] = "250 " + out[-1][4:]
        return out

    async def _helo(self, server, session, hostname: str, *, esmtp: bool) -> str | None:
        if server.connect_task is not None:
            await server.connect_task
        reply = await server.guard.helo(hostname, esmtp)
        if reply is None:
            session.host_name = hostname
        return reply

    async def handle_MAIL(self, server, session, envelope, address: str, mail_options: list[str]) -> str:
        path = server.last_path
        if path is None:
            return replies.S501_BAD_ADDRESS
        reply = await server.guard.mail(path, mail_options)
        if reply is not None:
            return reply
        envelope.mail_from = path.address or "<>"
        envelope.mail_options.extend(mail_options)
        return replies.S250_SENDER_OK

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options: list[str]) -> str:
        path = server.last_path
        if path is None:
            return replies.S501_BAD_ADDRESS
        if server.connect_task is not None:
            await server.connect_task     # delayed findings of CONNECT are answered here
        reply, queued_as = await server.guard.rcpt(path, rcpt_options)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(queued_as)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.S250_RECIPIENT_OK

    async def handle_DATA(self, server, session, envelope) -> str:
        result = await server.guard.data(envelope.original_content, wire_ready=getattr(envelope, "wire_ready", False))
        return result.reply

    async def handle_RSET(self, server, session, envelope) -> str:
        return replies.S250_OK

    async def handle_NOOP(self, server, session, envelope, arg) -> str:
        return replies.S250_OK

    async def handle_QUIT(self, server, session, envelope) -> str:
        return replies.S221_BYE

    async def handle_VRFY(self, server, session, envelope, address) -> str:
        # No user enumeration: the same answer whatever the address.
        return replies.S252_CANNOT_VRFY

    async def handle_exception(self, error: Exception) -> str:
        log.error("internal error in SMTP session: %s: %s", type(error).__name__, error,
                  exc_info=not isinstance(error, (OSError, asyncio.TimeoutError)))
        return replies.S451_INTERNAL
