"""Clients of the control socket (see ``control.py``): a blocking one for the CLI and
an asyncio one for the dashboard. Neither imports the engine."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, AsyncIterator

from mailbox_guard.control.server import MAX_REQUEST, PROTOCOL_VERSION, SOCKET_NAME


class EngineNotRunning(Exception):
    """No engine answers on the control socket of this home."""


class ControlCallError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def socket_path(home: Path) -> Path:
    return Path(home) / SOCKET_NAME


def _unwrap(reply: dict) -> Any:
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    raise ControlCallError(err.get("code", "failed"), err.get("message", "request failed"))


class ControlClient:
    """One request per call over a short-lived connection."""

    def __init__(self, home: Path, timeout: float = 10.0) -> None:
        self.path = socket_path(home)
        self.timeout = timeout
        self._next = 0

    def call(self, method: str, **params: Any) -> Any:
        self._next += 1
        line = json.dumps({"v": PROTOCOL_VERSION, "id": self._next, "method": method,
                           "params": params}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(line)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise EngineNotRunning(f"no engine is running with home {self.path.parent}") from None
        except PermissionError:
            raise ControlCallError("forbidden", f"no permission to open {self.path}") from None
        except socket.timeout:
            raise ControlCallError("timeout", "the engine did not answer in time") from None
        if not data:
            raise ControlCallError("closed", "the engine closed the control connection")
        return _unwrap(json.loads(data))


class AsyncControlClient:
    """A persistent connection for requests, plus separate subscription streams."""

    def __init__(self, home: Path, timeout: float = 10.0) -> None:
        self.path = socket_path(home)
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._next = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(str(self.path), limit=16 * MAX_REQUEST * 64)
        except (FileNotFoundError, ConnectionRefusedError):
            raise EngineNotRunning(f"no engine is running with home {self.path.parent}") from None
        except PermissionError:
            raise ControlCallError("forbidden", f"no permission to open {self.path}") from None

    async def call(self, method: str, **params: Any) -> Any:
        async with self._lock:
            for attempt in (0, 1):
                if self._writer is None or self._writer.is_closing():
                    self._reader, self._writer = await self._open()
                self._next += 1
                try:
                    self._writer.write(json.dumps({"v": PROTOCOL_VERSION, "id": self._next,
                                                   "method": method, "params": params}).encode() + b"\n")
                    async with asyncio.timeout(self.timeout):
                        await self._writer.drain()
                        line = await self._reader.readline()
                except (ConnectionError, OSError):
                    line = b""
                except BaseException:
                    # Cancelled or timed out between request and reply: the reply
                    # would be read by the next caller. Start afresh instead.
                    self.close()
                    raise
                if line:
                    return _unwrap(json.loads(line))
                self.close()
                if attempt:
                    raise EngineNotRunning("the engine closed the control connection")
        raise EngineNotRunning("unreachable")

    async def subscribe(self, topics: list[str] | None = None) -> AsyncIterator[dict]:
        reader, writer = await self._open()
        try:
            writer.write(json.dumps({"v": PROTOCOL_VERSION, "id": 0, "method": "subscribe",
                                     "params": {"topics": topics} if topics else {}}).encode() + b"\n")
            await writer.drain()
            _unwrap(json.loads(await reader.readline() or b'{"ok": false}'))
            while True:
                line = await reader.readline()
                if not line:
                    raise EngineNotRunning("the engine closed the event stream")
                yield json.loads(line)["event"]
        finally:
            writer.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
