"""rcpt_recipients: unknown local users of a guarded domain get 550, but only when a
recipient list exists for that domain (by default every user of it is accepted)."""

from __future__ import annotations

from mailbox_guard import replies
from mailbox_guard.model import Action, Context, Mode, Phase, Result

NAME = "rcpt_recipients"


class RecipientList:
    name = NAME
    phases = frozenset({Phase.RCPT})
    timeout = None          # computes from the policy snapshot only
    gate = True
    default_mode = Mode.ENFORCE
    fixed_mode = False
    description = 'Unknown users of a domain with a recipient list get 550.'

    async def run(self, ctx: Context) -> list[Result]:
        path = ctx.address
        domain = ctx.policy.guarded(path.domain_lc)
        if domain is None or not domain.has_recipient_list:
            return []
        if ctx.policy.knows_recipient(path.local, domain.name):
            return [Result(NAME, "RCPT_KNOWN_USER", Action.NONE)]
        return [Result(NAME, "RCPT_UNKNOWN_USER", Action.REJECT,
                       reply=replies.S550_USER_UNKNOWN.format(address=path.address[:256]),
                       detail=f"not in the recipient list of {domain.name}")]
