"""Live events and counters of the running engine, for the control socket, the
dashboard and the metrics endpoint.

:class:`EventBus` fans events out to subscribers; a slow subscriber loses its oldest
events (and is told how many), it never slows the engine. :class:`Stats` keeps
per-minute outcome counts for the last hour, top senders and top rejecting checks,
and latency figures, all in memory.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any


class Subscription:
    def __init__(self, bus: "EventBus", topics: frozenset[str], maxsize: int) -> None:
        self.bus = bus
        self.topics = topics
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, event: dict) -> None:
        if self.queue.full():
            # Coalesce under pressure: drop the oldest, count it, keep the newest.
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> dict:
        event = await self.queue.get()
        if self.dropped:
            event = dict(event, dropped=self.dropped)
            self.dropped = 0
        return event

    def close(self) -> None:
        self.bus._subs.discard(self)


class EventBus:
    TOPICS = frozenset({"connection", "message", "delivery", "reject", "engine"})

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.seq = 0

    def subscribe(self, topics: set[str] | None = None, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, frozenset(topics or self.TOPICS), maxsize)
        self._subs.add(sub)
        return sub

    def publish(self, topic: str, **data: Any) -> None:
        if not self._subs:
            return
        self.seq += 1
        event = {"seq": self.seq, "at": time.time(), "topic": topic, **data}
        for sub in list(self._subs):
            if topic in sub.topics:
                sub.offer(event)

    @property
    def subscribers(self) -> int:
        return len(self._subs)


class Stats:
    """Counters since start plus a one-hour window of per-minute buckets."""

    OUTCOMES = ("accepted", "rejected", "deferred", "delivered", "bounced", "tempfailed")

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.started = clock()
        self.totals: collections.Counter[str] = collections.Counter()
        self.minutes: collections.OrderedDict[int, collections.Counter[str]] = collections.OrderedDict()
        self.senders: collections.Counter[str] = collections.Counter()
        self.rejecting_checks: collections.Counter[str] = collections.Counter()
        self.check_results: collections.Counter[tuple[str, str]] = collections.Counter()
        self.delivery_seconds: collections.deque[float] = collections.deque(maxlen=2000)
        self.commit_seconds: collections.deque[float] = collections.deque(maxlen=2000)
        self.delivery_attempts = 0

    def count(self, outcome: str, n: int = 1) -> None:
        self.totals[outcome] += n
        minute = int(self.clock() // 60)
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = collections.Counter()
            while len(self.minutes) > 60:
                self.minutes.popitem(last=False)
        bucket[outcome] += n

    def sender(self, address: str) -> None:
        domain = address.rpartition("@")[2].lower() or "<>"
        self.senders[domain] += 1
        if len(self.senders) > 10000:     # bounded: keep the heavy hitters
            self.senders = collections.Counter(dict(self.senders.most_common(1000)))

    def result(self, check: str, symbol: str, action: str) -> None:
        self.check_results[(check, symbol)] += 1
        if action in ("reject", "tempfail"):
            self.rejecting_checks[f"{check}:{symbol}"] += 1

    def per_minute(self, outcome: str, minutes: int = 30) -> list[int]:
        now = int(self.clock() // 60)
        return [self.minutes.get(m, {}).get(outcome, 0) for m in range(now - minutes + 1, now + 1)]

    def snapshot(self, minutes: int = 30) -> dict:
        return {
            "since": self.started,
            "totals": dict(self.totals),
            "per_minute": {o: self.per_minute(o, minutes) for o in self.OUTCOMES},
            "top_senders": self.senders.most_common(10),
            "top_rejecting_checks": self.rejecting_checks.most_common(10),
            "delivery_p50_ms": _percentile(self.delivery_seconds, 50),
            "commit_p50_ms": _percentile(self.commit_seconds, 50),
        }


def _percentile(values, p: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, len(ordered) * p // 100)] * 1000, 2)
