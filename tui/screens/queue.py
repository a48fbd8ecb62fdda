"""The queue: every message the engine holds, by state, with its verdict trace."""

from __future__ import annotations

from .messages import MessageListScreen


class QueueScreen(MessageListScreen):
    KIND = "queue"
