"""The control socket: live actions on the running engine.

A UNIX socket in the home folder (mode 0660, group of the home folder, which is
0750) speaking newline-delimited JSON, version 1::

    -> {"v": 1, "id": 7, "method": "queue.hold", "params": {"id": "1A2B..."}}
    <- {"v": 1, "id": 7, "ok": true, "result": {...}}
    <- {"v": 1, "id": 7, "ok": false, "error": {"code": "forbidden", "message": "..."}}

``subscribe`` turns the connection into a stream of ``{"v": 1, "event": {...}}``
lines. The peer's uid comes from SO_PEERCRED: root and the engine's own user may
use every method; anyone else who can open the socket (its group) only the
read-only ones. A malformed or oversized request gets an error reply; nothing a
client sends can disturb the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from mailbox_guard.auth import bans
from mailbox_guard.queue import ops as q

if TYPE_CHECKING:   # pragma: no cover
    from mailbox_guard.engine import Engine

log = logging.getLogger("mailbox_guard.control")

PROTOCOL_VERSION = 1
SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 64              # in all; admins always get one of the ADMIN_RESERVE extra
ADMIN_RESERVE = 8
MAX_PER_UID = 16              # for a non-admin peer
IDLE_TIMEOUT = 300.0          # a request connection that says nothing for this long is closed

READ_ONLY = frozenset({"hello", "status", "connections", "queue.list", "queue.show", "stats",
                       "messages.why", "subscribe", "auth.bans"})
ADMIN = frozenset({"connections.kill", "queue.retry", "queue.hold", "queue.release", "queue.delete",
                   "queue.flush", "queue.bulk", "reload", "auth.unban"})


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


class ControlServer:
    """The engine's operator API on the control socket. Unlike the other parts it
    keeps the :class:`~mailbox_guard.engine.Engine` itself: its methods are requests
    to the running engine (``status``, ``live_connections``, ``kill_connection``,
    ``reload_policy``, the delivery loop's wake-up) besides the store's readers and
    writer, the events and the stats."""

    def __init__(self, engine: "Engine", path: Path) -> None:
        self.engine = engine
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task] = set()
        self.methods: dict[str, Callable[[dict], Awaitable[Any]]] = {
            "hello": self._hello, "status": self._status, "connections": self._connections,
            "queue.list": self._queue_list, "queue.show": self._queue_show, "stats": self._stats,
            "messages.why": self._why, "connections.kill": self._kill,
            "queue.retry": self._retry, "queue.hold": self._hold, "queue.release": self._release,
            "queue.delete": self._delete, "queue.flush": self._flush, "queue.bulk": self._bulk,
            "reload": self._reload,
            "auth.bans": self._bans, "auth.unban": self._unban,
        }
        assert set(self.methods) | {"subscribe"} == READ_ONLY | ADMIN

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()       # a stale socket: the engine lock says nobody else owns it
        old = os.umask(0o117)        # the socket is born 0660, never briefly wider
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                          limit=MAX_REQUEST + 2)
        finally:
            os.umask(old)
        home_gid = self.path.parent.stat().st_gid
        with contextlib.suppress(PermissionError):
            os.chown(self.path, -1, home_gid)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.clients):
            task.cancel()
        if self.clients:
            await asyncio.wait(list(self.clients), timeout=2)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ------------------------------------------------------------------ connection
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        sock = writer.get_extra_info("socket")
        try:
            _pid, uid, _gid = peer_credentials(sock)
        except OSError:
            writer.close()
            return
        admin = uid == 0 or uid == os.geteuid()
        # Read-only peers cannot crowd out the admin: a share per uid, and slots
        # kept for admins only.
        same_uid = sum(1 for t in self.clients if getattr(t, "mg_uid", None) == uid)
        if (len(self.clients) >= MAX_CLIENTS + (ADMIN_RESERVE if admin else 0)
                or (not admin and same_uid >= MAX_PER_UID)):
            await self._send(writer, {"v": PROTOCOL_VERSION, "ok": False,
                                      "error": {"code": "busy", "message": "too many control clients"}})
            writer.close()
            return
        task.mg_uid = uid          # type: ignore[attr-defined]
        self.clients.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        line = await reader.readuntil(b"\n")
                except TimeoutError:
                    return
                except asyncio.LimitOverrunError as exc:
                    await self._skip_line(reader, exc.consumed)
                    await self._reply(writer, None, error=("too_large",
                                      f"request longer than {MAX_REQUEST} bytes"))
                    continue
                except asyncio.IncompleteReadError:
                    return
                request_id, method, params = None, None, {}
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    request_id = request.get("id")
                    if request.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
                        raise ControlError("version", f"protocol version {PROTOCOL_VERSION} only")
                    method = request.get("method")
                    params = request.get("params") or {}
                    if not isinstance(method, str) or not isinstance(params, dict):
                        raise ValueError("method must be a string and params an object")
                except ControlError as exc:
                    await self._reply(writer, request_id, error=(exc.code, exc.message))
                    continue
                except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                    await self._reply(writer, request_id, error=("bad_request",
                                      f"not a valid request: {type(exc).__name__}"))
                    continue
                if method not in READ_ONLY and method not in ADMIN:
                    await self._reply(writer, request_id, error=("unknown_method", f"no method {method[:64]!r}"))
                    continue
                if method in ADMIN and not admin:
                    await self._reply(writer, request_id, error=(
                        "forbidden", f"{method} needs root or the engine's user (uid {os.geteuid()})"))
                    continue
                if method == "subscribe":
                    await self._subscribe(writer, request_id, params)
                    return
                try:
                    result = await self.methods[method](params)
                except ControlError as exc:
                    await self._reply(writer, request_id, error=(exc.code, exc.message))
                except (TypeError, ValueError) as exc:     # a parameter of the wrong kind
                    await self._reply(writer, request_id, error=("bad_request", f"bad parameter: {exc}"))
                except q.QueueActionError as exc:
                    await self._reply(writer, request_id, error=("failed", str(exc)))
                except Exception as exc:      # a bug: reported, logged, the engine goes on
                    log.exception("control method %s failed", method)
                    await self._reply(writer, request_id, error=("internal", type(exc).__name__))
                else:
                    await self._reply(writer, request_id, result=result)
        except ConnectionError as exc:
            log.debug("control client went away: %s", exc)
        except asyncio.CancelledError:
            log.debug("control client closed at shutdown")
        finally:
            self.clients.discard(task)
            writer.close()

    async def _skip_line(self, reader: asyncio.StreamReader, consumed: int) -> None:
        await reader.read(consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as more:
                await reader.read(more.consumed)

    async def _send(self, writer: asyncio.StreamWriter, obj: dict) -> None:
        writer.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
        await writer.drain()

    async def _reply(self, writer, request_id, *, result: Any = None, error: tuple[str, str] | None = None) -> None:
        if error is not None:
            await self._send(writer, {"v": PROTOCOL_VERSION, "id": request_id, "ok": False,
                                      "error": {"code": error[0], "message": error[1]}})
        else:
            await self._send(writer, {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result})

    async def _subscribe(self, writer: asyncio.StreamWriter, request_id, params: dict) -> None:
        topics = params.get("topics")
        if topics is not None and (not isinstance(topics, list) or not set(topics) <= self.engine.events.TOPICS):
            await self._reply(writer, request_id, error=("bad_request",
                              f"topics must be a list of {sorted(self.engine.events.TOPICS)}"))
            return
        sub = self.engine.events.subscribe(set(topics) if topics else None)
        try:
            await self._reply(writer, request_id, result={"subscribed": sorted(sub.topics)})
            while True:
                event = await sub.get()
                await self._send(writer, {"v": PROTOCOL_VERSION, "event": event})
        finally:
            sub.close()

    # ------------------------------------------------------------------ methods
    @staticmethod
    def _id(params: dict) -> str:
        value = params.get("id")
        if not isinstance(value, str) or not value or len(value) > 300:
            raise ControlError("bad_request", "params.id (a string) is required")
        return value

    async def _hello(self, params: dict) -> dict:
        return {"protocol": PROTOCOL_VERSION, "methods": sorted(READ_ONLY | ADMIN)}

    async def _status(self, params: dict) -> dict:
        return await self.engine.status()

    async def _connections(self, params: dict) -> list[dict]:
        return self.engine.live_connections()

    async def _stats(self, params: dict) -> dict:
        minutes = params.get("minutes", 30)
        if not isinstance(minutes, int) or isinstance(minutes, bool) or not 1 <= minutes <= 60:
            raise ControlError("bad_request", "minutes must be an integer from 1 to 60")
        return self.engine.stats.snapshot(minutes)

    async def _queue_list(self, params: dict) -> list[dict]:
        states = params.get("states")
        if states is not None and (not isinstance(states, list) or not all(isinstance(s, str) for s in states)):
            raise ControlError("bad_request", "states must be a list of strings")
        search = str(params.get("search") or "")[:200]
        limit = params.get("limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise ControlError("bad_request", "limit must be an integer")
        limit = max(1, min(limit, 10000))
        return await self.engine.readers.run(lambda c: q.list_messages(c, states=states, search=search,
                                                                          limit=limit))

    async def _queue_show(self, params: dict) -> dict:
        key = self._id(params)
        detail = await self.engine.readers.run(lambda c: q.find_detail(c, key))
        if detail is None:
            raise ControlError("not_found", f"no message {key}")
        return detail

    async def _why(self, params: dict) -> dict:
        key = self._id(params)
        found = await self.engine.readers.run(lambda c: q.explain(c, key))
        if found is None:
            raise ControlError("not_found", f"no message, connection or address {key}")
        return found

    async def _kill(self, params: dict) -> dict:
        if not self.engine.kill_connection(self._id(params)):
            raise ControlError("not_found", f"no live connection {params.get('id')}")
        return {"killed": params["id"]}

    async def _queue_action(self, fn, *args, **kwargs) -> Any:
        result = await self.engine.writer.run(fn, *args, **kwargs)
        if self.engine.delivery is not None:
            self.engine.delivery.kick()
        return result

    async def _retry(self, params: dict) -> dict:
        key = self._id(params)
        await self._queue_action(q.retry_now, key.upper(), time.time())
        return {"retry": key.upper()}

    async def _flush(self, params: dict) -> dict:
        return {"flushed": await self._queue_action(q.flush, time.time())}

    async def _hold(self, params: dict) -> dict:
        key = self._id(params)
        await self._queue_action(q.hold, key.upper())
        return {"held": key.upper()}

    async def _release(self, params: dict) -> dict:
        key = self._id(params)
        await self._queue_action(q.release, key.upper(), time.time())
        return {"released": key.upper()}

    async def _delete(self, params: dict) -> dict:
        key = self._id(params)
        await self._queue_action(q.delete, key.upper())
        return {"deleted": key.upper()}

    async def _bulk(self, params: dict) -> dict:
        """``{"action": "delete"|"hold"|"release"|"retry", "states": [...], "to_domain": D}``"""
        action, states, to_domain = params.get("action"), params.get("states"), params.get("to_domain")
        if action not in q.BULK_STATES:
            raise ControlError("bad_request", f"action must be one of {', '.join(q.BULK_STATES)}")
        if states is not None and (not isinstance(states, list) or not all(isinstance(s, str) for s in states)):
            raise ControlError("bad_request", "states must be a list of strings")
        if to_domain is not None and (not isinstance(to_domain, str) or len(to_domain) > 255):
            raise ControlError("bad_request", "to_domain must be a domain name")
        ids = await self._queue_action(q.bulk, action, now=time.time(), states=states, to_domain=to_domain)
        return {"action": action, "ids": ids}

    async def _reload(self, params: dict) -> dict:
        changed = await self.engine.reload_policy()
        return {"changed": changed, "policy_version": self.engine.policy.version}

    async def _bans(self, params: dict) -> list[dict]:
        now = time.time()
        return await self.engine.readers.run(lambda c: bans.active(c, now))

    async def _unban(self, params: dict) -> dict:
        key = self._id(params)
        if not await self.engine.writer.run(bans.remove, key):
            raise ControlError("not_found", f"no ban for {key}")
        await self.engine.reload_policy()
        return {"unbanned": key}
