"""mail_sender_owner: anti-impersonation of the envelope. An authenticated user may
use as MAIL FROM only its own address and its aliases (per-domain switch, on by
default); anything else gets 553 5.7.1, recorded in the verdict trace."""

from __future__ import annotations

from mailbox_guard import replies
from mailbox_guard.model import Action, Context, Mode, Phase, Result

NAME = "mail_sender_owner"


def enforced(ctx: Context) -> bool:
    user = ctx.session.auth_user
    if not user:
        return False
    domain = ctx.policy.guarded(user.rpartition("@")[2])
    return domain is None or domain.anti_impersonation


class SenderOwner:
    name = NAME
    phases = frozenset({Phase.MAIL})
    timeout = None          # compares with the session's facts only
    gate = True
    default_mode = Mode.ENFORCE
    fixed_mode = False
    description = 'An authenticated user may use as MAIL FROM only its own addresses (553).'

    async def run(self, ctx: Context) -> list[Result]:
        if not enforced(ctx):
            return []
        sender = ctx.address.address.lower() if ctx.address is not None else ""
        if sender and sender in ctx.session.auth_addresses:
            return [Result(NAME, "SENDER_OWNED", Action.NONE, detail=ctx.session.auth_user)]
        return [Result(NAME, "SENDER_NOT_OWNED", Action.REJECT,
                       reply=replies.S553_SENDER_NOT_OWNED.format(user=ctx.session.auth_user),
                       detail=f"<{sender}> is not an address of {ctx.session.auth_user}")]
