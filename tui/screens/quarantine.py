"""The quarantine: the messages the policy kept back (queue state quarantine), with
their reason. Release delivers one (after a confirmation); delete drops it."""

from __future__ import annotations

from textual.binding import Binding

from ..widgets import QuarantineTable
from .messages import MessageDetailScreen, MessageListScreen


class QuarantineDetailScreen(MessageDetailScreen):
    BINDINGS = [Binding("h", "hold_message", "Release")]


class QuarantineScreen(MessageListScreen):
    KIND = "quarantine"
    TABLE = QuarantineTable
    DETAIL = QuarantineDetailScreen

    BINDINGS = [Binding("h", "hold_message", "Release")]
