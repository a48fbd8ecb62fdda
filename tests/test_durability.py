"""Durability: a 250 after DATA means the message is on disk.

* Crash: thousands of messages under load, the engine SIGKILLed at random moments
  and restarted; every message that got a 250 reaches the sink (duplicates allowed,
  losses not) and the queue drains.
* Storage faults: the store locked by another process past ``store.busy_timeout``,
  and the disk full under the store. Clients get 451 (never a 250 that is then lost,
  never a 5xx), the engine stays up, and mail flows again once the fault is gone.

The random schedule of the crash test is printed; set DURABILITY_SEED to replay it.
"""

from __future__ import annotations

import collections
import errno
import itertools
import os
import random
import re
import smtplib
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Gateway, make_message

DOMAIN = "example.test"
SENDER = "alice@sender.test"
RCPT = "bob@example.test"
CLIENT_TIMEOUT = 20.0
UNFINISHED = ("incoming", "active", "deferred")

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.I | re.M)


# ----------------------------------------------------------------------------- load
@dataclass
class DataReply:
    """One DATA transaction: when DATA was sent, when (and what) the end of data got."""
    mid: str
    sent: float                 # time.monotonic() just before the DATA command
    replied: float
    code: int | None            # None: the connection was lost before the reply


class Load:
    """Client threads sending unique messages through the gateway with smtplib.

    A connection is reused for as many messages as it will take; on any error (a
    4xx/5xx, a lost or refused connection) the client drops it and reconnects. Every
    4xx/5xx reply is recorded with the command that got it; only messages answered
    250 after DATA count as accepted."""

    def __init__(self, port: int, *, threads: int, tag: str, body: str = "Hello there.\r\n") -> None:
        self.port = port
        self.tag = tag
        self.body = body
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.accepted: list[str] = []
        self.data: list[DataReply] = []
        self.bad: list[tuple[str, int, str]] = []          # (command, code, text) of 4xx/5xx
        self.refused_connects = 0
        self.failures: list[BaseException] = []            # bugs of the client itself
        self._seq = itertools.count(1)
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True,
                                          name=f"load-{i}") for i in range(threads)]

    # -- control
    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a client thread hangs"
        if self.failures:
            raise self.failures[0]

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def accepted_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for d in self.data if d.code == 250 and d.sent >= t)

    def replies_since(self, t: float, code: int) -> int:
        with self.lock:
            return sum(1 for d in self.data if d.code == code and d.sent >= t)

    def wait(self, predicate, timeout: float, what: str, gw: Gateway | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.failures:
                raise self.failures[0]
            if predicate():
                return
            time.sleep(0.05)
        tail = gw.log()[-3000:] if gw is not None else ""
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what} "
                             f"({self.count()} accepted, bad replies: {self.bad[-5:]})\n"
                             f"--- engine log tail ---\n{tail}")

    # -- one client
    def _client(self, idx: int) -> None:
        smtp: smtplib.SMTP | None = None
        try:
            while not self.stop.is_set():
                if smtp is None:
                    smtp = self._connect()
                    if smtp is None:
                        self.stop.wait(0.05)      # engine down (killed): try again soon
                        continue
                try:
                    ok = self._send(smtp, f"<{self.tag}.{idx}.{next(self._seq)}@client.test>")
                except (OSError, smtplib.SMTPException):
                    ok = False
                if not ok:
                    smtp.close()
                    smtp = None
        except BaseException as exc:          # pragma: no cover - a bug in this file
            self.failures.append(exc)
        finally:
            if smtp is not None:
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    pass
                smtp.close()

    def _connect(self) -> smtplib.SMTP | None:
        smtp = smtplib.SMTP(local_hostname="client.test", timeout=CLIENT_TIMEOUT)
        try:
            code, text = smtp.connect("127.0.0.1", self.port)
            if code != 220:
                self._bad("connect", code, text)
                smtp.close()
                return None
            code, text = smtp.ehlo()
            if code != 250:
                self._bad("EHLO", code, text)
                smtp.close()
                return None
            return smtp
        except ConnectionRefusedError:
            with self.lock:
                self.refused_connects += 1
            smtp.close()
            return None
        except (OSError, smtplib.SMTPException):
            smtp.close()
            return None

    def _bad(self, command: str, code: int, text: bytes | str) -> None:
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        with self.lock:
            self.bad.append((command, code, text))

    def _send(self, smtp: smtplib.SMTP, mid: str) -> bool:
        message = make_message(subject=f"durability {mid}", body=self.body, sender=SENDER,
                               to=RCPT, message_id=mid)
        code, text = smtp.mail(SENDER)
        if code != 250:
            self._bad("MAIL", code, text)
            return False
        code, text = smtp.rcpt(RCPT)
        if code not in (250, 251):
            self._bad("RCPT", code, text)
            return False
        sent = time.monotonic()
        try:
            code, text = smtp.data(message)
        except smtplib.SMTPDataError as exc:          # DATA itself refused (not 354)
            self._bad("DATA", exc.smtp_code, exc.smtp_error)
            return False
        except (OSError, smtplib.SMTPException):
            with self.lock:
                self.data.append(DataReply(mid, sent, time.monotonic(), None))
            raise
        with self.lock:
            self.data.append(DataReply(mid, sent, time.monotonic(), code))
            if code == 250:
                self.accepted.append(mid)
        if code != 250:
            self._bad("end of DATA", code, text)
            return False
        return True


