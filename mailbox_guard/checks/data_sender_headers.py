"""data_sender_headers: anti-impersonation of the headers. For an authenticated user,
every address in From: and Sender: must be its own or an alias (same per-domain
switch as mail_sender_owner)."""

from __future__ import annotations

from email.utils import getaddresses

from .. import replies
from ..pipeline import Action, Context, Phase, Result
from .mail_sender_owner import enforced

NAME = "data_sender_headers"


class SenderHeaders:
    name = NAME
    phases = frozenset({Phase.DATA})
    timeout = None          # reads headers already parsed

    async def run(self, ctx: Context) -> list[Result]:
        if not enforced(ctx):
            return []
        headers = ctx.transaction.headers
        values = [str(v) for field in ("From", "Sender") for v in (headers.get_all(field) or [])]
        addresses = [addr.lower() for _, addr in getaddresses(values)]
        foreign = [a for a in addresses if a not in ctx.session.auth_addresses]
        if not addresses:
            return [Result(NAME, "FROM_MISSING", Action.REJECT,
                           reply=replies.S553_HEADER_NOT_OWNED.format(user=ctx.session.auth_user),
                           detail="no From: address")]
        if foreign:
            return [Result(NAME, "HEADER_SENDER_NOT_OWNED", Action.REJECT,
                           reply=replies.S553_HEADER_NOT_OWNED.format(user=ctx.session.auth_user),
                           detail=f"{', '.join(foreign[:5])} not an address of {ctx.session.auth_user}")]
        return [Result(NAME, "HEADER_SENDER_OWNED", Action.NONE)]
