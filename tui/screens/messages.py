"""Message lists (the queue, the quarantine) and the message detail: filter, open,
retry, hold/release, delete. Both share one shape; ``KIND`` picks the list and which
actions apply. Lists come from the engine, or from the store when it is down.
Releasing a quarantined message delivers what the policy kept back: it asks first."""

from __future__ import annotations

import time
from functools import partial
from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.timer import Timer
from textual.widgets import DataTable, Input, Label, Static

from ..feed import LiveState
from mailbox_guard.queue import states as st

from ..format import clock_time, plain, plain_block, relative, size
from ..messages import MessagesChanged
from ..source import KINDS, ControlCallError, EngineNotRunning, MessageKind, StoreUnavailable
from ..widgets import FilterBar, MessageTable, VerdictTrace
from .base import LiveScreen
from .confirm import ConfirmScreen

LIST_LIMIT = 500
VERBS = {"retry": "retried", "hold": "held", "release": "released", "delete": "deleted"}


class MessageActions:
    """Retry, hold/release and delete on one message, shared by list and detail."""

    KIND: ClassVar[str] = "queue"

    @property
    def kind(self) -> MessageKind:
        return KINDS[self.KIND]

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        verbs = {"retry_message": ("retry",), "hold_message": ("hold", "release"), "delete_message": ("delete",)}
        if action in verbs:
            return any(v in self.kind.actions for v in verbs[action])
        return True

    def selected(self) -> tuple[str, dict] | None:
        raise NotImplementedError

    def action_retry_message(self) -> None:
        self._start("retry")

    def action_hold_message(self) -> None:
        picked = self.selected()
        if picked is None:
            return
        key, row = picked
        if row.get("state") == st.QUARANTINE:
            self._ask_release(key, row)
        else:
            self._start("release" if row.get("state") == st.HOLD else "hold", key)

    def _ask_release(self, key: str, row: dict) -> None:
        body = Text("Release message ")
        body.append(key, style="bold")
        body.append(" from ")
        body.append_text(plain(row.get("mail_from") or "<>", 80))
        body.append(" for delivery? The policy kept it back: ")
        body.append_text(plain(row.get("reason") or "no reason recorded", 200))
        body.append(".")

        def answered(yes: bool | None) -> None:
            if yes:
                self._start("release", key)
        self.app.push_screen(ConfirmScreen("Release from quarantine?", body, "Release"), answered)

    def action_delete_message(self) -> None:
        picked = self.selected()
        if picked is None:
            self.notify("No message selected.", severity="warning")
            return
        key, row = picked
        body = Text("Delete message ")
        body.append(key, style="bold")
        body.append(" from ")
        body.append_text(plain(row.get("mail_from") or "<>", 80))
        recipients = row.get("recipients")
        if isinstance(recipients, list):
            recipients = ", ".join(r.get("recipient", "") for r in recipients)
        body.append(" to ")
        body.append_text(plain(recipients, 120))
        body.append(f" ({row.get('state')})? It is removed from the {self.kind.name} for good; "
                    "no bounce is sent.")

        def answered(yes: bool | None) -> None:
            if yes:
                self._start("delete", key)
        self.app.push_screen(ConfirmScreen(f"Delete from the {self.kind.name}?", body, "Delete"), answered)

    def _start(self, verb: str, key: str | None = None) -> None:
        if key is None:
            picked = self.selected()
            if picked is None:
                self.notify("No message selected.", severity="warning")
                return
            key = picked[0]
        self.run_worker(partial(self._act, verb, key), group="action")

    async def _act(self, verb: str, key: str) -> None:
        method = self.kind.actions.get(verb)
        if method is None:
            return
        try:
            await self.dash.source.action(method, id=key)
        except EngineNotRunning:
            self.notify(f"The engine is not running: {verb} needs it (press r to retry).", severity="warning")
            return
        except ControlCallError as exc:
            self.notify(f"{verb.capitalize()} failed: {exc.message}", severity="error")
            return
        self.notify(f"{key} {VERBS[verb]}.")
        self.app.post_message(MessagesChanged(self.kind.name, key, verb))
        self.after_action(verb, key)

    def after_action(self, verb: str, key: str) -> None:
        pass


