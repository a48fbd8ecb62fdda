"""The live feed: the one worker that follows the engine.

While the engine answers, it keeps an event subscription open and polls ``status``,
``connections``, ``stats`` and ``auth.bans`` every second (and soon after any
connection, message or delivery event, so a new connection shows at once), and posts
the result as a coalescing :class:`~tui.messages.FeedUpdate`. When the engine does not
answer it reads the queue counts and the bans in force from the store, says why, and
tries again every few seconds or when asked (``retry_now``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from textual.message_pump import MessagePump

from .messages import FeedUpdate
from .source import ControlCallError, EngineNotRunning, Source, StoreUnavailable

# Events that change what the lists show: poll right away rather than at the tick.
PROMPT_TOPICS = frozenset({"connection", "message", "delivery"})


@dataclass
class LiveState:
    """What the dashboard knows right now. ``running`` is None until the first answer."""
    running: bool | None = None
    reason: str = ""                  # why the engine is not reachable
    status: dict | None = None        # the engine's ``status`` reply
    connections: list[dict] = field(default_factory=list)
    stats: dict | None = None
    queue: dict[str, int] | None = None   # counts by state (engine or store)
    store_note: str = ""              # why the store could not be read, if so
    bans: list[dict] | None = None    # brute-force bans in force (engine or store); None: unknown
    bans_note: str = ""               # why the bans could not be read, if so
    checked_at: float = 0.0
    next_retry: float | None = None


class LiveFeed:
    def __init__(self, target: MessagePump, source: Source, *, interval: float = 1.0,
                 retry_interval: float = 3.0, min_gap: float = 0.2,
                 clock: Callable[[], float] = time.time) -> None:
        self.target = target
        self.source = source
        self.interval = interval
        self.retry_interval = retry_interval
        self.min_gap = min_gap            # at most ~5 event-driven polls a second
        self.clock = clock
        self.state = LiveState()
        self._events: list[dict] = []
        self._pending: FeedUpdate | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ control
    def retry_now(self) -> None:
        """Try the engine again now (the operator pressed r)."""
        self._wake.set()

    def _publish(self) -> None:
        events, self._events = self._events, []
        pending = self._pending
        if pending is not None and not pending.taken:
            pending.fold(replace(self.state), events)
            return
        self._pending = FeedUpdate(replace(self.state), events)
        self.target.post_message(self._pending)

    def _note(self, text: str) -> None:
        """An event of our own for the events tail (engine reached or lost)."""
        self._events.append({"topic": "tui", "at": self.clock(), "text": text})

    # ------------------------------------------------------------------ the worker
    async def run(self) -> None:
        while True:
            try:
                await self._follow()
            except (EngineNotRunning, ControlCallError) as exc:
                await self._down(str(exc) or type(exc).__name__)

    async def _follow(self) -> None:
        status = await self.source.status()
        self._note(f"connected to the engine (pid {status.get('pid', '?')})")
        events = asyncio.create_task(self._subscribe())
        try:
            while True:
                connections, stats, (bans, bans_note) = await asyncio.gather(
                    self.source.connections(), self.source.stats(), self._engine_bans())
                self.state = LiveState(running=True, status=status, connections=connections, stats=stats,
                                       queue=status.get("queue"), bans=bans, bans_note=bans_note,
                                       checked_at=self.clock())
                self._publish()
                # A wake (event, retry_now) that came during the poll or the gap is
                # kept: the next poll follows the gap at once.
                await asyncio.sleep(self.min_gap)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wait(events), max(0.0, self.interval - self.min_gap))
                if events.done():
                    events.result()      # re-raises why the stream ended
                    raise EngineNotRunning("the engine closed the event stream")
                self._wake.clear()       # this poll answers every wake so far
                status = await self.source.status()
        finally:
            events.cancel()
            with contextlib.suppress(BaseException):
                await events

    async def _engine_bans(self) -> tuple[list[dict] | None, str]:
        # A refusal of this one request (an engine without ``auth.bans``) costs the
        # bans view only, not the whole dashboard; a lost engine still ends _follow.
        try:
            return list(await self.source.bans()), ""
        except ControlCallError as exc:
            return None, exc.message

    async def _wait(self, events: asyncio.Task) -> None:
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({waker, events}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()

    async def _subscribe(self) -> None:
        async for event in self.source.events():
            self._events.append(event)
            if event.get("topic") in PROMPT_TOPICS:
                self._wake.set()

    async def _down(self, reason: str) -> None:
        self._wake.clear()               # r pressed while the store is read retries at once
        if self.state.running is not False:
            self._note(f"engine not reachable: {reason}")
        counts, note = None, ""
        try:
            counts = await self.source.store_counts()
        except StoreUnavailable as exc:
            note = str(exc)
        now = self.clock()
        bans, bans_note = None, ""
        try:
            bans = await self.source.store_bans(now)
        except StoreUnavailable as exc:
            bans_note = str(exc)
        self.state = LiveState(running=False, reason=reason, queue=counts, store_note=note,
                               bans=bans, bans_note=bans_note,
                               checked_at=now, next_retry=now + self.retry_interval)
        self._publish()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.retry_interval)
