"""The quarantine, in the queue's shape. It is filled by the scanning issue; until
the engine offers ``quarantine.*`` control methods the list is empty and says why."""

from __future__ import annotations

from .messages import MessageListScreen


class QuarantineScreen(MessageListScreen):
    KIND = "quarantine"
