"""``mailbox-guard tui``: the dashboard app.

One mode per view (dashboard, connections, queue, quarantine, events, bans), each with its
own screen stack (the message detail is pushed over its list). One worker, the
:class:`~tui.feed.LiveFeed`, follows the engine; the app keeps the latest state and
the events seen, and hands them to the screens on view. Keys are BINDINGS; ``?``
lists them all.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Callable

from textual.app import App
from textual.binding import Binding

from .feed import LiveFeed, LiveState
from .messages import FeedUpdate, LiveChanged, MessagesChanged
from .screens import (BansScreen, ConnectionsScreen, DashboardScreen, EventsScreen, HelpScreen,
                      MessageDetailScreen, QuarantineScreen, QueueScreen)
from .screens.base import LiveScreen
from .source import EngineSource, Source

EVENT_BACKLOG = 2000


class MailboxGuardApp(App):
    TITLE = "mailbox-guard"
    ENABLE_COMMAND_PALETTE = False     # every action has a key; the footer needs the room

    MODES = {
        "dashboard": DashboardScreen,
        "connections": ConnectionsScreen,
        "queue": QueueScreen,
        "quarantine": QuarantineScreen,
        "events": EventsScreen,
        "bans": BansScreen,
    }
    DEFAULT_MODE = "dashboard"

    BINDINGS = [
        Binding("d", "switch_mode('dashboard')", "Dashboard", show=False),
        Binding("c", "switch_mode('connections')", "Connections", show=False),
        Binding("q", "switch_mode('queue')", "Queue", show=False),
        Binding("u", "switch_mode('quarantine')", "Quarantine", show=False),
        Binding("e", "switch_mode('events')", "Events", show=False),
        Binding("b", "switch_mode('bans')", "Bans", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("r", "reconnect", "Retry engine"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, home: Path, *, source: Source | None = None, clock: Callable[[], float] = time.time,
                 interval: float = 1.0, retry_interval: float = 3.0, live: bool = True) -> None:
        super().__init__()
        self.home = Path(home)
        self.source = source if source is not None else EngineSource(self.home)
        self.clock = clock
        self.live = LiveState()
        self.event_log: collections.deque[dict] = collections.deque(maxlen=EVENT_BACKLOG)
        self.events_seen = 0
        self.feed = LiveFeed(self, self.source, interval=interval, retry_interval=retry_interval, clock=clock)
        self._follow = live
        self.sub_title = str(self.home)

    def on_mount(self) -> None:
        if self._follow:
            self.run_worker(self.feed.run, name="live-feed", group="feed", exclusive=True)

    async def on_unmount(self) -> None:
        await self.source.close()

    # ------------------------------------------------------------------ the feed
    def on_feed_update(self, message: FeedUpdate) -> None:
        message.taken = True
        self.apply_live(message.state, message.events)

    def apply_live(self, state: LiveState, events: list[dict]) -> None:
        """Take a new state (from the feed, or a test) and show it."""
        self.live = state
        self.event_log.extend(events)
        self.events_seen += len(events)
        for screen in self.screen_stack:
            if isinstance(screen, LiveScreen) and screen.is_mounted:
                screen.post_message(LiveChanged(state, events))

    def on_messages_changed(self, message: MessagesChanged) -> None:
        # Every list in this mode's stack (the one under a detail, too) reloads.
        for screen in self.screen_stack:
            if isinstance(screen, LiveScreen):
                screen.post_message(MessagesChanged(message.kind, message.key, message.action))

    # ------------------------------------------------------------------ actions
    def action_reconnect(self) -> None:
        self.feed.retry_now()
        if self.live.running is False:
            self.notify("Trying the engine again…", timeout=2)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        sections = [("Everywhere", list(self.BINDINGS))]
        for title, cls in (("Connections", ConnectionsScreen), ("Queue and quarantine", QueueScreen),
                           ("Message detail", MessageDetailScreen), ("Events", EventsScreen),
                           ("Bans", BansScreen)):
            sections.append((title, list(cls.BINDINGS)))
        intro = ("Keyboard only. Views: d dashboard, c connections, q queue, u quarantine, e events, "
                 "b bans. Lists: arrows/pgup/pgdn move, enter opens. Kill, delete, unban and a release "
                 "from quarantine ask first. "
                 "When the engine is not running the queue and the bans are read from the store; r tries "
                 "the engine again.")
        self.push_screen(HelpScreen(sections, intro))


def run(home: Path) -> int:
    """Run the dashboard on ``home`` until the operator quits; the exit code."""
    app = MailboxGuardApp(Path(home))
    app.run()
    return app.return_code or 0
