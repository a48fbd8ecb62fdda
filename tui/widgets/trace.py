"""The verdict trace of a message: every result of every check, in order, so "why
was this rejected / held / queued?" is answered on one screen."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from ..format import plain

ACTION_STYLES = {"reject": "bold red", "tempfail": "bold yellow", "quarantine": "bold magenta",
                 "accept": "green", "tag": "cyan"}


class VerdictTrace(Static):
    DEFAULT_CSS = """
    VerdictTrace {
        height: auto;
        padding: 0 1;
    }
    """

    trace: reactive[list] = reactive(list, always_update=True)

    def render(self):
        if not self.trace:
            return Text("no verdicts recorded", style="dim")
        table = Table(box=None, expand=True, pad_edge=False, show_edge=False, header_style="bold")
        table.add_column("phase", no_wrap=True)
        table.add_column("check", no_wrap=True, overflow="ellipsis", max_width=15)
        table.add_column("symbol", no_wrap=True, overflow="ellipsis", max_width=24)
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("action", no_wrap=True)
        table.add_column("detail", ratio=1, min_width=12, overflow="fold")
        for v in self.trace:
            note = " ".join(str(x) for x in (v.get("reply"), v.get("detail")) if x)
            score = v.get("score")
            table.add_row(plain(v.get("phase"), 12), plain(v.get("check"), 40), plain(v.get("symbol"), 60),
                          Text(f"{score:g}" if isinstance(score, (int, float)) else "-"),
                          Text(str(v.get("action") or "-"), style=ACTION_STYLES.get(v.get("action"), "")),
                          plain(note, 300))
        return table
