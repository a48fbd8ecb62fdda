"""A ranked list in a box: top sender domains, top rejecting checks."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from ..format import plain


class TopList(Static):
    DEFAULT_CSS = """
    TopList {
        border: round $primary-muted;
        border-title-color: $text;
        height: 1fr;
        width: 1fr;
        padding: 0 1;
    }
    """

    items: reactive[list] = reactive(list, always_update=True)

    def __init__(self, title: str, empty: str = "nothing yet", **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = title
        self.empty = empty

    def render(self):
        if not self.items:
            return Text(self.empty, style="dim")
        table = Table.grid(expand=True)
        table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        table.add_column(justify="right", no_wrap=True)
        for name, n in self.items:
            table.add_row(plain(name, 60), Text(str(n), style="bold"))
        return table
