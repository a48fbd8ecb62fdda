"""Brute-force bans in force: client addresses and users that failed AUTH too often.
Kind, key, failures and the time left, refreshed by the live feed (``auth.bans``, or
the store when the engine is down); x or delete lifts the highlighted ban after a
confirmation (``auth.unban``, which needs the engine)."""

from __future__ import annotations

from functools import partial

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from ..feed import LiveState
from ..format import clock_time, duration, plain, relative
from ..source import ControlCallError, EngineNotRunning
from ..widgets import BanTable
from ..widgets.tables import ban_row_key
from .base import LiveScreen
from .confirm import ConfirmScreen


class BansScreen(LiveScreen):
    VIEW = "bans"

    DEFAULT_CSS = """
    BansScreen #ban-detail {
        height: 2;
        padding: 0 1;
        background: $boost;
    }
    BansScreen #ban-note {
        height: auto;
        padding: 0 1;
        color: $text-muted;
    }
    """

    BINDINGS = [
        Binding("x,delete", "unban", "Unban"),
    ]

    def compose_view(self) -> ComposeResult:
        yield BanTable(self.dash.clock, id="bans")
        yield Static(id="ban-note")
        yield Static(id="ban-detail")

    def on_mount(self) -> None:
        self.table.focus()

    @property
    def table(self) -> BanTable:
        return self.query_one(BanTable)

    def live_update(self, state: LiveState, events: list[dict], first: bool) -> None:
        now = self.dash.clock()
        # In force only: one that ran out since the last poll goes now.
        rows = sorted((r for r in state.bans or [] if (r.get("until") or 0) > now),
                      key=lambda r: (-(r.get("until") or 0), str(r.get("kind")), str(r.get("key"))))
        self.table.sync((ban_row_key(r), r) for r in rows)
        lines: list[Text] = []
        if state.bans is None:
            if state.bans_note:
                lines.append(Text(f"Cannot read the bans: {state.bans_note}", style="red"))
            elif state.running is None:
                lines.append(Text("waiting for the engine…"))
        elif not rows:
            lines.append(Text("No bans in force: no client address or user is refused for failed AUTH."))
        if state.running is False and state.bans is not None:
            lines.append(Text("Read from the store (engine not running); unban needs the engine."))
        note = self.query_one("#ban-note", Static)
        note.update(Text("\n").join(lines))
        note.display = bool(lines)
        self._show_detail()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        row = self.table.current_row
        text = Text()
        if row:
            now = self.dash.clock()
            text.append(f"{row.get('kind')} ", style="dim")
            text.append_text(plain(row.get("key"), 120, style="bold"))
            text.append(f"  banned {clock_time(row.get('created_at'), now)} after {row.get('failures')} "
                        "AUTH failures\n")
            text.append("until ", style="dim")
            text.append(f"{clock_time(row.get('until'), now)} ({relative(row.get('until'), now)})")
            text.append("  · x unbans it now", style="dim")
        self.query_one("#ban-detail", Static).update(text)

    def action_unban(self) -> None:
        row = self.table.current_row
        if row is None:
            self.notify("No ban selected.", severity="warning")
            return
        key = str(row.get("key"))
        if self.dash.live.running is False:
            self.notify("The engine is not running: unban needs it (press r to retry).", severity="warning")
            return
        body = Text("Lift the ban on ")
        body.append(f"{row.get('kind')} ")
        body.append_text(plain(key, 120, style="bold"))
        left = (row.get("until") or 0) - self.dash.clock()
        body.append(f" ({row.get('failures')} failures, {duration(left)} left)? It may try AUTH again at once; "
                    "more failures ban it again.")

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(partial(self._unban, key), group="action")
        self.app.push_screen(ConfirmScreen("Unban?", body, "Unban"), answered)

    async def _unban(self, key: str) -> None:
        # A login is the client's text: shown plain, never as markup.
        shown = plain(key, 80).plain
        try:
            await self.dash.source.action("auth.unban", id=key)
        except EngineNotRunning:
            self.notify("The engine is not running: unban needs it (press r to retry).", severity="warning")
        except ControlCallError as exc:
            if exc.code == "not_found":
                self.notify(f"No ban for {shown} any more: it ran out or was lifted.", severity="warning",
                            markup=False)
            else:
                self.notify(f"Unban failed: {exc.message}", severity="error", markup=False)
        else:
            self.notify(f"{shown} unbanned.", markup=False)
        self.dash.feed.retry_now()       # show the list as it is now, at once
