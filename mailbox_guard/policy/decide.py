"""Decisions: gates first, then scores, then one action per recipient.

Pure functions over results, a policy scope and the check modes; no I/O.

* **Gates** decide first-match, in check order, like a Postfix restriction list:
  the first enforced REJECT or TEMPFAIL result wins (relay control is the first
  check of RCPT, and nothing skips it).
* **Scores** of the enforced results are added up over every phase; the sum maps
  through the recipient's thresholds to one action: the first one the score reaches
  of ``actions.reject``, ``actions.quarantine``, ``actions.tag``, ``actions.tempfail``
  (rspamd's reject, add_header and greylist: with the defaults a score of 4 to 6 is
  greylisted when ``actions.tempfail`` is 4, and from 6 it is tagged instead).
* A result may ask for an action itself (TAG, QUARANTINE, DISCARD, TEMPFAIL,
  REJECT); the most severe of those and the score's action wins.
* A **forced** result (a virus found: quarantine or reject) overrides the score:
  its action is the outcome whatever the sum reaches (the most severe of several
  forced ones). An **exempt** recipient (an ALLOW result: postmaster@, later a
  whitelist) skips scores and delayed refusals, but never a forced result.
* **Modes**: an enforced check acts; a check in warn mode is traced as "would ..."
  and does not act; a check that is off does not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from mailbox_guard import replies
from mailbox_guard.model import REFUSALS, SEVERITY, Action, HeaderRemoval, Mode, Result

ModeOf = Callable[[str], Mode]

# In the order they are tried: the first threshold the score reaches gives the action.
THRESHOLDS = (("actions.reject", Action.REJECT), ("actions.quarantine", Action.QUARANTINE),
              ("actions.tag", Action.TAG), ("actions.tempfail", Action.TEMPFAIL))
ASKED = frozenset({Action.TAG, Action.QUARANTINE, Action.DISCARD, Action.TEMPFAIL, Action.REJECT})
SPAM_HEADERS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Symbols")


def refusal(results: Iterable[Result], mode_of: ModeOf) -> Result | None:
    """The first enforced refusal (first match), or None."""
    for r in results:
        if r.action in REFUSALS and mode_of(r.check) is Mode.ENFORCE:
            return r
    return None


def exempt(results: Iterable[Result], mode_of: ModeOf) -> Result | None:
    for r in results:
        if r.action is Action.ALLOW and mode_of(r.check) is Mode.ENFORCE:
            return r
    return None


def reply_for(result: Result) -> str:
    if result.reply:
        return result.reply
    return replies.S550_REJECTED if result.action is Action.REJECT else replies.S451_CHECK_UNAVAILABLE


def score_of(results: Iterable[Result], mode_of: ModeOf) -> float:
    return sum(r.score for r in results if r.score and mode_of(r.check) is Mode.ENFORCE)


def by_score(score: float, scope) -> Action | None:
    """The first action (reject, quarantine, tag, tempfail) whose threshold the score reaches."""
    for key, action in THRESHOLDS:
        limit = scope[key]
        if limit is not None and score >= limit:
            return action
    return None


def thresholds_text(scope) -> str:
    """The scope's thresholds in words ("reject 15, quarantine off, ...")."""
    parts = []
    for key, action in THRESHOLDS:
        value = scope[key]
        parts.append(f"{action.value} {'off' if value is None else f'{value:g}'}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Outcome:
    """What becomes of a message for one recipient."""
    recipient: str
    action: Action                    # ACCEPT (deliver), TAG, QUARANTINE, DISCARD, TEMPFAIL, REJECT
    score: float
    reply: str | None                 # for REJECT and TEMPFAIL
    deciding: Result | None           # the result that asked for the action (None: the score)
    reason: str
    scope_label: str
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[HeaderRemoval, ...] = ()
    subject_prefix: str = ""

    @property
    def delivered(self) -> bool:
        return self.action in (Action.ACCEPT, Action.TAG)


def outcome(recipient: str, results: Sequence[Result], scope, mode_of: ModeOf, *,
            is_exempt: bool = False) -> Outcome:
    """The one action for ``recipient`` from every result that concerns it."""
    score = 0.0
    asked: Result | None = None
    adds: list[tuple[str, str]] = []
    removes: list[HeaderRemoval] = []
    symbols: list[str] = []
    forced: Result | None = None
    for r in results:
        mode = mode_of(r.check)
        if mode is Mode.OFF:
            continue
        if mode is Mode.ENFORCE:
            adds.extend(r.add_headers)
            removes.extend(r.remove_headers)
        if mode is not Mode.ENFORCE or (is_exempt and not r.forced):
            continue
        if r.score:
            score += r.score
            symbols.append(f"{r.symbol}({r.score:.2f})")
        if r.action in ASKED and (asked is None or SEVERITY[r.action] > SEVERITY[asked.action]):
            asked = r
        if r.forced and r.action in ASKED and (forced is None or SEVERITY[r.action] > SEVERITY[forced.action]):
            forced = r
    action, deciding = Action.ACCEPT, None
    reason = "exempt" if is_exempt else f"score {score:g} ({_thresholds_text(scope)})"
    if forced is not None:                  # overrides the score, whatever it reaches
        asked = forced
    elif not is_exempt:
        scored = by_score(score, scope)
        if scored is not None:
            action = scored
    if asked is not None and (asked is forced or SEVERITY[asked.action] >= SEVERITY[action]):
        action, deciding = asked.action, asked
        reason = f"{asked.check}: {asked.symbol}" + (f" ({asked.detail})" if asked.detail else "")
        if asked is forced:
            reason += f"; forced, score {score:g} not applied"
    reply = None
    prefix = ""
    if action is Action.REJECT:
        reply = deciding.reply if deciding and deciding.reply else replies.S550_SPAM
    elif action is Action.TEMPFAIL:
        reply = deciding.reply if deciding and deciding.reply else replies.S451_TRY_LATER
    elif action is Action.TAG:
        removes.extend(HeaderRemoval(name) for name in SPAM_HEADERS)
        adds.extend((("X-Spam-Flag", "YES"), ("X-Spam-Score", f"{score:.2f}"),
                     ("X-Spam-Symbols", ", ".join(symbols[:50]) or "none")))
        prefix = scope["actions.subject_prefix"]
    return Outcome(recipient, action, score, reply, deciding, reason, scope.label,
                   tuple(adds), tuple(removes), prefix)


def _thresholds_text(scope) -> str:
    """:func:`thresholds_text`, once per scope (per recipient level and snapshot)."""
    memo = scope.memo
    text = memo.get("thresholds_text")
    if text is None:
        text = memo["thresholds_text"] = thresholds_text(scope)
    return text


def rcpt_score_refusal(results: Sequence[Result], scope, mode_of: ModeOf) -> float | None:
    """The score when it already reaches the recipient's reject threshold before
    DATA (no need to read the message), else None."""
    limit = scope["actions.reject"]
    if limit is None:
        return None
    score = score_of(results, mode_of)
    return score if score >= limit else None


def combine(outcomes: Sequence[Outcome]) -> tuple[str, Outcome | None]:
    """The one SMTP reply after DATA for the recipients' outcomes (documented in the
    README): any tempfail -> that 451 and nothing is queued (the sender retries all);
    every recipient a reject -> the first one's 5xx and nothing is queued; otherwise
    250, and a recipient whose outcome was a reject is quarantined (never bounced,
    never silently lost). Returns ("accept" | "tempfail" | "reject", the outcome whose
    reply is sent)."""
    for o in outcomes:
        if o.action is Action.TEMPFAIL:
            return "tempfail", o
    if outcomes and all(o.action is Action.REJECT for o in outcomes):
        return "reject", outcomes[0]
    return "accept", None
