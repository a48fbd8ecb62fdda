"""One screen per view: dashboard, connections, queue (and message detail),
quarantine, events, bans, help, and the confirmation modal."""

from .bans import BansScreen
from .confirm import ConfirmScreen
from .connections import ConnectionsScreen
from .dashboard import DashboardScreen
from .events import EventsScreen
from .help import HelpScreen
from .messages import MessageDetailScreen, MessageListScreen
from .quarantine import QuarantineScreen
from .queue import QueueScreen

__all__ = ["BansScreen", "ConfirmScreen", "ConnectionsScreen", "DashboardScreen", "EventsScreen", "HelpScreen",
           "MessageDetailScreen", "MessageListScreen", "QuarantineScreen", "QueueScreen"]
