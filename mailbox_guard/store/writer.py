"""The store writer: one process of its own that owns the write connection and
commits in groups.

Every statement SQLite steps releases the GIL, and a thread taking it back from a
busy event loop waits: measured here, a writer thread in the engine's process spent
four fifths of each group commit waiting for the GIL, and every 250 after DATA
waited with it. In a process of its own the writer runs on the other core and its
commits take what SQLite and fsync take (Postfix splits smtpd and its queue the same
way).

``await writer.run(fn, *args, **kwargs)`` runs ``fn(conn, *args, **kwargs)`` in the writer process,
inside a transaction shared with every other job queued meanwhile, and returns (the
result, or raises the job's exception) only after COMMIT and the fsync of the WAL
that covers it succeeded (the fsync is pipelined: see ``_Committer``). ``fn``
is a module-level function and ``args`` and the result are plain data: they cross
a socket, pickled. Each job has its own savepoint when one of a batch fails, so one
failing job does not spoil the others; a failed COMMIT (disk full, read-only, locked
past the timeout) fails every job in it.

``await writer.run_many(many, item)`` is a job of a kind the writer runs in bulk:
the jobs of one batch with the same ``many`` go to one call ``many(conn, [item,
...])`` (a result per item, in order), at the place of the first of them: the
messages of ten sessions are four multi-row INSERTs, not forty statements. Only for
jobs that depend on no other job of their batch (new messages, the end of a delivery
attempt).

``lazy=True`` (the end of a delivery attempt): the job needs no fsync of its own. A
batch of lazy jobs only is answered at its COMMIT, without waiting for an fsync:
safe from a crash of any process (the WAL is in the page cache), and made durable
on disk by the next fsync (every batch with a new message in it: its 250 waits for
that fsync, which covers the WAL before it). Only a power loss can undo such a batch, and
then the message is delivered again (at worst a duplicate, never a loss, as with
any lease). A finished delivery then costs no fsync of its own.

The process dies with the engine: it exits when its socket closes (the engine ended,
however it ended), after the commit under way. Jobs sent to a writer that died fail
with ``sqlite3.OperationalError`` and the next job starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from mailbox_guard import childproc
from mailbox_guard.store.db import StoreError, connect

log = logging.getLogger("mailbox_guard.store")

_CODE = "from mailbox_guard.store.writer import child_main; child_main()"
_START_TIMEOUT = 60.0


# --------------------------------------------------------------------- the engine's side
class Writer:
    """The engine's handle on the writer process (see the module's text)."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0) -> None:
        self._path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None          # until the loop takes it over
        self._channel: childproc.Channel | None = None
        self._pending = childproc.Pending()
        self._closed = False
        self.commits = 0
        self.failures = 0
        self.fsyncs = 0

    # ------------------------------------------------------------------ process
    def start(self) -> "Writer":
        """Start the writer process and wait until it has opened the store (a store
        it cannot open is a StoreError here, at start-up)."""
        try:
            self._proc, sock = childproc.spawn(_CODE, self._path, repr(self._busy_timeout))
        except OSError as exc:
            raise StoreError(f"cannot start the store writer: {exc}") from None
        sock.settimeout(_START_TIMEOUT)
        try:
            first = childproc.read_frame(sock)
        except (OSError, ValueError, pickle.PickleError) as exc:
            first = ("failed", f"no answer from the store writer ({exc})")
        if not first or first[0] != "ready":
            sock.close()
            childproc.reap(self._proc, 5.0)
            self._proc = None
            raise StoreError(first[1] if first else "the store writer ended while starting")
        self._sock = sock
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def close(self) -> None:
        """Let the writer commit what it was sent, then stop it (blocking)."""
        self._closed = True
        channel, self._channel = self._channel, None
        sock = channel.detach() if channel is not None else self._sock
        self._sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(30.0)
                sock.sendall(childproc.frame(None))
                # Its answers to what was still pending, then its end.
                while self._pending:
                    answer = childproc.read_frame(sock)
                    if answer is None:
                        break
                    self._answer(answer)
            sock.close()
        childproc.reap(self._proc, 30.0)
        self._proc = None
        self._pending.fail_all(sqlite3.OperationalError("the store writer has stopped"))

    # ------------------------------------------------------------------ jobs
    def set_busy_timeout(self, seconds: float) -> None:
        self._send(None, _set_busy_timeout, ((seconds,), {}), False)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self._submit(fn, (args, kwargs), False)

    async def run_many(self, many: Callable[[sqlite3.Connection, list], list], item: Any, *,
                       lazy: bool = False) -> Any:
        return await self._submit(many, item, True, lazy)

    async def _submit(self, fn, payload, many: bool, lazy: bool = False) -> Any:
        job_id, future = self._pending.add()
        try:
            self._send(job_id, fn, payload, many, lazy)
        except BaseException:
            self._pending.drop(job_id)
            raise
        return await future

    def _send(self, job_id: int | None, fn, payload, many: bool, lazy: bool = False) -> None:
        if self._closed:
            raise sqlite3.OperationalError("the store writer has stopped")
        if self._channel is None or not self._channel.open:
            if self._sock is None:        # the writer died: a new one
                log.error("store writer ended unexpectedly; starting a new one")
                childproc.reap(self._proc, 1.0)
                self.start()
            sock, self._sock = self._sock, None
            self._channel = childproc.Channel(sock, self._answer, self._lost)
        self._channel.send((job_id, fn, payload, many, lazy))

    def _answer(self, answer) -> None:
        results, self.commits, self.failures, self.fsyncs = answer
        for job_id, value, error in results:
            self._pending.settle(job_id, value, error)

    def _lost(self, exc: BaseException | None) -> None:
        """The writer process is gone: what it had not answered fails (each caller
        answers 451 or retries); the next job starts a new writer."""
        if not self._closed:
            log.error("store writer connection lost%s", f": {exc}" if exc else "")
        self._pending.fail_all(sqlite3.OperationalError("the store writer stopped before it committed"))


