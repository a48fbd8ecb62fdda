"""The store writer is a process of its own: what happens when it dies, and that it
never outlives the engine."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from mailbox_guard.store import db as store
from mailbox_guard.store.writer import Writer
from tests.conftest import helper_pids, process_alive
from tests.test_store import _insert_job, _slow_job


def _keys(db: Path) -> set[str]:
    conn = store.connect(db, readonly=True)
    try:
        return {r[0] for r in conn.execute("SELECT key FROM meta")}
    finally:
        conn.close()


def test_a_dead_writer_fails_its_pending_jobs_and_the_next_job_starts_a_new_one(tmp_path):
    db = tmp_path / "s.db"
    store.initialise(db)
    writer = Writer(db).start()

    async def main():
        assert await writer.run(_insert_job, "before") == 1
        first_pid = writer.pid
        pending = asyncio.ensure_future(writer.run(_slow_job))
        await asyncio.sleep(0.05)
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(sqlite3.OperationalError, match="store writer"):
            await pending
        assert await writer.run(_insert_job, "after") == 1
        return first_pid, writer.pid
    try:
        first_pid, second_pid = asyncio.run(main())
    finally:
        writer.close()
    assert second_pid != first_pid and not process_alive(first_pid) and not process_alive(second_pid)
    assert {"before", "after"} <= _keys(db)


def test_a_job_error_comes_back_as_the_same_exception(tmp_path):
    db = tmp_path / "s.db"
    store.initialise(db)
    writer = Writer(db).start()

    async def main():
        await writer.run(_insert_job, "x")
        with pytest.raises(sqlite3.IntegrityError):
            await writer.run(_insert_job, "x")
        return await writer.run(_insert_job, "y")
    try:
        assert asyncio.run(main()) == 1
    finally:
        writer.close()
    assert writer.pid is None


def _synchronous_seen(conn, items):
    """A job run in bulk: the synchronous mode its batch commits with (0 is OFF)."""
    return [conn.execute("PRAGMA synchronous").fetchone()[0]] * len(items)


def test_durable_jobs_are_answered_after_an_fsync_and_lazy_batches_without_one(tmp_path):
    """The writer commits with synchronous=OFF and fsyncs the WAL itself before it
    answers: a batch with a job that is not lazy (a new message before its 250) is
    answered after an fsync, also when lazy jobs share it; a batch of lazy jobs
    only (the end of a delivery) is answered without one."""
    db = tmp_path / "s.db"
    store.initialise(db)
    writer = Writer(db).start()

    async def main():
        seen = []

        async def step(job):
            before = (writer.commits, writer.fsyncs)
            result = await job
            seen.append((result, writer.commits - before[0], writer.fsyncs - before[1]))
        await step(writer.run_many(_synchronous_seen, "a", lazy=True))
        await step(writer.run_many(_synchronous_seen, "b"))
        await step(writer.run_many(_synchronous_seen, "c", lazy=True))
        # Sent in the same turn of the loop, the next two leave in one write: one batch.
        await step(asyncio.gather(writer.run_many(_synchronous_seen, "d", lazy=True), writer.run_many(_synchronous_seen, "e")))
        return seen, await writer.run(_insert_job, "after")
    try:
        seen, inserted = asyncio.run(main())
    finally:
        writer.close()
    # (result: every commit of the writer runs with synchronous=OFF, 0)
    assert seen == [(0, 1, 0), (0, 1, 1), (0, 1, 0), ([0, 0], 1, 1)]
    assert inserted == 1 and "after" in _keys(db)


def test_a_failed_fsync_fails_the_jobs_waiting_for_it_and_ends_the_writer(tmp_path, monkeypatch):
    """Linux may drop pages it could not write and report the next fsync as a
    success: after a failed fsync nothing the writer commits can be trusted, so the
    waiting jobs fail and the process ends (the engine starts a new writer)."""
    import socket as socketlib
    from mailbox_guard.store import writer as writer_mod
    db = tmp_path / "s.db"
    store.initialise(db)
    conn = store.connect(db)
    ours, theirs = socketlib.socketpair()
    answers, exits = [], []
    monkeypatch.setattr(writer_mod.os, "fsync", _failing_fsync_for(str(db) + "-wal"))

    monkeypatch.setattr(writer_mod.os, "_exit", exits.append)
    committer = writer_mod._Committer(conn, str(db), 5.0, ours, answers.extend)
    try:
        committer._commit(conn, [writer_mod._Job(7, _insert_job, (("k",), {}), False)])
        committer._syncer.join(5)
    finally:
        committer.stop_checkpoints()
        conn.close()
        ours.close()
        theirs.close()
    assert exits == [3]
    assert len(answers) == 1 and answers[0][0] == 7 and answers[0][1] is None
    assert isinstance(answers[0][2], sqlite3.OperationalError) and "fsync" in str(answers[0][2])


def _failing_fsync_for(wal: str):
    real = os.fsync

    def fsync(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(wal):
            raise OSError(5, "Input/output error")
        return real(fd)
    return fsync


def test_a_store_the_writer_cannot_open_is_one_error_at_start(tmp_path):
    db = tmp_path / "s.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(store.StoreError, match="unreadable"):
        Writer(db).start()
    assert helper_pids(os.getpid(), "store.writer") == [], "a writer process was left behind"


def test_the_writer_process_ends_with_a_killed_engine(gateway):
    """SIGKILL leaves the engine no chance to stop its writer: the writer sees its
    socket close and exits by itself."""
    gateway.start()
    writers = helper_pids(gateway.proc.pid, "store.writer")
    assert len(writers) == 1, f"writer processes of the engine: {writers}"
    gateway.kill()
    deadline = time.monotonic() + 10
    while process_alive(writers[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(writers[0]), "the store writer outlived its engine"


def test_stop_signals_to_the_whole_group_leave_the_helpers_to_the_engine(gateway, sink):
    """systemd's stop sends SIGTERM to every process of the unit, a terminal's Ctrl-C
    SIGINT to the process group: the helpers ignore both and the engine, stopping,
    still commits through its writer; then the helpers end with it."""
    from tests.conftest import make_message
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.start()
    with gateway.smtp() as s:
        s.sendmail("a@sender.test", ["b@example.test"], make_message(subject="before the stop"))
    sink.wait_for(1)
    helpers = helper_pids(gateway.proc.pid)
    assert len(helpers) == 2, f"helper processes: {helpers}"       # store writer, delivery agent
    for pid in helpers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert all(process_alive(p) for p in helpers), "a helper died of a stop signal meant for the engine"
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.stop() == 0
    assert not any(process_alive(p) for p in helpers)
    assert (gateway.home / "engine.json").exists() is False
    log = gateway.log()
    assert "Traceback" not in log and "store writer connection lost" not in log, log[-2000:]
