"""The events tail: connections, messages, deliveries and rejections as they happen."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import RichLog

from ..feed import LiveState
from ..format import clock_time, plain, size
from .base import LiveScreen

TOPIC_STYLES = {"connection": "cyan", "message": "green", "delivery": "blue", "reject": "red",
                "engine": "magenta", "tui": "yellow"}


def describe(event: dict, now: float | None = None) -> Text:
    """One line for one event."""
    topic = str(event.get("topic") or "?")
    text = Text(f"{clock_time(event.get('at'), now)} ", style="dim")
    text.append(f"{topic[:7]:<7} ", style=TOPIC_STYLES.get(topic, ""))
    if topic == "connection":
        if event.get("action") == "opened":
            text.append(f"opened {event.get('peer_ip')}:{event.get('peer_port')} ")
            text.append_text(plain(event.get("listener"), 20))
        else:
            text.append(f"closed messages {event.get('messages', 0)} rejected {event.get('rejected', 0)}")
        text.append(f" conn {event.get('id')}", style="dim")
    elif topic == "message":
        text.append(f"queued {event.get('id')} from ")
        text.append_text(plain(event.get("mail_from") or "<>", 60))
        rcpts = event.get("recipients") or []
        text.append(" to ")
        text.append_text(plain(", ".join(map(str, rcpts)), 80))
        text.append(f" {size(event.get('size'))}", style="dim")
    elif topic == "delivery":
        outcome = str(event.get("outcome") or "?")
        text.append(f"{event.get('id')} ")
        text.append_text(plain(event.get("recipient"), 60))
        text.append(f" {outcome}", style={"delivered": "green", "bounced": "red"}.get(outcome, "yellow"))
        if event.get("remote"):
            text.append(f" via {event.get('remote')}")
        if event.get("reply"):
            text.append(": ")
            text.append_text(plain(event.get("reply"), 120, style="dim"))
    elif topic == "reject":
        text.append_text(plain(event.get("peer_ip"), 40))
        text.append(f" {event.get('phase')} ")
        text.append_text(plain(event.get("subject"), 60))
        text.append(f" {event.get('check')}:{event.get('symbol')}", style="bold")
        if event.get("reply"):
            text.append(" ")
            text.append_text(plain(event.get("reply"), 120, style="dim"))
    elif topic == "tui":
        text.append_text(plain(event.get("text"), 200))
    else:
        rest = {k: v for k, v in event.items() if k not in ("topic", "at", "seq", "dropped")}
        text.append_text(plain(" ".join(f"{k}={v}" for k, v in rest.items()), 200))
    if event.get("dropped"):
        text.append(f" ({event['dropped']} earlier events dropped: the dashboard fell behind)", style="yellow")
    return text


class EventsScreen(LiveScreen):
    VIEW = "events"

    DEFAULT_CSS = """
    EventsScreen RichLog {
        height: 1fr;
        padding: 0 1;
        scrollbar-size-vertical: 1;
    }
    """

    BINDINGS = [
        Binding("ctrl+l", "clear", "Clear"),
        Binding("end", "follow", "Follow", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.shown = 0             # how many of the app's events are in the log

    def compose_view(self) -> ComposeResult:
        yield RichLog(max_lines=2000, wrap=True, markup=False, min_width=40)

    def live_update(self, state: LiveState, events: list[dict], first: bool) -> None:
        log = self.query_one(RichLog)
        total = self.dash.events_seen
        backlog = list(self.dash.event_log)
        missing = min(total - self.shown, len(backlog))
        for event in backlog[len(backlog) - missing:] if missing > 0 else []:
            log.write(describe(event, self.dash.clock()))
        self.shown = total

    def action_clear(self) -> None:
        self.query_one(RichLog).clear()

    def action_follow(self) -> None:
        log = self.query_one(RichLog)
        log.auto_scroll = True
        log.scroll_end(animate=False)
