"""Where the dashboard's data comes from.

:class:`Source` is the interface the feed and the screens use; :class:`EngineSource`
implements it with the engine's control socket (:mod:`mailbox_guard.control.client`)
and, when the engine is down, a read-only connection to the store opened in a worker
thread (sqlite calls block; they never run on the event loop): the queue, and the
brute-force bans in force (``auth_bans``). Tests substitute a frozen source to take
deterministic snapshots.

Every failure to reach the engine surfaces as :class:`EngineNotRunning`, whatever
the cause (no socket, refused, no permission, no answer in time), so callers have
one case to handle.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from mailbox_guard.queue import ops as q
from mailbox_guard.queue import states as st
from mailbox_guard.control.client import AsyncControlClient, ControlCallError, EngineNotRunning
from mailbox_guard.store.db import DB_NAME, StoreError, connect
from mailbox_guard.auth import bans

__all__ = ["Source", "EngineSource", "MessagePage", "MessageKind", "StoreUnavailable", "EngineNotRunning",
           "ControlCallError", "KINDS"]

CALL_TIMEOUT = 5.0
BAN_FIELDS = bans.COLUMNS     # as ``auth.bans`` answers


class StoreUnavailable(Exception):
    """The store cannot be read (missing, locked, unreadable); one line for the banner."""


@dataclass
class MessagePage:
    """One listing of messages and where it came from ("engine", "store" or "none")."""
    rows: list[dict]
    origin: str
    note: str = ""


@dataclass(frozen=True)
class MessageKind:
    """A list of messages an operator acts on: the queue, and the quarantine (the
    messages in queue state quarantine). ``states`` are those the list shows (its
    "all"); ``actions`` maps the screens' verbs to control methods; a verb not listed
    is not offered."""
    name: str
    title: str
    states: tuple[str, ...]
    actions: dict[str, str]
    empty_note: str = ""


KINDS = {
    "queue": MessageKind(
        "queue", "Queue", tuple(s for s in st.ALL if s != st.QUARANTINE),
        {"retry": "queue.retry", "hold": "queue.hold", "release": "queue.release",
         "delete": "queue.delete"}),
    "quarantine": MessageKind(
        "quarantine", "Quarantine", (st.QUARANTINE,),
        {"release": "queue.release", "delete": "queue.delete"},
        "Nothing is in quarantine: what the policy keeps back (actions.quarantine) is listed here "
        "with its reason."),
}


def _retrieve(task: asyncio.Future) -> None:
    """Collect the outcome of a request nobody waits for any more."""
    if not task.cancelled():
        task.exception()


class Source:
    """The dashboard's view of one home. Subclasses talk to a real engine or to
    frozen data."""

    home: Path

    async def status(self) -> dict:
        raise NotImplementedError

    async def connections(self) -> list[dict]:
        raise NotImplementedError

    async def stats(self, minutes: int = 30) -> dict:
        raise NotImplementedError

    def events(self, topics: list[str] | None = None) -> AsyncIterator[dict]:
        raise NotImplementedError

    async def action(self, method: str, **params: Any) -> Any:
        """An admin request to the running engine (kill, retry, hold, delete...)."""
        raise NotImplementedError

    async def store_counts(self) -> dict[str, int]:
        """Queue counts by state straight from the store (engine down)."""
        raise NotImplementedError

    async def bans(self) -> list[dict]:
        """The brute-force bans in force, from the engine (``auth.bans``): dicts with
        kind ('ip' or 'user'), key, until, failures, created_at."""
        raise NotImplementedError

    async def store_bans(self, now: float) -> list[dict]:
        """The same, straight from the store (engine down): rows with ``until > now``."""
        raise NotImplementedError

    async def list_messages(self, kind: str, *, states: list[str] | None = None, search: str = "",
                            limit: int = 500) -> MessagePage:
        raise NotImplementedError

    async def show_message(self, kind: str, key: str) -> dict | None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class EngineSource(Source):
    def __init__(self, home: Path, *, timeout: float = CALL_TIMEOUT) -> None:
        self.home = Path(home)
        self.timeout = timeout
        self.client = AsyncControlClient(self.home)
        self._requests: set[asyncio.Task] = set()     # run on when their caller goes
        self._closed = False

    # ------------------------------------------------------------ control socket
    async def call(self, method: str, **params: Any) -> Any:
        # The client shares one connection and reads replies in order: a request cut
        # in half by a caller's cancellation (a reload superseding another) would
        # leave its reply to the next caller. So each request runs to the end in its
        # own task, and a caller that goes away simply stops waiting for it.
        if self._closed:
            raise EngineNotRunning("the dashboard is closing")
        task = asyncio.ensure_future(self._call(method, params))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retrieve)
            raise

    async def _call(self, method: str, params: dict) -> Any:
        try:
            return await asyncio.wait_for(self.client.call(method, **params), self.timeout)
        except asyncio.TimeoutError:
            # The reply may still arrive later: start over on a fresh connection so
            # the next request does not read it.
            self.client.close()
            raise EngineNotRunning(f"the engine did not answer within {self.timeout:g} s") from None
        except PermissionError:
            raise EngineNotRunning(f"no permission to open {self.client.path}") from None
        except (OSError, ValueError) as exc:     # reset mid-reply, garbled line
            self.client.close()
            raise EngineNotRunning(f"lost the control connection ({exc})") from None

    async def status(self) -> dict:
        return await self.call("status")

    async def connections(self) -> list[dict]:
        return await self.call("connections")

    async def stats(self, minutes: int = 30) -> dict:
        return await self.call("stats", minutes=minutes)

    async def events(self, topics: list[str] | None = None) -> AsyncIterator[dict]:
        stream = self.client.subscribe(topics)
        try:
            async for event in stream:
                yield event
        except PermissionError:
            raise EngineNotRunning(f"no permission to open {self.client.path}") from None
        except (OSError, ValueError) as exc:
            raise EngineNotRunning(f"lost the event stream ({exc})") from None
        finally:
            await stream.aclose()

    async def action(self, method: str, **params: Any) -> Any:
        return await self.call(method, **params)

    # ------------------------------------------------------------ the store
    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        path = self.home / DB_NAME
        if not path.exists():
            raise StoreUnavailable(f"no store at {path}")
        try:
            conn = connect(path, readonly=True)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot read the store: {exc}") from None
        finally:
            conn.close()

    async def read_store(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await asyncio.to_thread(self._read, fn)

    async def store_counts(self) -> dict[str, int]:
        return await self.read_store(q.counts_by_state)

    # ------------------------------------------------------------ bans
    async def bans(self) -> list[dict]:
        return await self.call("auth.bans")

    async def store_bans(self, now: float) -> list[dict]:
        return await self.read_store(lambda c: bans.active(c, now))

    # ------------------------------------------------------------ messages
    async def list_messages(self, kind: str, *, states: list[str] | None = None, search: str = "",
                            limit: int = 500) -> MessagePage:
        # Never wider than the kind: the queue's "all" is not the quarantine.
        wanted = [s for s in (states or KINDS[kind].states) if s in KINDS[kind].states]
        params: dict[str, Any] = {"search": search, "limit": limit, "states": wanted}
        try:
            page = MessagePage(await self.call("queue.list", **params), "engine")
        except EngineNotRunning:
            rows = await self.read_store(
                lambda c: q.list_messages(c, states=wanted, search=search, limit=limit))
            page = MessagePage(rows, "store")
        page.note = KINDS[kind].empty_note
        return page

    async def show_message(self, kind: str, key: str) -> dict | None:
        try:
            return await self.call("queue.show", id=key)
        except ControlCallError as exc:
            if exc.code == "not_found":
                return None
            raise
        except EngineNotRunning:
            def read(c: sqlite3.Connection) -> dict | None:
                found = q.find_message(c, key)
                return q.message_detail(c, found) if found else None
            return await self.read_store(read)

    async def close(self) -> None:
        # A request still running (its caller gone) would open the connection again
        # after this close, and nobody would close it: end them first.
        self._closed = True
        requests = list(self._requests)
        for task in requests:
            task.cancel()
        if requests:
            await asyncio.gather(*requests, return_exceptions=True)
        self.client.close()
