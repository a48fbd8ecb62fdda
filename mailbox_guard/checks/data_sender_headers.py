"""data_sender_headers: anti-impersonation of the headers. For an authenticated user,
every address in From: and Sender: must be its own or an alias (same per-domain
switch as mail_sender_owner).

The header section is read here as received, not through the lenient email parser:
that parser skips ``From : x`` (obsolete syntax, still honoured by mail readers) and
stops at ``From<TAB>: x``, so a forged sender could hide from the check. A section
this check cannot read completely (malformed lines, no end, over the size cap) is
refused while anti-impersonation applies.
"""

from __future__ import annotations

from email.utils import getaddresses

from mailbox_guard import replies
from mailbox_guard.model import Action, Context, Mode, Phase, Result
from mailbox_guard.checks.mail_sender_owner import enforced

NAME = "data_sender_headers"
_WATCHED = ("from", "sender")


def sender_fields(raw: bytes) -> tuple[list[str], str | None]:
    """(values of From:/Sender:, problem) from a raw header section."""
    text = raw.decode("utf-8", "surrogateescape")
    fields: list[list[str]] = []
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in " \t":
            if not fields:
                return [], "header section starts with a continuation line"
            fields[-1][1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not name or any(c.isspace() or not c.isprintable() for c in name):
            return [], f"malformed header line {line[:40]!r}"
        fields.append([name.lower(), value.strip()])
    return [v for n, v in fields if n in _WATCHED], None


class SenderHeaders:
    name = NAME
    phases = frozenset({Phase.DATA})
    timeout = None          # reads the header section already received
    gate = True
    default_mode = Mode.ENFORCE
    fixed_mode = False
    description = "From:/Sender: of an authenticated user's message must be its own (553)."

    async def run(self, ctx: Context) -> list[Result]:
        if not enforced(ctx):
            return []
        tx = ctx.transaction
        user = ctx.session.auth_user
        values, problem = sender_fields(tx.raw_headers)
        if problem is None and not tx.headers_complete:
            problem = "header section without an end, or too large to check"
        if problem is not None:
            return [Result(NAME, "HEADERS_UNCHECKABLE", Action.REJECT,
                           reply=replies.S553_HEADER_NOT_OWNED.format(user=user), detail=problem)]
        addresses = [addr.lower() for _, addr in getaddresses(values)]
        if not addresses:
            return [Result(NAME, "FROM_MISSING", Action.REJECT,
                           reply=replies.S553_HEADER_NOT_OWNED.format(user=user), detail="no From: address")]
        foreign = [a or "(empty)" for a in addresses if a not in ctx.session.auth_addresses]
        if foreign:
            return [Result(NAME, "HEADER_SENDER_NOT_OWNED", Action.REJECT,
                           reply=replies.S553_HEADER_NOT_OWNED.format(user=user),
                           detail=f"{', '.join(foreign[:5])} not an address of {user}")]
        return [Result(NAME, "HEADER_SENDER_OWNED", Action.NONE)]