class MessageListScreen(MessageActions, LiveScreen):
    DEFAULT_CSS = """
    MessageListScreen #preview {
        height: 2;
        padding: 0 1;
        background: $boost;
    }
    MessageListScreen #list-note {
        height: auto;
        padding: 0 1;
        color: $text-muted;
    }
    """

    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "cycle_state", "State"),
        Binding("enter", "open", "Detail", show=True),
        Binding("R", "retry_message", "Retry"),
        Binding("h", "hold_message", "Hold/release"),
        Binding("x", "delete_message", "Delete"),
        Binding("escape", "unfilter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.search = ""
        self.state_index = 0         # 0: every state, else kind.states[i - 1]
        self._debounce: Timer | None = None
        self._seen_counts: dict | None = None
        self._seen_running: bool | None = None
        self._loaded_at = 0.0

    @property
    def VIEW(self) -> str:          # type: ignore[override]
        return self.KIND

    TABLE: ClassVar[type[MessageTable]] = MessageTable
    DETAIL: ClassVar[type["MessageDetailScreen"]]       # set below, once the class exists

    def compose_view(self) -> ComposeResult:
        yield FilterBar("queue id, sender, recipient or Message-ID")
        yield self.TABLE(self.dash.clock, id="messages")
        yield Static(id="list-note")
        yield Static(id="preview")

    @property
    def table(self) -> MessageTable:
        return self.query_one(MessageTable)

    # Textual runs the on_mount of every class in the MRO: LiveScreen's shows the
    # live state (and so loads the list); no super() call here.
    def on_mount(self) -> None:
        self._show_state()
        self.table.focus()

    # ------------------------------------------------------------ loading
    def reload(self) -> None:
        self.run_worker(self._load, group="load", exclusive=True)

    async def _load(self) -> None:
        states = list(self.kind.states) if self.state_index == 0 else [self.kind.states[self.state_index - 1]]
        filtered = bool(self.search or self.state_index)
        note = self.query_one("#list-note", Static)
        try:
            page = await self.dash.source.list_messages(self.KIND, states=states, search=self.search,
                                                        limit=LIST_LIMIT)
        except StoreUnavailable as exc:
            self.table.sync([])
            note.update(Text(f"Cannot list the {self.kind.name}: {exc}", style="red"))
            return
        except ControlCallError as exc:
            note.update(Text(f"Cannot list the {self.kind.name}: {exc.message}", style="red"))
            return
        self._loaded_at = time.monotonic()
        self.table.sync((r["id"], r) for r in page.rows)
        lines = []
        if not page.rows:
            lines.append("No messages match." if filtered else page.note or f"The {self.kind.name} is empty.")
        if page.origin == "store":
            lines.append("Read from the store (engine not running); actions need the engine.")
        if len(page.rows) >= LIST_LIMIT:
            lines.append(f"Showing the newest {LIST_LIMIT}; filter to narrow.")
        note.update(Text("\n".join(lines)))
        note.display = bool(lines)
        self._show_preview()

    def live_update(self, state: LiveState, events: list[dict], first: bool) -> None:
        changed = (first or state.queue != self._seen_counts or state.running != self._seen_running
                   or any(e.get("topic") in ("message", "delivery") for e in events)
                   or time.monotonic() - self._loaded_at > 10)
        self._seen_counts, self._seen_running = state.queue, state.running
        if changed:
            self.reload()

    def on_messages_changed(self, message: MessagesChanged) -> None:
        if message.kind == self.KIND:
            self.reload()

    def after_action(self, verb: str, key: str) -> None:
        self.reload()

    # ------------------------------------------------------------ the filter
    def action_filter(self) -> None:
        self.query_one(FilterBar).input.focus()

    def action_unfilter(self) -> None:
        bar = self.query_one(FilterBar)
        if self.focused is bar.input:
            self.table.focus()
            return
        if bar.input.value or self.state_index:
            bar.input.value = ""
            self.search = ""
            self.state_index = 0
            self._show_state()
            self.reload()

    def action_cycle_state(self) -> None:
        self.state_index = (self.state_index + 1) % (len(self.kind.states) + 1)
        self._show_state()
        self.reload()

    def _show_state(self) -> None:
        self.query_one(FilterBar).state_label = (
            "all" if self.state_index == 0 else self.kind.states[self.state_index - 1])

    def on_input_changed(self, event: Input.Changed) -> None:
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(0.3, self._apply_filter)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if self._debounce is not None:
            self._debounce.stop()
        self._apply_filter()
        self.table.focus()

    def _apply_filter(self) -> None:
        value = self.query_one(FilterBar).input.value.strip()
        if value != self.search:
            self.search = value
            self.reload()

    # ------------------------------------------------------------ selection
    def selected(self) -> tuple[str, dict] | None:
        key = self.table.current_key
        row = self.table.current_row
        return (key, row) if key is not None and row is not None else None

    def action_open(self) -> None:
        picked = self.selected()
        if picked is not None:
            self.app.push_screen(self.DETAIL(self.KIND, picked[0]))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_preview()

    def _show_preview(self) -> None:
        row = self.table.current_row
        text = Text()
        if row:
            now = self.dash.clock()
            text.append(f"{row.get('state')}", style="bold")
            text.append(f" · {size(row.get('size'))} · received {clock_time(row.get('received_at'), now)}"
                        f" · {row.get('attempts') or 0} attempt(s)")
            if row.get("state") in st.DUE and row.get("next_attempt"):
                text.append(f" · next {relative(row.get('next_attempt'), now)}")
            text.append("\n")
            if row.get("state") == st.QUARANTINE:
                text.append("reason ", style="dim")
                text.append_text(plain(row.get("reason"), 200))
            elif row.get("last_error"):
                text.append("last error ", style="dim")
                text.append_text(plain(row.get("last_error"), 200))
            else:
                text.append("Message-ID ", style="dim")
                text.append_text(plain(row.get("message_id"), 200))
        self.query_one("#preview", Static).update(text)


class MessageDetailScreen(MessageActions, LiveScreen):
    """One message: envelope, verdict trace, recipients, delivery attempts, headers."""

    DEFAULT_CSS = """
    MessageDetailScreen #detail {
        height: 1fr;
        padding: 0 1;
    }
    MessageDetailScreen .section {
        text-style: bold;
        color: $accent;
        margin-top: 1;
    }
    MessageDetailScreen #summary {
        height: auto;
    }
    MessageDetailScreen #headers {
        height: auto;
        color: $text-muted;
    }
    """

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("R", "retry_message", "Retry"),
        Binding("h", "hold_message", "Hold/release"),
        Binding("x", "delete_message", "Delete"),
    ]

    def __init__(self, kind: str, key: str) -> None:
        super().__init__()
        self.KIND = kind
        self.key = key
        self.detail: dict | None = None

    @property
    def VIEW(self) -> str:          # type: ignore[override]
        return self.KIND

    def compose_view(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static(Text(f"loading {self.key}…", style="dim"), id="summary")
            yield Label("Verdict trace", classes="section")
            yield VerdictTrace(id="trace")
            yield Label("Recipients", classes="section")
            yield Static(id="recipients")
            yield Label("Delivery attempts", classes="section")
            yield Static(id="deliveries")
            yield Label("Headers", classes="section")
            yield Static(id="headers")

    def on_mount(self) -> None:
        self.query_one("#detail").focus()
        self.reload()

    def reload(self) -> None:
        self.run_worker(self._load, group="load", exclusive=True)

    def after_action(self, verb: str, key: str) -> None:
        if verb == "delete":
            self.app.pop_screen()
        else:
            self.reload()

    def selected(self) -> tuple[str, dict] | None:
        if self.detail is None:
            self.notify("The message is not loaded.", severity="warning")
            return None
        return self.detail["id"], self.detail

    async def _load(self) -> None:
        summary = self.query_one("#summary", Static)
        try:
            detail = await self.dash.source.show_message(self.KIND, self.key)
        except StoreUnavailable as exc:
            summary.update(Text(f"Cannot read {self.key}: {exc}", style="red"))
            return
        except ControlCallError as exc:
            summary.update(Text(f"Cannot read {self.key}: {exc.message}", style="red"))
            return
        self.detail = detail
        if detail is None:
            summary.update(Text(f"No message {self.key}: it was deleted, or delivered and purged.",
                                style="yellow"))
            self.query_one(VerdictTrace).trace = []
            return
        self._show(detail)

    def _show(self, d: dict) -> None:
        now = self.dash.clock()
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(ratio=1)
        grid.add_row("Message", Text.assemble((str(d.get("id")), "bold"), "  ", (str(d.get("state")), "bold")))
        grid.add_row("From", plain(d.get("mail_from") or "<>", 200))
        grid.add_row("Message-ID", plain(d.get("message_id"), 200))
        grid.add_row("Received", Text(f"{clock_time(d.get('received_at'), now)} ({relative(d.get('received_at'), now)})"
                                      f" · {size(d.get('size'))} · client {d.get('client_ip') or '-'}"
                                      f" · conn {d.get('connection_id') or '-'}"))
        if d.get("reason"):
            released = "" if d.get("state") == st.QUARANTINE else " (released since)"
            grid.add_row("Quarantined", Text.assemble(plain(d.get("reason"), 300), released))
        # The HELO name and the login are the client's text: plain, never markup.
        grid.add_row("Session", plain(", ".join((
            f"HELO {d.get('helo') or '-'}", f"TLS {d['tls']}" if d.get("tls") else "no TLS",
            f"authenticated as {d['auth_user']}" if d.get("auth_user") else "not authenticated")), 300))
        attempts = f"{d.get('attempts') or 0} attempt(s)"
        if d.get("state") in st.DUE and d.get("next_attempt"):
            attempts += f" · next {clock_time(d.get('next_attempt'), now)} ({relative(d.get('next_attempt'), now)})"
        grid.add_row("Attempts", Text(attempts))
        if d.get("last_error"):
            grid.add_row("Last error", plain(d.get("last_error"), 300))
        self.query_one("#summary", Static).update(grid)
        self.query_one(VerdictTrace).trace = list(d.get("trace") or [])

        rcpts = Table.grid(padding=(0, 1))
        for r in d.get("recipients") or []:
            rcpts.add_row(plain(r.get("recipient"), 120), Text(str(r.get("state") or "-"), style="bold"),
                          Text(f"{r.get('attempts') or 0}x"), plain(r.get("last_reply"), 200))
        self.query_one("#recipients", Static).update(rcpts if d.get("recipients") else Text("none", style="dim"))

        deliveries = d.get("deliveries") or []
        log = Table.grid(padding=(0, 1))
        for x in deliveries[-20:]:
            log.add_row(Text(clock_time(x.get("at"), now)), plain(x.get("recipient"), 80),
                        Text(str(x.get("outcome") or "-"), style="bold"), plain(x.get("remote"), 40),
                        plain(x.get("reply"), 200))
        parts = [log] if deliveries else [Text("no attempt yet", style="dim")]
        if len(deliveries) > 20:
            parts.insert(0, Text(f"(the last 20 of {len(deliveries)})", style="dim"))
        self.query_one("#deliveries", Static).update(Group(*parts))

        headers = d.get("headers")
        # Headers are the sender's text: shown as is, never as markup.
        self.query_one("#headers", Static).update(
            plain_block(headers) if headers else Text("(the body is not stored)", style="dim"))

    def live_update(self, state: LiveState, events: list[dict], first: bool) -> None:
        if any(e.get("id") == self.key and e.get("topic") in ("delivery",) for e in events):
            self.reload()


MessageListScreen.DETAIL = MessageDetailScreen
