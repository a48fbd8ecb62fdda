"""An opt-in Prometheus endpoint (``serve --metrics HOST:PORT``): connections,
messages by outcome, check results, queue sizes, delivery attempts and latencies, in
the text exposition format, over a minimal HTTP/1.0 responder (GET /metrics only;
requests are size- and time-limited)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Callable

from mailbox_guard.queue import ops as q

if TYPE_CHECKING:   # pragma: no cover
    from mailbox_guard.events import Stats
    from mailbox_guard.store.db import Readers

log = logging.getLogger("mailbox_guard.metrics")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: "Stats", queue: dict[str, int], connections: int, connections_total: int) -> str:
    """The exposition text of one scrape."""
    lines = [
        "# HELP mailbox_guard_connections Live SMTP connections.",
        "# TYPE mailbox_guard_connections gauge",
        f"mailbox_guard_connections {connections}",
        "# HELP mailbox_guard_connections_total SMTP connections accepted since start.",
        "# TYPE mailbox_guard_connections_total counter",
        f"mailbox_guard_connections_total {connections_total}",
        "# HELP mailbox_guard_messages_total Messages and recipients by outcome since start.",
        "# TYPE mailbox_guard_messages_total counter",
    ]
    for outcome in stats.OUTCOMES:
        lines.append(f'mailbox_guard_messages_total{{outcome="{outcome}"}} {stats.totals.get(outcome, 0)}')
    lines += ["# HELP mailbox_guard_check_results_total Results of checks by symbol.",
              "# TYPE mailbox_guard_check_results_total counter"]
    for (check, symbol), n in sorted(stats.check_results.items()):
        lines.append(f'mailbox_guard_check_results_total{{check="{_label(check)}",symbol="{_label(symbol)}"}} {n}')
    lines += ["# HELP mailbox_guard_queue_messages Messages in the queue by state.",
              "# TYPE mailbox_guard_queue_messages gauge"]
    for st, n in queue.items():
        lines.append(f'mailbox_guard_queue_messages{{state="{st}"}} {n}')
    attempts = len(stats.delivery_seconds)
    lines += ["# HELP mailbox_guard_delivery_attempts_total Delivery attempts since start.",
              "# TYPE mailbox_guard_delivery_attempts_total counter",
              f"mailbox_guard_delivery_attempts_total {stats.delivery_attempts}",
              "# HELP mailbox_guard_delivery_seconds Time of recent delivery attempts.",
              "# TYPE mailbox_guard_delivery_seconds summary"]
    for quantile in (0.5, 0.9, 0.99):
        value = _quantile(stats.delivery_seconds, quantile)
        lines.append(f'mailbox_guard_delivery_seconds{{quantile="{quantile}"}} {value}')
    lines.append(f"mailbox_guard_delivery_seconds_count {attempts}")
    lines += ["# HELP mailbox_guard_commit_seconds Time from end of data to the durable commit.",
              "# TYPE mailbox_guard_commit_seconds summary"]
    for quantile in (0.5, 0.9, 0.99):
        lines.append(f'mailbox_guard_commit_seconds{{quantile="{quantile}"}} '
                     f'{_quantile(stats.commit_seconds, quantile)}')
    lines.append(f"mailbox_guard_commit_seconds_count {len(stats.commit_seconds)}")
    return "\n".join(lines) + "\n"


def _quantile(values, quantile: float) -> str:
    if not values:
        return "NaN"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(len(ordered) * quantile))]:.6f}"


class MetricsServer:
    """Serves :func:`render` from the engine's live counters (``stats``), its
    connection counts and the queue as the store's ``readers`` see it."""

    def __init__(self, host: str, port: int, *, stats: "Stats", readers: "Readers",
                 connections: Callable[[], int], connections_total: Callable[[], int]) -> None:
        self.host, self.port = host, port
        self.stats = stats
        self.readers = readers
        self.connections = connections              # live SMTP connections
        self.connections_total = connections_total  # accepted since start
        self.server: asyncio.AbstractServer | None = None

    async def scrape(self) -> str:
        queue = await self.readers.run(q.counts_by_state)
        return render(self.stats, queue, self.connections(), self.connections_total())

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, limit=8192)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body = (await self.scrape()).encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            else:
                body = b"not found: try /metrics\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            # A scraper that was slow, went away or sent nonsense: nothing to answer.
            log.debug("metrics request dropped: %s", type(exc).__name__)
        finally:
            writer.close()
