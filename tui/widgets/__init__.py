"""Reusable dashboard widgets, each with its own DEFAULT_CSS."""

from mailbox_guard.banner import EngineBanner
from mailbox_guard.counts import QueueCounts
from mailbox_guard.filterbar import FilterBar
from mailbox_guard.rates import RateLine
from mailbox_guard.tables import BanTable, ConnectionTable, KeyedTable, MessageTable
from mailbox_guard.toplist import TopList
from mailbox_guard.trace import VerdictTrace
from mailbox_guard.viewbar import ViewBar

__all__ = ["BanTable", "EngineBanner", "QueueCounts", "FilterBar", "RateLine", "ConnectionTable", "KeyedTable",
           "MessageTable", "TopList", "VerdictTrace", "ViewBar"]
