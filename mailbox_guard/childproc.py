"""Helper processes of the engine (the store writer, the delivery agent): how one is
started, and the framed, pickled stream between it and the engine.

A helper is ``sys.executable -c CODE FD ...`` with one end of a socket pair as FD
and the engine's import path, so it runs the same code whether the engine runs from
a ``.pyz``, a source tree or a venv. Frames are a 4-byte length and a pickle; both
ends are this program, and the socket pair is reachable by nobody else. A helper
exits when its end of the pair closes: it never outlives the engine, however the
engine ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from typing import Any, Callable

_HEAD = struct.Struct("!I")
MAX_FRAME = 1 << 30


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(data)) + data


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> Any:
    """One frame from a blocking socket; None at the end of the stream."""
    head = _read_exact(sock, _HEAD.size)
    if head is None:
        return None
    (size,) = _HEAD.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    data = _read_exact(sock, size)
    return None if data is None else pickle.loads(data)


def split_frames(buf: bytearray) -> list[Any]:
    """Every whole frame at the start of ``buf`` (taken out of it)."""
    out = []
    while len(buf) >= _HEAD.size:
        (size,) = _HEAD.unpack_from(buf)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes")
        if len(buf) < _HEAD.size + size:
            break
        out.append(pickle.loads(bytes(buf[_HEAD.size:_HEAD.size + size])))
        del buf[:_HEAD.size + size]
    return out


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else an error that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def ignore_stop_signals() -> None:
    """In a helper: SIGTERM, SIGINT and SIGHUP are for the engine. systemd's stop
    signals the whole control group and a terminal's Ctrl-C the whole process group;
    a helper that died with them would take the engine's last commits (or the
    deliveries in flight) with it. It ends when the engine closes its socket."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def spawn(code: str, *args: str) -> tuple[subprocess.Popen, socket.socket]:
    """Start ``python -c code FD *args``; returns the process and the engine's end."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    # Where this process found its code (a .pyz, a source tree, a venv): the child
    # imports the same.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, str(child.fileno()), *args],
                                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env, close_fds=True)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


def reap(proc: subprocess.Popen | None, timeout: float) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Pending:
    """Requests sent to a helper and not answered yet, by id."""

    def __init__(self) -> None:
        self._futures: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)

    def __bool__(self) -> bool:
        return bool(self._futures)

    def add(self) -> tuple[int, asyncio.Future]:
        future = asyncio.get_running_loop().create_future()
        request_id = next(self._ids)
        self._futures[request_id] = future
        return request_id, future

    def drop(self, request_id: int) -> None:
        self._futures.pop(request_id, None)

    def settle(self, request_id: int, value: Any = None, error: BaseException | None = None) -> None:
        future = self._futures.pop(request_id, None)
        if future is None or future.done():       # its caller went away meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def fail_all(self, exc: BaseException | None = None, value: Any = None) -> None:
        """Every request still waiting: ``exc`` raised in it, or else ``value`` its answer."""
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(value)


class Channel:
    """The engine's end of a helper's socket, on the event loop: frames sent in one
    write per turn of the loop, answers handed to ``on_frame``, and ``on_lost`` once
    when the helper is gone."""

    def __init__(self, sock: socket.socket, on_frame: Callable[[Any], None],
                 on_lost: Callable[[BaseException | None], None]) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._unsent = b""
        self._scheduled = False
        self._waiting = False         # for the socket to take more
        self._inbuf = bytearray()
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def open(self) -> bool:
        return self.sock is not None

    def send(self, obj: Any) -> None:
        self._out.append(frame(obj))
        if not self._scheduled:
            # What every task that gets here in the same turn of the loop sends
            # leaves in one write.
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.sock is None:
            return
        if self._out:
            self._unsent += b"".join(self._out)
            self._out.clear()
        if not self._waiting:         # else the socket's writable callback sends it
            self._write()

    def _write(self) -> None:
        try:
            sent = self.sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.lost(exc)
            return
        self._unsent = self._unsent[sent:]
        if self._unsent and not self._waiting:
            self._waiting = True
            self._loop.add_writer(self.sock.fileno(), self._write)
        elif not self._unsent and self._waiting:
            self._waiting = False
            self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        if self.sock is None:
            return
        try:
            chunk = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lost(exc)
            return
        if not chunk:
            self.lost(None)
            return
        self._inbuf += chunk
        try:
            frames = split_frames(self._inbuf)
        except Exception as exc:      # a helper that sends garbage is as good as gone
            self.lost(exc)
            return
        for f in frames:
            self._on_frame(f)

    def detach(self) -> socket.socket | None:
        """Stop watching the socket and hand it back, blocking, with whatever was
        not sent yet already sent (for a last exchange at shutdown)."""
        sock, self.sock = self.sock, None
        if sock is None:
            return None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
        sock.settimeout(10.0)
        with contextlib.suppress(OSError):
            sock.sendall(self._unsent + b"".join(self._out))
        self._out.clear()
        self._unsent = b""
        return sock

    def lost(self, exc: BaseException | None) -> None:
        sock = self.detach()
        if sock is not None:
            sock.close()
            self._on_lost(exc)
