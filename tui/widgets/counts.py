"""Queue size by state, on one line, colour by urgency."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

STATES = ("incoming", "active", "deferred", "hold", "delivered", "bounced")
STYLES = {"deferred": "yellow", "hold": "magenta", "bounced": "red", "active": "cyan"}


class QueueCounts(Static):
    DEFAULT_CSS = """
    QueueCounts {
        height: 1;
    }
    """

    counts: reactive[dict | None] = reactive(None, always_update=True)
    origin: reactive[str] = reactive("")

    def render(self) -> Text:
        text = Text("queue ", style="bold")
        if self.counts is None:
            text.append("unknown", style="dim")
            return text
        for i, state in enumerate(STATES):
            n = int(self.counts.get(state, 0))
            if i:
                text.append(" · ", style="dim")
            text.append(f"{state} ")
            text.append(str(n), style=f"bold {STYLES.get(state, '')}" if n else "dim")
        if self.origin:
            text.append(f" ({self.origin})", style="dim")
        return text