# ----------------------------------------------------------------------------- checks
def sink_ids(sink) -> collections.Counter:
    """How often each Message-ID (in the header part) has reached the sink."""
    with sink.lock:
        received = list(sink.messages)
    seen: collections.Counter = collections.Counter()
    for r in received:
        end = r.data.find(b"\r\n\r\n")
        m = _MESSAGE_ID.search(r.data if end < 0 else r.data[:end + 2])
        if m:
            seen[m.group(1).decode("ascii", "replace")] += 1
    return seen


def assert_all_delivered(gw: Gateway, sink, accepted: list[str], *, timeout: float,
                         label: str) -> collections.Counter:
    """Wait until every 250'd Message-ID has reached the sink; fail naming the lost ones."""
    wanted = set(accepted)
    assert len(wanted) == len(accepted), "a Message-ID was accepted twice (test bug)"
    deadline = time.monotonic() + timeout
    while True:
        seen = sink_ids(sink)
        missing = sorted(wanted - seen.keys())
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    dupes = sum(n - 1 for mid, n in seen.items() if mid in wanted and n > 1)
    extra = len(seen.keys() - wanted)
    summary = (f"{label}: {len(accepted)} accepted (250), {len(wanted) - len(missing)} delivered, "
               f"{dupes} duplicate deliveries, {extra} delivered without a 250 (no reply seen), "
               f"{len(missing)} missing")
    print(summary)
    if missing:
        rows = []
        try:
            marks = ",".join("?" * min(len(missing), 20))
            rows = gw.query(f"SELECT id, state, attempts, lease_until, last_error, message_id "
                            f"FROM messages WHERE message_id IN ({marks})", *missing[:20])
        except sqlite3.Error as exc:
            rows = [f"(store unreadable: {exc})"]
        raise AssertionError(f"{summary}\nmissing (first 20): {missing[:20]}\n"
                             f"their queue rows: {rows}\n"
                             f"--- engine log tail ---\n{gw.log()[-4000:]}")
    return seen


def unfinished(gw: Gateway) -> list[dict]:
    return gw.query("SELECT id, state, attempts, lease_until, last_error, message_id "
                    f"FROM messages WHERE state IN {UNFINISHED!r} ORDER BY id")


def assert_queue_drains(gw: Gateway, timeout: float = 15) -> None:
    """Once everything reached the sink, nothing may stay incoming, leased or deferred:
    a delivered message kept under lease would be delivered again when the lease ends."""
    deadline = time.monotonic() + timeout
    while unfinished(gw) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = unfinished(gw)
    if left:
        now = time.time()
        raise AssertionError(
            f"{len(left)} message(s) still unfinished {timeout:g}s after every accepted message "
            f"reached the sink: {collections.Counter(r['state'] for r in left)}; first: "
            f"{[dict(r, lease_left=round((r['lease_until'] or now) - now)) for r in left[:5]]}\n"
            f"--- engine log: delivery errors ---\n"
            + "\n".join([line for line in gw.log().splitlines()
                         if "ERROR mailbox_guard.delivery" in line][-8:]))


def assert_only_451(load: Load) -> None:
    """Every refusal the clients saw was a 451 at the end of DATA: never a 5xx, never
    another 4xx, never a refusal at another stage."""
    other = [b for b in load.bad if not (b[0] == "end of DATA" and b[1] == 451)]
    assert not other, f"replies other than 451 at the end of DATA: {other[:10]} ({len(other)} in all)"