def _set_busy_timeout(conn: sqlite3.Connection, seconds: float) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")


# --------------------------------------------------------------------- the writer process
class _Job:
    __slots__ = ("id", "fn", "payload", "many", "lazy")

    def __init__(self, job_id: int | None, fn, payload, many: bool, lazy: bool = False) -> None:
        self.id, self.fn, self.payload, self.many, self.lazy = job_id, fn, payload, many, lazy

    def run_alone(self, conn: sqlite3.Connection) -> Any:
        if self.many:
            return self.fn(conn, [self.payload])[0]
        args, kwargs = self.payload
        return self.fn(conn, *args, **kwargs)


class _Committer:
    """The group commit, in the writer process: a batch is every job that arrived
    while the one before committed.

    Durability is split from the commit (a pipelined group commit). The write
    connection commits with ``synchronous=OFF``: COMMIT appends the batch to the WAL
    and returns, with no fsync. The batch's answers then wait for the fsync thread,
    which fsyncs the WAL file and only then sends them, while the next batch
    already runs. One fsync covers every batch committed before it began, so under
    load several batches share one, and no batch waits behind another's fsync.
    This is what ``synchronous=FULL`` promises (the WAL on disk before COMMIT is
    answered), kept by us: a job is answered only after the fsync that covers its
    commit. A batch of lazy jobs only is answered at its commit (as NORMAL would:
    safe from any process crash; made durable by the next fsync).

    Checkpoints run on a connection of their own with ``synchronous=FULL`` (the WAL
    is fsynced before pages are copied, the database file after), so a checkpoint
    never copies what is not yet on disk. An fsync that fails leaves the WAL in an
    unknown state (Linux may drop the pages it could not write and report success
    the next time): the jobs waiting for it fail, and the writer process exits, so
    the next job starts a new writer that reads the store afresh.
    """

    MAX_BATCH = 256
    CHECKPOINT_INTERVAL = 0.5
    _READ = 1 << 20

    def __init__(self, conn: sqlite3.Connection, path: str, busy_timeout: float,
                 sock: socket.socket, answer: Callable[[list], None]) -> None:
        self._conn = conn
        self._path = path
        self._busy_timeout = busy_timeout
        self._sock = sock
        self._inbuf = bytearray()
        self._ready: list[_Job | None] = []
        self._answer = answer
        self.commits = 0
        self.failures = 0
        self.fsyncs = 0
        # Checkpoints copy the WAL into the database file and fsync it: done by the
        # committing connection they would stall whichever client's commit crosses
        # the threshold. A separate thread checkpoints instead (PASSIVE: it never
        # blocks the writer), so commit latency is one WAL append and one fsync.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA synchronous = OFF")
        # Statement journals and the ephemeral tables of UPDATE ... FROM (VALUES ...)
        # in memory: as files (SQLite's default) each was a file created, written and
        # unlinked in /var/tmp, about every sixth message, and half the writer's
        # system time. The writer's statements touch a few hundred rows at most.
        conn.execute("PRAGMA temp_store = MEMORY")
        if conn.execute("PRAGMA synchronous").fetchone()[0] != 0:
            raise StoreError(f"store {path}: the writer cannot take over the WAL's fsync")
        self._wal_path = path + "-wal"
        self._wal_fd = -1
        self._open_wal()
        self._unsynced: list = []              # answers waiting for the next fsync
        self._sync_cond = threading.Condition()
        self._sync_stop = False
        self._syncer = threading.Thread(target=self._sync_main, name="store-fsync", daemon=True)
        self._syncer.start()
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_main, name="store-checkpoint",
                                              daemon=True)
        self._checkpointer.start()

    # ------------------------------------------------------------------ durability
    def _open_wal(self) -> None:
        """The WAL file's descriptor for our fsyncs (the same inode SQLite writes: a
        new one if the file was replaced). Its folder is fsynced once, so that the
        file's name is on disk as well."""
        fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
        folder = os.open(os.path.dirname(self._wal_path) or ".", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
        self._wal_fd = fd

    def _fsync_wal(self) -> None:
        try:
            same = os.stat(self._wal_path).st_ino == os.fstat(self._wal_fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self._open_wal()
        os.fsync(self._wal_fd)
        self.fsyncs += 1

    def _sync_main(self) -> None:
        while True:
            with self._sync_cond:
                while not self._unsynced and not self._sync_stop:
                    self._sync_cond.wait()
                if not self._unsynced:
                    return
                answers, self._unsynced = self._unsynced, []
            try:
                self._fsync_wal()
            except OSError as exc:
                log.critical("fsync of the WAL failed (%s): %d job(s) fail; the writer stops", exc,
                             len(answers))
                self.failures += sum(1 for _, _, error in answers if error is None)
                self._answer([(job_id, None, sqlite3.OperationalError(f"fsync of the store failed: {exc}"))
                              for job_id, _, _ in answers])
                os._exit(3)          # the engine sees the writer gone and starts a new one
                return               # (not reached)
            self._answer(answers)

    def _after_commit(self, answers: list, durable: bool) -> None:
        if not durable:
            self._answer(answers)
            return
        with self._sync_cond:
            self._unsynced.extend(answers)
            self._sync_cond.notify()

    def stop_syncer(self) -> None:
        """Answer what waits for an fsync, then end the fsync thread."""
        with self._sync_cond:
            self._sync_stop = True
            self._sync_cond.notify()
        self._syncer.join()

    def _checkpoint_main(self) -> None:
        conn = connect(self._path, busy_timeout=self._busy_timeout)
        try:
            while not self._stop_checkpoints.wait(self.CHECKPOINT_INTERVAL):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:     # e.g. disk full: the next round retries
                    log.warning("checkpoint failed: %s", exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.close()

    def stop_checkpoints(self) -> None:
        self._stop_checkpoints.set()
        self._checkpointer.join()

    # ------------------------------------------------------------------ jobs
    def _receive(self, block: bool) -> bool:
        """Read what the engine sent (waiting for it if ``block``) into ready jobs;
        False at the end of the stream. The socket stays blocking (the fsync thread
        sends answers on it): a read that must not wait says so itself."""
        flags = 0 if block else socket.MSG_DONTWAIT
        while True:
            try:
                chunk = self._sock.recv(self._READ, flags)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                log.error("engine connection failed: %s", exc)
                return False
            if not chunk:
                return False
            self._inbuf += chunk
            try:
                frames = childproc.split_frames(self._inbuf)
            except (ValueError, pickle.PickleError, EOFError, AttributeError, ImportError) as exc:
                log.error("bad request from the engine: %s", exc)
                return False
            for f in frames:
                self._ready.append(None if f is None else _Job(*f))
            if frames:
                flags = socket.MSG_DONTWAIT       # more only if it is already here
            if len(self._ready) >= self.MAX_BATCH:
                return True

    def run(self) -> None:
        """Batches until the end of the stream (a None job, or the socket closed)."""
        conn = self._conn
        more = True
        while True:
            if more and len(self._ready) < self.MAX_BATCH:
                more = self._receive(block=not self._ready)
                if not more:
                    self._ready.append(None)      # the end, after what arrived before it
            batch: list[_Job] = []
            stop = False
            taken = 0
            for job in self._ready:
                taken += 1
                if job is None:
                    stop = True
                    break
                batch.append(job)
                if len(batch) >= self.MAX_BATCH:
                    break
            del self._ready[:taken]
            if batch:
                self._commit(conn, batch)
            if stop:
                return

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        # The usual batch has no failing job: run it without a savepoint per job (two
        # statements fewer per job). If a job fails, the transaction is rolled back
        # and the batch runs again job by job, each in its own savepoint, so that one
        # failing job does not spoil the others.
        outcomes = self._run_plain(conn, batch)
        if outcomes is not None:
            self._finish(conn, batch, outcomes)
            return
        outcomes = self._run_with_savepoints(conn, batch)
        if outcomes is not None:
            self._finish(conn, batch, outcomes)

    def _run_plain(self, conn: sqlite3.Connection, batch: list[_Job]) -> list | None:
        """Every job in one transaction, or None (rolled back) if any job failed."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return None          # the slow path reports it
        outcomes = []
        grouped: set = set()
        try:
            for i, job in enumerate(batch):
                if not job.many:
                    outcomes.append((job, job.run_alone(conn), None))
                elif job.fn not in grouped:
                    grouped.add(job.fn)
                    group = [j for j in batch[i:] if j.many and j.fn is job.fn]
                    results = job.fn(conn, [j.payload for j in group])
                    if len(results) != len(group):
                        raise RuntimeError(f"{job.fn.__name__} gave {len(results)} results for {len(group)} jobs")
                    outcomes.extend((j, r, None) for j, r in zip(group, results))
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return None
        if not conn.in_transaction:      # SQLite gave up the transaction by itself
            return None
        return outcomes

    def _run_with_savepoints(self, conn: sqlite3.Connection, batch: list[_Job]) -> list | None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail_all(batch, exc)
            return None
        for job in batch:
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back on its own (disk full,
                # I/O error): what follows would run outside it. Fail the batch.
                self._fail_all(batch, sqlite3.OperationalError("transaction rolled back by SQLite"))
                return None
            try:
                conn.execute("SAVEPOINT job")
                result = job.run_alone(conn)
                conn.execute("RELEASE job")
                outcomes.append((job, result, None))
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                outcomes.append((job, None, exc))
            except Exception as exc:  # a bug in a job: fail that job only, loudly
                log.exception("store job failed")
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                outcomes.append((job, None, exc))
        return outcomes

    def _finish(self, conn: sqlite3.Connection, batch: list[_Job], outcomes: list) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._fail_all(batch, exc)
            return
        self.commits += 1
        answers = []
        for job, result, error in outcomes:
            if error is not None:
                self.failures += 1
            if job.id is not None:
                answers.append((job.id, result, error))
        self._after_commit(answers, durable=not all(job.lazy for job in batch))

    def _fail_all(self, batch: list[_Job], exc: BaseException) -> None:
        self.failures += len(batch)
        log.error("store commit failed for %d job(s): %s", len(batch), exc)
        self._answer([(job.id, None, exc) for job in batch if job.id is not None])


def child_main() -> None:
    """The writer process: ``python -c ... FD PATH BUSY_TIMEOUT`` (Writer.start)."""
    childproc.ignore_stop_signals()
    fd, path, busy_timeout = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: store writer: %(message)s")
    sock = socket.socket(fileno=fd)
    send_lock = threading.Lock()

    def send(obj) -> None:
        data = childproc.frame(obj)
        with send_lock:
            sock.sendall(data)

    try:
        conn = connect(path, busy_timeout=busy_timeout)
    except StoreError as exc:
        send(("failed", str(exc)))
        sys.exit(1)
    committer: _Committer | None = None

    def answer(results: list) -> None:
        portable = [(i, v, None if e is None else childproc.portable_error(e)) for i, v, e in results]
        counts = (committer.commits, committer.failures, committer.fsyncs)
        try:
            send((portable, *counts))
        except pickle.PicklingError as exc:     # a job returned something that cannot travel
            log.error("a store job's result cannot be sent back: %s", exc)
            send(([(i, None, RuntimeError(f"store job result not sendable: {exc}")) for i, _, _ in portable],
                  *counts))
        except OSError as exc:                   # the engine is gone: nobody to tell
            log.warning("engine gone before %d answer(s) could be sent: %s", len(portable), exc)

    try:
        committer = _Committer(conn, path, busy_timeout, sock, answer)
    except (OSError, sqlite3.Error, StoreError) as exc:
        send(("failed", f"store {path}: cannot start the store writer: {exc}"))
        sys.exit(1)
    send(("ready",))
    try:
        committer.run()
    finally:
        committer.stop_syncer()
        committer.stop_checkpoints()
        conn.close()
        with contextlib.suppress(OSError):
            sock.close()
