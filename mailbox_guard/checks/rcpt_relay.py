"""rcpt_relay: relay control, the first check of RCPT; nothing skips it.

A recipient is accepted when its domain is guarded, or when the client may relay
(a trusted network, later an authenticated user). Address forms that have been used
to sneak mail past relay control are refused for everyone: percent hack, bang paths,
source routes, quoted local parts hiding ``@ % !``, trailing dots and address literals.
"""

from __future__ import annotations

from mailbox_guard import replies
from mailbox_guard.text import printable
from mailbox_guard.model import Action, Context, Mode, Phase, Result

NAME = "rcpt_relay"


def _trick(path) -> tuple[str, str] | None:
    """The relay trick a path uses, as (symbol, detail), or None."""
    if path.route:
        return "RELAY_SOURCE_ROUTE", "source route @" + ",@".join(path.route)
    if path.quoted_local and any(c in path.local for c in "@%!"):
        return "RELAY_QUOTED_LOCAL", "quoted local part contains @, % or !"
    if "%" in path.local:
        return "RELAY_PERCENT_HACK", "% in local part"
    if "!" in path.local:
        return "RELAY_BANG_PATH", "! in local part"
    if path.trailing_dot:
        return "RELAY_TRAILING_DOT", "domain ends with a dot"
    if path.literal:
        return "RELAY_ADDRESS_LITERAL", "address literal as domain"
    if not path.domain:
        return "RELAY_NO_DOMAIN", "no domain"
    return None


class RelayControl:
    name = NAME
    phases = frozenset({Phase.RCPT})
    timeout = None          # computes from the policy snapshot only
    gate = True
    default_mode = Mode.ENFORCE
    fixed_mode = True
    description = 'Relay control: guarded domains, or a client that may relay; relay tricks refused. Always enforced.'

    async def run(self, ctx: Context) -> list[Result]:
        path = ctx.address
        trick = _trick(path)
        if trick is not None:
            symbol, detail = trick
            return [Result(NAME, symbol, Action.REJECT,
                           reply=replies.S553_RELAY_TRICK.format(address=_safe(path.raw)),
                           detail=detail)]
        domain = ctx.policy.guarded(path.domain_lc)
        if domain is not None:
            return [Result(NAME, "RELAY_GUARDED_DOMAIN", Action.ACCEPT, detail=domain.name)]
        if ctx.session.auth_user:
            return [Result(NAME, "RELAY_AUTHENTICATED", Action.ACCEPT, detail=ctx.session.auth_user)]
        if ctx.session.trusted_network:
            return [Result(NAME, "RELAY_TRUSTED_NETWORK", Action.ACCEPT, detail=ctx.session.peer_ip)]
        return [Result(NAME, "RELAY_DENIED", Action.REJECT,
                       reply=replies.S554_RELAY_DENIED.format(address=_safe(path.address)),
                       detail=f"{path.domain_lc} is not guarded and the client may not relay")]


def _safe(text: str) -> str:
    """Echo an address back without anything that could break the reply line."""
    return printable(text.strip("<>"), 256, spaces=False)
