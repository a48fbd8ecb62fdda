"""The dashboard's own Textual messages, all in one place.

The live feed posts :class:`FeedUpdate` to the app; while one is still waiting in the
app's queue the feed folds newer data into it instead of posting another (the app
never falls behind a busy engine). The app keeps the latest state and hands the
visible screen a :class:`LiveChanged`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:   # pragma: no cover
    from .feed import LiveState


class FeedUpdate(Message):
    """New live state (and the events seen since the last update) from the feed."""

    def __init__(self, state: "LiveState", events: list[dict]) -> None:
        super().__init__()
        self.state = state
        self.events = events
        self.taken = False      # set by the app; the feed then posts a fresh message

    def fold(self, state: "LiveState", events: list[dict]) -> None:
        self.state = state
        self.events.extend(events)


class LiveChanged(Message, bubble=False):
    """The app's live state changed; sent down to the screens of the current mode
    (it must not bubble back up to the app, hence ``bubble=False``)."""

    def __init__(self, state: "LiveState", events: list[dict]) -> None:
        super().__init__()
        self.state = state
        self.events = events


class MessagesChanged(Message, bubble=False):
    """A queue or quarantine action succeeded: posted to the app, which passes it
    down to the screens of the current mode; lists showing ``kind`` reload."""

    def __init__(self, kind: str, key: str, action: str) -> None:
        super().__init__()
        self.kind, self.key, self.action = kind, key, action
