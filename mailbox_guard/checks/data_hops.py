"""data_hops: a message carrying more Received: headers than ``smtp.max_hops`` is in
a mail loop; refuse it at DATA (554 5.4.6) rather than pass it round again."""

from __future__ import annotations

from mailbox_guard import replies
from mailbox_guard.model import Action, Context, Mode, Phase, Result

NAME = "data_hops"


class HopCount:
    name = NAME
    phases = frozenset({Phase.DATA})
    timeout = None          # counts headers already parsed
    gate = True
    default_mode = Mode.ENFORCE
    fixed_mode = False
    description = 'More Received: headers than smtp.max_hops is a mail loop (554).'

    async def run(self, ctx: Context) -> list[Result]:
        headers = ctx.transaction.headers
        hops = len(headers.get_all("Received") or []) if headers is not None else 0
        limit = ctx.policy.settings["smtp.max_hops"]
        if hops > limit:
            return [Result(NAME, "MAIL_LOOP", Action.REJECT, reply=replies.S554_TOO_MANY_HOPS,
                           detail=f"{hops} Received: headers (limit {limit})")]
        return []
