"""Queue size by state, colour by urgency: what waits on one line, what is done on
the next."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from mailbox_guard.queue import states as st

STYLES = {"deferred": "yellow", "hold": "magenta", "quarantine": "magenta", "bounced": "red", "active": "cyan"}


class QueueCounts(Static):
    DEFAULT_CSS = """
    QueueCounts {
        height: 2;
    }
    """

    counts: reactive[dict | None] = reactive(None, always_update=True)
    origin: reactive[str] = reactive("")

    def render(self) -> Text:
        text = Text("queue ", style="bold")
        if self.counts is None:
            text.append("unknown", style="dim")
            return text
        for label, group in (("", st.WAITING), ("\ndone  ", st.DONE)):
            text.append(label, style="bold")
            for i, state in enumerate(group):
                n = int(self.counts.get(state, 0))
                if i:
                    text.append(" · ", style="dim")
                text.append(f"{state} ")
                text.append(str(n), style=f"bold {STYLES.get(state, '')}" if n else "dim")
        if self.origin:
            text.append(f" ({self.origin})", style="dim")
        return text
