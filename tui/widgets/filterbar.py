"""The filter line of a message list: free text (queue id, sender, recipient,
Message-ID) and the state shown."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.widgets import Input, Label


class FilterBar(Horizontal):
    DEFAULT_CSS = """
    FilterBar {
        height: 1;
    }
    FilterBar > .filter-key {
        width: 9;
        color: $text-muted;
    }
    FilterBar > Input {
        width: 1fr;
        height: 1;
    }
    FilterBar > .filter-state {
        width: auto;
        padding: 0 1;
        color: $text-muted;
    }
    """

    state_label: reactive[str] = reactive("all")

    def __init__(self, placeholder: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        yield Label("/ filter", classes="filter-key")
        yield Input(placeholder=self.placeholder, compact=True, id="filter")
        yield Label(f"s state: {self.state_label}", classes="filter-state")

    def watch_state_label(self, label: str) -> None:
        if self.is_mounted:
            self.query_one(".filter-state", Label).update(f"s state: {label}")

    def on_mount(self) -> None:
        self.watch_state_label(self.state_label)

    @property
    def input(self) -> Input:
        return self.query_one(Input)
