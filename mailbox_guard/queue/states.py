"""The states of a queued message, stated once: their names, the groups they fall
into, where each admin action applies, and the words an operator reads.

``incoming`` (just committed) -> ``active`` (leased by a delivery worker) ->
``delivered`` | ``deferred`` (due again later) | ``bounced``. ``hold`` parks a message
until an admin releases it; ``quarantine`` keeps what the policy decided not to
deliver, with its reason, until an admin releases (delivers) or deletes it. The
queue functions (:mod:`mailbox_guard.queue.ops`), the CLI and the dashboard take
their lists from here; schema.sql's CHECK constraint names the same seven.
"""

from __future__ import annotations

from dataclasses import dataclass

INCOMING = "incoming"
ACTIVE = "active"
DEFERRED = "deferred"
HOLD = "hold"
QUARANTINE = "quarantine"
DELIVERED = "delivered"
BOUNCED = "bounced"

# Every state, in the order a message goes through them (for listings and counts).
ALL: tuple[str, ...] = (INCOMING, ACTIVE, DEFERRED, HOLD, QUARANTINE, DELIVERED, BOUNCED)

# Due for delivery once next_attempt has come: the only states a worker leases.
# Hold and quarantine are never here: only an admin's release moves them on.
DUE: tuple[str, ...] = (INCOMING, DEFERRED)
# Parked until an admin acts.
PARKED: tuple[str, ...] = (HOLD, QUARANTINE)
# Still in the queue, body kept: not finished.
WAITING: tuple[str, ...] = (INCOMING, ACTIVE, DEFERRED, HOLD, QUARANTINE)
# Finished: the body is gone, the record and its verdict trace stay for queue.keep_done.
DONE: tuple[str, ...] = (DELIVERED, BOUNCED)

# What an operator reads for each state ("queued", "in quarantine", ...).
WORDS: dict[str, str] = {
    INCOMING: "queued",
    ACTIVE: "being delivered",
    DEFERRED: "waiting for another delivery attempt",
    HOLD: "on hold",
    QUARANTINE: "in quarantine",
    DELIVERED: "delivered",
    BOUNCED: "returned to the sender",
}


@dataclass(frozen=True)
class Applies:
    """Where an admin action applies: ``states`` for a message named by id, ``bulk``
    for what ``--all`` takes when no state is given (a subset of ``states``: a bulk
    release takes held mail only, quarantined mail must be asked for by name or with
    ``--state quarantine``), ``what`` the words for the refusal."""
    states: tuple[str, ...]
    bulk: tuple[str, ...]
    what: str


ACTIONS: dict[str, Applies] = {
    "retry": Applies(DUE, DUE, "only queued or deferred mail can be retried"),
    "hold": Applies(DUE, DUE, "only queued or deferred mail can be held"),
    "release": Applies(PARKED, (HOLD,), "only held or quarantined mail can be released"),
    # Any message but one in delivery right now: finished records too (queue purge).
    "delete": Applies((INCOMING, DEFERRED, HOLD, QUARANTINE, DELIVERED, BOUNCED),
                      (INCOMING, DEFERRED, HOLD, QUARANTINE),
                      "it cannot be deleted until this attempt ends (hold it, or try again)"),
}
# The states `--all --state S` may name for each action (never active, never done).
BULK_STATES: dict[str, tuple[str, ...]] = {
    action: tuple(s for s in a.states if s in WAITING and s != ACTIVE) for action, a in ACTIONS.items()}


def sql_list(states: tuple[str, ...] | list[str]) -> str:
    """``'incoming', 'deferred'`` for ``IN (...)``: the states are our own constants,
    never user input (user input goes in as parameters)."""
    assert all(s in ALL for s in states), states
    return ", ".join(f"'{s}'" for s in states)
