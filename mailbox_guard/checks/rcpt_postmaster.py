"""rcpt_postmaster: mail to postmaster@ a guarded domain must get through (RFC 5321
4.5.1): the recipient is exempt from refusals delayed from CONNECT, HELO and MAIL
and from scores. Relay control and the recipient list still apply; so does a forced
action (a virus)."""

from __future__ import annotations

from mailbox_guard.model import Action, Context, Mode, Phase, Result

NAME = "rcpt_postmaster"


class PostmasterExempt:
    name = NAME
    phases = frozenset({Phase.RCPT})
    timeout = None          # compares the address only
    gate = False
    default_mode = Mode.ENFORCE
    fixed_mode = False
    description = "postmaster@ a guarded domain is exempt from delayed refusals and scores."

    async def run(self, ctx: Context) -> list[Result]:
        path = ctx.address
        if path.local.lower() == "postmaster" and ctx.policy.guarded(path.domain_lc) is not None:
            return [Result(NAME, "RCPT_POSTMASTER", Action.ALLOW, detail=path.domain_lc)]
        return []
