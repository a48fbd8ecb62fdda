"""connect_network: puts into the verdict trace whether the client is in a trusted
network (the adapter sets that fact from the policy snapshot at connect; relay control
of RCPT uses it, later access rules and flow control build on it)."""

from __future__ import annotations

from mailbox_guard.model import Action, Context, Mode, Phase, Result

NAME = "connect_network"


class TrustedNetwork:
    name = NAME
    phases = frozenset({Phase.CONNECT})
    timeout = None          # computes from the session facts only
    gate = False
    default_mode = Mode.ENFORCE
    fixed_mode = False
    description = 'Notes whether the client is in a trusted network (relay control uses it).'

    async def run(self, ctx: Context) -> list[Result]:
        if ctx.session.trusted_network:
            return [Result(NAME, "CLIENT_TRUSTED_NETWORK", Action.NONE, detail=ctx.session.peer_ip)]
        return [Result(NAME, "CLIENT_UNTRUSTED", Action.NONE, detail=ctx.session.peer_ip)]