# ----------------------------------------------------------------------------- 1. crash
KILLS = 5
MIN_MESSAGES = 2000


@pytest.mark.timeout(300)
def test_sigkill_under_load_loses_no_accepted_message(gateway, sink):
    seed = int(os.environ.get("DURABILITY_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    print(f"DURABILITY_SEED={seed}")
    gateway.policy().add_domain(DOMAIN, sink.hop)
    gateway.start()
    started = time.monotonic()

    load = Load(gateway.port, threads=8, tag=f"crash{seed}")
    kill_marks: list[int] = []          # accepted count at each kill
    killer_errors: list[BaseException] = []

    def killer() -> None:
        try:
            for _ in range(KILLS):
                # Mail must be flowing through this incarnation before it is killed...
                base = load.count()
                load.wait(lambda: load.count() > base, 30, "a 250 after (re)start", gateway)
                # ... and it dies at a random moment while it flows.
                time.sleep(rng.uniform(0.3, 1.5))
                assert gateway.proc is not None and gateway.proc.poll() is None, \
                    f"engine died on its own (exit {gateway.proc and gateway.proc.returncode})\n{gateway.log()[-3000:]}"
                kill_marks.append(load.count())
                gateway.kill()
                gateway.start()          # same home, same port
        except BaseException as exc:
            killer_errors.append(exc)

    load.start()
    k = threading.Thread(target=killer, name="killer", daemon=True)
    k.start()
    try:
        k.join(120)
        assert not k.is_alive(), "the killer thread hangs"
        if killer_errors:
            raise killer_errors[0]
        # Keep the load on until enough mail went through, and some after the last kill.
        load.wait(lambda: load.count() >= max(MIN_MESSAGES, kill_marks[-1] + 100), 120,
                  f"{MIN_MESSAGES} accepted messages", gateway)
    finally:
        load.finish()
    load_seconds = time.monotonic() - started

    assert len(kill_marks) == KILLS, f"only {len(kill_marks)} kills happened"
    accepted = list(load.accepted)
    assert len(accepted) >= MIN_MESSAGES
    # The kills hit a gateway that was taking mail: 250s before the first kill, between
    # every two kills, and after the last one.
    marks = [0, *kill_marks, len(accepted)]
    per_life = [b - a for a, b in zip(marks, marks[1:])]
    assert all(n > 0 for n in per_life), f"250s per engine life: {per_life}"
    assert gateway.proc is not None and gateway.proc.poll() is None, "engine is not running"
    assert_only_451(load)
    lost_replies = sum(1 for d in load.data if d.code is None)

    seen = assert_all_delivered(gateway, sink, accepted, timeout=120, label="crash test")
    print(f"crash test: seed {seed}, {KILLS} kills, 250s per engine life {per_life}, "
          f"{lost_replies} DATA without reply, {len(load.bad)} 451s, "
          f"{load.refused_connects} refused connects, load {load_seconds:.1f}s")

    # And the queue drains: nothing left incoming, leased or deferred.
    assert_queue_drains(gateway)
    states = dict((r["state"], r["n"]) for r in gateway.query(
        "SELECT state, count(*) AS n FROM messages GROUP BY state"))
    assert set(states) == {"delivered"}, f"queue states at the end: {states}"
    assert states["delivered"] >= len(accepted)
    assert sum(seen.values()) >= len(accepted)


# ----------------------------------------------------------------------------- 2a. locked store
@pytest.mark.timeout(180)
def test_locked_store_answers_451_and_recovers(gateway, sink):
    gateway.configure(**{"store.busy_timeout": "300ms"})
    gateway.policy().add_domain(DOMAIN, sink.hop)
    gateway.start()
    load = Load(gateway.port, threads=4, tag="locked").start()
    try:
        load.wait(lambda: load.count() >= 50, 30, "mail flowing before the lock", gateway)

        # Another process takes the store's write lock and keeps it past busy_timeout.
        other = sqlite3.connect(gateway.home / "mailbox-guard.db", timeout=10, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            # Hold it ~2 s, and at least until a DATA sent under the lock got its reply.
            load.wait(lambda: time.monotonic() - locked_at >= 2.0 and any(
                d.sent >= locked_at for d in list(load.data)), 15, "a reply under the lock", gateway)
            released_at = time.monotonic()
            other.execute("ROLLBACK")
        finally:
            other.close()

        load.wait(lambda: load.accepted_since(released_at) >= 50, 30,
                  "mail flowing again after the lock is released", gateway)
    finally:
        load.finish()

    assert gateway.proc is not None and gateway.proc.poll() is None, \
        f"engine died\n{gateway.log()[-3000:]}"
    under_lock = [d for d in load.data if d.sent >= locked_at and d.replied <= released_at]
    assert under_lock, "no DATA was both sent and answered while the store was locked"
    not_451 = [(d.mid, d.code) for d in under_lock if d.code != 451]
    assert not not_451, f"answered while the store was locked, not with 451: {not_451[:10]}"
    assert_only_451(load)
    assert load.accepted_since(released_at) >= 50
    print(f"locked store: {len(under_lock)} DATA answered 451 under the lock, "
          f"{len(load.bad)} refusals in all")
    assert_all_delivered(gateway, sink, list(load.accepted), timeout=120, label="locked store")
    assert "Traceback" not in gateway.log(), f"traceback in the engine log:\n{gateway.log()[-4000:]}"
    assert_queue_drains(gateway)


# ----------------------------------------------------------------------------- 2b. disk full
def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
        problem = None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")
    except OSError as exc:
        problem = str(exc)
    if problem:
        # A real full disk needs a tmpfs, and so root (as ./run test and CI are).
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (run as root): {problem}")


def _umount(where: Path) -> None:
    proc = subprocess.run(["umount", str(where)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


class Filler:
    """Takes every free byte of a file system, and keeps taking what gets freed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.size = 0
        self.top_up()

    def top_up(self) -> None:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    n = os.write(self.fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                self.size += n
                if n < chunk:
                    break

    def release(self) -> None:
        os.close(self.fd)
        self.path.unlink()


@pytest.mark.timeout(240)
def test_disk_full_answers_451_and_recovers(tmp_path, sink):
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "20m")
    gw = Gateway(mnt / "home")
    gw.log_path = tmp_path / "engine.log"        # the log does not eat the small disk
    filler: Filler | None = None
    load: Load | None = None
    try:
        gw.configure(**{"smtp.hostname": "gw.test", "smtp.error_sleep": "0",
                        "queue.retry_schedule": "1s", "dns.nameservers": "127.0.0.1:9",
                        "dns.timeout": "1s"})
        gw.policy().add_domain(DOMAIN, sink.hop)
        gw.start()
        # A slow downstream lets a queue build up, so the store has to grow while the
        # disk is full (a store with room in its own files could go on without a byte).
        sink.data_reply = lambda envelope: time.sleep(0.03)
        load = Load(gw.port, threads=4, tag="full", body=("x" * 76 + "\r\n") * 200).start()
        load.wait(lambda: load.count() >= 30, 30, "mail flowing before the disk fills", gw)

        filler = Filler(mnt / "filler")
        full_at = time.monotonic()
        # Keep the disk full until the store ran out of room (a 451) and a bit longer.
        first_451: list[float] = []

        def store_ran_out() -> bool:
            assert gw.proc.poll() is None, f"engine died on a full disk\n{gw.log()[-3000:]}"
            assert_only_451(load)         # a 5xx (or any other refusal) fails at once
            filler.top_up()
            if not first_451 and load.replies_since(full_at, 451):
                first_451.append(time.monotonic())
            return bool(first_451) and time.monotonic() - first_451[0] >= 1.0

        load.wait(store_ran_out, 20, "a 451 while the disk is full", gw)
        accepted_while_full = load.accepted_since(full_at)
        filled = filler.size
        filler.release()
        filler = None
        freed_at = time.monotonic()
        sink.data_reply = None

        load.wait(lambda: load.accepted_since(freed_at) >= 30, 60,
                  "mail flowing again after space is freed", gw)
        load.finish()
        assert gw.proc.poll() is None, f"engine died\n{gw.log()[-3000:]}"
        assert_only_451(load)
        refusals = load.replies_since(full_at, 451)
        print(f"disk full: filler {filled >> 10} KiB, {refusals} 451s, "
              f"{accepted_while_full} 250s while full (room left in the store's own files)")
        assert_all_delivered(gw, sink, list(load.accepted), timeout=120, label="disk full")
        assert "Traceback" not in gw.log(), f"traceback in the engine log:\n{gw.log()[-4000:]}"
        assert_queue_drains(gw)
    finally:
        if load is not None and not load.stop.is_set():
            load.stop.set()
            load.finish()
        if filler is not None:
            filler.release()
        sink.data_reply = None
        gw.stop()
        _umount(mnt)
