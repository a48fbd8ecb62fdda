"""The check runner: for one phase, the checks that serve it, in their order, each
given the results so far, each within its timeout.

It fails safe: a check that times out or crashes yields a TEMPFAIL result (Haraka's
DENYSOFT), never an accept and never a 5xx. It decides nothing: the results go to
:mod:`mailbox_guard.policy.decide`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable, Sequence

from mailbox_guard import replies
from mailbox_guard.model import Action, Check, Context, Mode, Phase, Result, check_attr

log = logging.getLogger("mailbox_guard.pipeline")


class Pipeline:
    def __init__(self, checks: Sequence[Check]) -> None:
        names = set()
        for check in checks:
            for attr in ("name", "phases", "timeout", "run"):
                if not hasattr(check, attr):
                    raise TypeError(f"check {check!r} lacks {attr!r}")
            if check.name in names:
                raise TypeError(f"two checks are named {check.name!r}")
            names.add(check.name)
        self.checks = tuple(checks)
        self._by_phase = {p: tuple(c for c in self.checks if p in c.phases) for p in Phase}
        self.defaults = {c.name: Mode(check_attr(c, "default_mode")) for c in self.checks}
        self.fixed = frozenset(c.name for c in self.checks if check_attr(c, "fixed_mode"))
        self.gates = frozenset(c.name for c in self.checks if check_attr(c, "gate"))

    def checks_for(self, phase: Phase) -> tuple[Check, ...]:
        return self._by_phase[phase]

    def mode(self, scope, name: str) -> Mode:
        """The mode of a check at a policy scope (fixed checks always enforce)."""
        if name in self.fixed or scope is None:
            return self.defaults.get(name, Mode.ENFORCE)
        return scope.mode(name, self.defaults.get(name, Mode.ENFORCE))

    def mode_of(self, scope) -> Callable[[str], Mode]:
        """:meth:`mode` at one scope, as a function of the check's name."""
        return functools.partial(self.mode, scope)

    async def run(self, ctx: Context, *, runs=None, stop=None) -> list[Result]:
        """Every result of the phase's checks. ``runs(name)`` says whether a check
        runs at all (its mode is not off where it matters); each check sees the
        results of the checks before it; after a result for which ``stop(result)``
        holds (an enforced gate refusal: first match), no further check runs."""
        out: list[Result] = []
        earlier = ctx.results
        for check in self._by_phase[ctx.phase]:
            if runs is not None and not runs(check.name):
                continue
            if out:
                ctx.results = earlier + tuple(out)
            try:
                if check.timeout is None:
                    got = await check.run(ctx)      # computes only: nothing to wait for
                else:
                    # asyncio.timeout, not wait_for: no extra task per check and phase.
                    async with asyncio.timeout(check.timeout):
                        got = await check.run(ctx)
            except TimeoutError:
                got = [Result(check.name, "CHECK_TIMEOUT", Action.TEMPFAIL,
                              reply=replies.S451_CHECK_UNAVAILABLE,
                              detail=f"no answer within {check.timeout}s")]
            except Exception as exc:   # fail safe: a crashing check defers, never accepts
                log.exception("check %s crashed", check.name)
                got = [Result(check.name, "CHECK_ERROR", Action.TEMPFAIL,
                              reply=replies.S451_CHECK_UNAVAILABLE,
                              detail=type(exc).__name__)]
            out.extend(got)
            if stop is not None and any(stop(r) for r in got):
                break
        ctx.results = earlier
        return out
