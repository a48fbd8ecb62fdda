"""What every view shares: the view bar, the engine banner, the footer, and the
live state handed down by the app."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer

from ..messages import LiveChanged
from ..widgets import EngineBanner, ViewBar

if TYPE_CHECKING:   # pragma: no cover
    from ..app import MailboxGuardApp
    from ..feed import LiveState


class LiveScreen(Screen):
    VIEW = ""        # the view this screen belongs to, for the view bar

    @property
    def dash(self) -> "MailboxGuardApp":
        return cast("MailboxGuardApp", self.app)

    def compose(self) -> ComposeResult:
        yield ViewBar(self.VIEW)
        yield EngineBanner()
        yield from self.compose_view()
        yield Footer(compact=True)

    def compose_view(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self.query_one(EngineBanner).state = self.dash.live
        self.live_update(self.dash.live, [], first=True)

    def on_screen_resume(self) -> None:
        if self.is_mounted:
            self.query_one(EngineBanner).state = self.dash.live
            self.live_update(self.dash.live, [], first=True)

    def on_live_changed(self, message: LiveChanged) -> None:
        self.query_one(EngineBanner).state = message.state
        self.live_update(message.state, message.events, first=False)

    def live_update(self, state: "LiveState", events: list[dict], first: bool) -> None:
        """Show the new state; ``first`` when the screen is (re)shown, after which
        ``events`` may not be everything that happened meanwhile."""
