"""The top line: the views and their keys, the current one highlighted."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

VIEWS = (("d", "dashboard", "Dashboard"), ("c", "connections", "Connections"), ("q", "queue", "Queue"),
         ("u", "quarantine", "Quarantine"), ("e", "events", "Events"))


class ViewBar(Static):
    DEFAULT_CSS = """
    ViewBar {
        height: 1;
        background: $panel;
        color: $text-muted;
    }
    """

    current: reactive[str] = reactive("")

    def __init__(self, current: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.current = current

    def render(self) -> Text:
        text = Text(" mailbox-guard", style="bold")
        for key, name, label in VIEWS:
            current = name == self.current
            text.append(" ")
            text.append(f" {key} ", style="bold reverse" if current else "bold")
            text.append(f"{label} ", style="reverse" if current else "")
        return text
