"""One screen per view: dashboard, connections, queue (and message detail),
quarantine, events, bans, help, and the confirmation modal."""

from mailbox_guard.bans import BansScreen
from mailbox_guard.confirm import ConfirmScreen
from mailbox_guard.connections import ConnectionsScreen
from mailbox_guard.dashboard import DashboardScreen
from mailbox_guard.events import EventsScreen
from mailbox_guard.help import HelpScreen
from mailbox_guard.messages import MessageDetailScreen, MessageListScreen
from mailbox_guard.quarantine import QuarantineScreen
from mailbox_guard.queue.ops import QueueScreen

__all__ = ["BansScreen", "ConfirmScreen", "ConnectionsScreen", "DashboardScreen", "EventsScreen", "HelpScreen",
           "MessageDetailScreen", "MessageListScreen", "QuarantineScreen", "QueueScreen"]
