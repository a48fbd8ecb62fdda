"""The engine line under the view bar: up (with pid, uptime, policy version) or,
plainly, not running, with how to retry and what is shown instead."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from ..format import duration

if TYPE_CHECKING:   # pragma: no cover
    from ..feed import LiveState

NOT_RUNNING = "engine not running — press r to retry"


class EngineBanner(Static):
    DEFAULT_CSS = """
    EngineBanner {
        height: auto;
        padding: 0 1;
        background: $boost;
        color: $text-muted;
    }
    EngineBanner.-down {
        background: $error;
        color: $text;
        text-style: bold;
    }
    EngineBanner.-unknown {
        background: $warning-muted;
        color: $text;
    }
    """

    state: reactive["LiveState | None"] = reactive(None, always_update=True)

    def watch_state(self, state: "LiveState | None") -> None:
        self.set_class(state is not None and state.running is False, "-down")
        self.set_class(state is None or state.running is None, "-unknown")

    def render(self) -> Text:
        state = self.state
        if state is None or state.running is None:
            return Text("connecting to the engine…")
        if state.running is False:
            text = Text(NOT_RUNNING)
            text.append(" (retrying every few seconds)\n", style="not bold")
            text.append(state.reason[:200], style="not bold")
            if state.store_note:
                text.append(f" · store: {state.store_note}", style="not bold")
            else:
                text.append(" · the queue shown comes from the store", style="not bold")
            return text
        s = state.status or {}
        parts = [f"engine up {s.get('version', '')}".rstrip(), f"pid {s.get('pid', '?')}",
                 f"up {duration(s.get('uptime'))}", f"policy v{s.get('policy_version', '?')}"]
        if s.get("draining"):
            parts.append("DRAINING")
        listeners = s.get("listeners") or []
        if listeners:
            first = listeners[0]
            more = f" +{len(listeners) - 1}" if len(listeners) > 1 else ""
            parts.append(f"{first.get('name', '')} {first.get('host', '')}:{first.get('port', '')}{more}")
        return Text(" · ".join(parts))
