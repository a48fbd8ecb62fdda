"""The top line: the views and their keys, the current one highlighted; the name of
the program first when the line has room for it."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

VIEWS = (("d", "dashboard", "Dashboard"), ("c", "connections", "Connections"), ("q", "queue", "Queue"),
         ("u", "quarantine", "Quarantine"), ("e", "events", "Events"), ("b", "bans", "Bans"))


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
        views = Text()
        for key, name, label in VIEWS:
            current = name == self.current
            views.append(" ")
            views.append(f" {key} ", style="bold reverse" if current else "bold")
            views.append(f"{label} ", style="reverse" if current else "")
        brand = Text(" mailbox-guard", style="bold")
        if brand.cell_len + views.cell_len <= self.size.width:
            return brand + views
        return views
