"""The dashboard: connections now, outcomes per minute, the queue by state, top
senders and top rejecting checks."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from ..feed import LiveState
from ..widgets import QueueCounts, RateLine, TopList
from .base import LiveScreen

RATES = ("accepted", "rejected", "deferred")


class DashboardScreen(LiveScreen):
    VIEW = "dashboard"

    DEFAULT_CSS = """
    DashboardScreen #now, DashboardScreen #rates {
        height: auto;
        border: round $primary-muted;
        border-title-color: $text;
        padding: 0 1;
    }
    DashboardScreen #tops {
        height: 1fr;
        min-height: 4;
    }
    """

    def compose_view(self) -> ComposeResult:
        with Vertical(id="now") as now:
            now.border_title = "Now"
            yield Static(id="headline")
            yield QueueCounts()
        with Vertical(id="rates") as rates:
            rates.border_title = "Per minute, last 30 minutes"
            for outcome in RATES:
                yield RateLine(outcome, id=f"rate-{outcome}")
        with Horizontal(id="tops"):
            yield TopList("Top sender domains", id="top-senders")
            yield TopList("Top rejecting checks", empty="no rejections", id="top-checks")

    def live_update(self, state: LiveState, events: list[dict], first: bool) -> None:
        counts = self.query_one(QueueCounts)
        counts.counts = state.queue
        counts.origin = "from the store" if state.running is False and state.queue is not None else ""
        headline = Text()
        if state.running:
            totals = (state.stats or {}).get("totals") or (state.status or {}).get("totals") or {}
            headline.append("connections ", style="bold")
            headline.append(str(len(state.connections)), style="bold cyan")
            headline.append("   total: ", style="dim")
            headline.append("  ".join(f"{k} {totals.get(k, 0)}"
                                      for k in ("accepted", "rejected", "delivered", "bounced")))
        elif state.running is False:
            headline.append("connections ", style="bold")
            headline.append("unknown (engine not running)", style="dim")
        else:
            headline.append("waiting for the engine…", style="dim")
        self.query_one("#headline", Static).update(headline)
        per_minute = (state.stats or {}).get("per_minute") or {}
        for outcome in RATES:
            self.query_one(f"#rate-{outcome}", RateLine).values = list(per_minute.get(outcome) or [])
        stats = state.stats or {}
        self.query_one("#top-senders", TopList).items = list(stats.get("top_senders") or [])
        self.query_one("#top-checks", TopList).items = list(stats.get("top_rejecting_checks") or [])
