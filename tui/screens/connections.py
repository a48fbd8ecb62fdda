"""Live connections: remote, HELO, user, phase, TLS, age; refreshed every second by
the live feed; k kills the highlighted one after a confirmation."""

from __future__ import annotations

from functools import partial

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from ..feed import LiveState
from ..format import plain
from ..source import ControlCallError, EngineNotRunning
from ..widgets import ConnectionTable
from .base import LiveScreen
from .confirm import ConfirmScreen


class ConnectionsScreen(LiveScreen):
    VIEW = "connections"

    DEFAULT_CSS = """
    ConnectionsScreen #conn-detail {
        height: 2;
        padding: 0 1;
        background: $boost;
    }
    ConnectionsScreen #conn-note {
        padding: 1 2;
        color: $text-muted;
    }
    """

    BINDINGS = [
        Binding("k", "kill", "Kill connection"),
    ]

    def compose_view(self) -> ComposeResult:
        yield ConnectionTable(id="connections")
        yield Static(id="conn-note")
        yield Static(id="conn-detail")

    @property
    def table(self) -> ConnectionTable:
        return self.query_one(ConnectionTable)

    def live_update(self, state: LiveState, events: list[dict], first: bool) -> None:
        rows = sorted(state.connections, key=lambda r: (r.get("started_at") or 0, r.get("id") or ""))
        self.table.sync((r["id"], r) for r in rows if r.get("id"))
        note = self.query_one("#conn-note", Static)
        if state.running is False:
            note.update("The engine is not running: there are no live connections to show.")
        elif state.running and not rows:
            note.update("No connections right now.")
        else:
            note.update("")
        note.display = bool(state.running is False or (state.running and not rows))
        self._show_detail()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        row = self.table.current_row
        text = Text()
        if row:
            text.append("conn ", style="dim")
            text.append(str(row.get("id")))
            text.append(f"  {row.get('listener') or '-'} ({row.get('kind') or '-'})", style="dim")
            text.append(f"  messages {row.get('messages', 0)} rejected {row.get('rejected', 0)}\n")
            text.append("mail from ", style="dim")
            text.append_text(plain(row.get("mail_from"), 60))
            text.append(f"  recipients {row.get('recipients', 0)}")
        self.query_one("#conn-detail", Static).update(text)

    def action_kill(self) -> None:
        row = self.table.current_row
        if row is None:
            self.notify("No connection selected.", severity="warning")
            return
        body = Text("Close the connection from ")
        body.append(f"{row.get('peer_ip')}:{row.get('peer_port')}", style="bold")
        body.append(" (HELO ")
        body.append_text(plain(row.get("helo"), 60))
        body.append(f", phase {row.get('phase')})? The client gets a 421 and the socket is closed; "
                    "a transaction in progress is lost (the client will retry).")
        conn_id = str(row["id"])

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(partial(self._kill, conn_id), group="action")
        self.app.push_screen(ConfirmScreen("Kill connection?", body, "Kill"), answered)

    async def _kill(self, conn_id: str) -> None:
        try:
            await self.dash.source.action("connections.kill", id=conn_id)
        except EngineNotRunning:
            self.notify("The engine is not running: nothing to kill.", severity="warning")
        except ControlCallError as exc:
            self.notify(f"Kill failed: {exc.message}", severity="error")
        else:
            self.notify(f"Connection {conn_id} closed.")
            self.dash.feed.retry_now()
