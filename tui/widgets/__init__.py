"""Reusable dashboard widgets, each with its own DEFAULT_CSS."""

from .banner import EngineBanner
from .counts import QueueCounts
from .filterbar import FilterBar
from .rates import RateLine
from .tables import BanTable, ConnectionTable, KeyedTable, MessageTable, QuarantineTable
from .toplist import TopList
from .trace import VerdictTrace
from .viewbar import ViewBar

__all__ = ["BanTable", "EngineBanner", "QueueCounts", "FilterBar", "RateLine", "ConnectionTable", "KeyedTable",
           "MessageTable", "QuarantineTable", "TopList", "VerdictTrace", "ViewBar"]
