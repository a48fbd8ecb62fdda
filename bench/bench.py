"""Benchmark: mailbox_guard against a raw aiosmtpd sink (and Postfix), on loopback.

Not a test: it measures. In one run it starts, each in its own process,

* **raw**: a bare aiosmtpd accept-and-discard server (``bench/raw_sink.py``) on the
  event loop the engine runs on (uvloop where installed) — the baseline;
* **mailbox_guard**: ``python -m mailbox_guard serve`` with a fresh home, guarding
  ``example.test`` with the next hop a downstream sink (Postfix ``smtp-sink`` when
  installed, else another raw aiosmtpd sink);
* **postfix** (where ``/usr/sbin/postfix`` exists): a private Postfix instance set up
  as a plain relay for ``example.test`` to the same downstream sink;

and drives each with ``bench/loadgen.py`` (a separate process) for every scenario
(message size x concurrent connections) with two clients, one that pipelines
MAIL/RCPT/DATA (RFC 2920) and one that waits for each reply: a warm-up, then
``--runs`` measured runs, servers and clients interleaved run by run so machine
noise hits them alike. It reports medians: accepted msg/s, p50/p99 time from end of
data to the 250, server CPU per message, for mailbox_guard the delivered msg/s
(queue drained to the sink; read from its store), and the CPU cost per message of
the decision step alone (``bench/decision_cpu.py``: the session with no socket).

    ./run bench                       # all scenarios, both clients, 3 runs each
    ./run bench --quick               # smoke: 1 run, few messages
    ./run bench --scenarios 2k:10,100k:50 --runs 5 --json out.json
    ./run bench --profile engine.prof # the engine under cProfile at 2 KB x 10, unpipelined
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
POSTFIX = "/usr/sbin/postfix"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
DOMAIN = "example.test"

DEFAULT_SCENARIOS = "2k:10,100k:10,2k:50,100k:50"
# Client kinds: the loadgen's --pipelining for each. The pipelining client sends
# MAIL/RCPT/DATA in one write to every server, also to raw aiosmtpd, which does not
# advertise PIPELINING but reads commands one line at a time anyway: every server
# gets the same bytes.
CLIENTS = {"pipelined": "on", "unpipelined": "off"}
DEFAULT_CLIENTS = "unpipelined,pipelined"

# The issue's targets. Without client pipelining at 2 KB x 10, mailbox_guard at least
# this times the raw aiosmtpd sink; everywhere, at least this times Postfix's relay.
TARGET_RAW = {(2048, 10, "unpipelined"): 0.6}
TARGET_POSTFIX = 1.0


class BenchError(Exception):
    """A one-line reason the bench cannot go on."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path | None) -> str:
    """The last error line of a log (or its last line), for a one-line failure message."""
    if log is None or not log.exists():
        return ""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if any(w in ln for w in ("ERROR", "fatal", "Error", "error:"))]
    last = (errors or lines or [""])[-1]
    return f": {last[:240]}" if last else ""


def wait_for_banner(port: int, what: str, proc: subprocess.Popen | None = None,
                    timeout: float = 20.0, log: Path | None = None, expect: bytes = b"") -> None:
    """Wait for a 220 banner (naming ``expect``: not some other server on a reused port)."""
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} while starting{log_tail(log)}"
                             + (f" (log: {log})" if log else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                seen = s.recv(512)
                if seen.startswith(b"220") and expect in seen:
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    got = f" (a different server answers: {seen[:80].decode(errors='replace').strip()!r})" if seen else ""
    raise BenchError(f"{what} did not answer on 127.0.0.1:{port} within {timeout:.0f}s{got}"
                     + (f" (log: {log})" if log else ""))


def fsync_ms(folder: Path, count: int = 30) -> float:
    """Median time of appending 4 KB to a file in ``folder`` and fsyncing it: what
    each durable commit waits for (mailbox_guard's 250 and Postfix's both do)."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times) * 1000


def process_loop(pid: int) -> str:
    """The event loop a running Python process uses: uvloop when its extension is
    mapped (the engine imports it only to run on it), else asyncio."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "?"
    return "uvloop" if "/uvloop/loop." in maps else "asyncio"


def cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """User + system CPU of one process (not its children), or of one of its threads
    (the main thread, which runs the event loop, has the process's id)."""
    stat = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU of a process and of its live children (mailbox_guard's store writer is a
    process of its own)."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            own += cpu_seconds(int(entry.name)) or 0.0
    return own


# ----------------------------------------------------------------------------- processes
try:                                       # looked up here: a child may not read the stdlib
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (ImportError, OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the bench dies, even by SIGKILL (Linux). A
    change of user clears this, so a child that must drop root does it first."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)            # PR_SET_PDEATHSIG


def _as_user_dying_with_parent(user: str):
    import pwd
    pw = pwd.getpwnam(user)

    def preexec() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        _die_with_parent()
    return preexec


class Procs:
    """Every process this bench started, stopped by PID at exit (and nothing else)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, float]] = []
        self.postfix: list["Postfix"] = []

    def spawn(self, name: str, argv: list[str], *, log: Path, grace: float = 10.0,
              env: dict | None = None, preexec=_die_with_parent) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=ROOT, preexec_fn=preexec)
        self.procs.append((name, proc, grace))
        return proc

    def stop_all(self) -> None:
        for pf in reversed(self.postfix):
            pf.stop()
        self.postfix = []
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except OSError:
                    pass
        for _, proc, grace in self.procs:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


PROCS = Procs()
atexit.register(PROCS.stop_all)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- servers
class Server:
    name = "?"
    port = 0
    proc: subprocess.Popen | None = None

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with code {self.proc.returncode} during the bench")

    def cpu(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid) if self.proc is not None else None

    def loop_cpu(self) -> float | None:
        """CPU of the event loop's thread: what one core must do per message."""
        return cpu_seconds(self.proc.pid, self.proc.pid) if self.proc is not None else None

    def after_load(self, result: dict, timeout: float) -> None:
        """Wait until what was accepted has left (servers that queue); add figures."""


class RawSink(Server):
    def __init__(self, work: Path, name: str = "raw aiosmtpd", loop: str = "asyncio") -> None:
        self.name = name
        self.port = free_port()
        self.loop = loop
        self.log = work / f"{name.replace(' ', '-')}.log"

    def start(self) -> "RawSink":
        self.proc = PROCS.spawn(self.name, [PY, str(HERE / "raw_sink.py"), "--port", str(self.port),
                                            "--loop", self.loop], log=self.log)
        wait_for_banner(self.port, self.name, self.proc, log=self.log, expect=b"sink.test")
        return self


class PostfixSink(Server):
    """Postfix's smtp-sink: a C accept-and-discard server, so the downstream is never
    what limits delivery."""

    name = "smtp-sink"

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.log = work / "smtp-sink.log"

    def start(self) -> "PostfixSink":
        # As root smtp-sink wants "-u nobody" (it drops root after binding); we drop it
        # before exec instead, so that it still dies with the bench.
        root = os.geteuid() == 0
        self.proc = PROCS.spawn(self.name, [SMTP_SINK, f"127.0.0.1:{self.port}", "1000"], log=self.log,
                                preexec=_as_user_dying_with_parent("nobody") if root else _die_with_parent)
        wait_for_banner(self.port, self.name, self.proc, log=self.log)
        return self


class MailboxGuard(Server):
    name = "mailbox_guard"

    def __init__(self, work: Path, next_hop: int, profile: Path | None = None) -> None:
        # What runs the CLI: the module, or the module under the profiler.
        self.command = ([PY, str(HERE / "profile_engine.py"), str(profile)] if profile
                        else [PY, "-m", "mailbox_guard"])
        self.home = work / "mg-home"
        self.port = free_port()
        self.next_hop = next_hop
        self.log = work / "mailbox-guard.log"
        self.env = dict(os.environ, MAILBOX_GUARD_HOME=str(self.home), PYTHONUNBUFFERED="1")
        self.db_path = self.home / "mailbox-guard.db"

    def cli(self, *args: str) -> None:
        proc = subprocess.run([PY, "-m", "mailbox_guard", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise BenchError(f"mailbox-guard {' '.join(args)} failed: {err}")

    def start(self) -> "MailboxGuard":
        self.cli("domains", "add", DOMAIN, "--next-hop", f"127.0.0.1:{self.next_hop}")
        self.cli("config", "set", "smtp.hostname", "bench.test")
        self.cli("config", "set", "dns.nameservers", "127.0.0.1:9")
        self.proc = PROCS.spawn(self.name, [*self.command, "serve", "--inbound", f"127.0.0.1:{self.port}"],
                                log=self.log, env=self.env, grace=40.0)
        wait_for_banner(self.port, "mailbox-guard serve", self.proc, log=self.log, expect=b"bench.test")
        return self

    def _query(self, sql: str, *args):
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchone()
        finally:
            conn.close()

    def pending(self) -> int:
        return self._query("SELECT count(*) FROM messages WHERE state NOT IN ('delivered', 'bounced')")[0]

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            n = self.pending()
            if n == 0:
                return
            self.alive()
            if time.monotonic() > deadline:
                raise BenchError(f"mailbox_guard queue did not drain: {n} message(s) still queued "
                                 f"after {timeout:.0f}s (log: {self.log})")
            time.sleep(0.05)

    def after_load(self, result: dict, timeout: float) -> None:
        self.drain(timeout)
        start = result["started_at"]
        delivered, last = self._query(
            "SELECT count(*), max(done_at) FROM messages WHERE state = 'delivered' AND received_at >= ?",
            start)
        bounced = self._query("SELECT count(*) FROM messages WHERE state = 'bounced' AND received_at >= ?",
                              start)[0]
        result["delivered"] = delivered
        result["bounced"] = bounced
        result["delivered_per_s"] = delivered / (last - start) if delivered and last > start else None


class Postfix(Server):
    """A private Postfix instance: its own config, queue and data folders, a relay
    for example.test to the sink, no chroot, started and stopped with ``postfix -c``."""

    name = "postfix"

    def __init__(self, work: Path, next_hop: int) -> None:
        self.base = work / "postfix"
        self.conf = self.base / "etc"
        self.spool = self.base / "spool"
        self.data = self.base / "data"
        self.port = free_port()
        self.next_hop = next_hop
        self.maillog = self.base / "maillog"
        self.started = False
        self.master_pid: int | None = None

    def postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.conf), *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def _why(self, proc: subprocess.CompletedProcess) -> str:
        """The first fatal/error line (the cause, not the follow-up), without syslog prefix."""
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        if self.maillog.exists():
            lines += self.maillog.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines if "fatal" in ln or "error" in ln]
        line = (bad or lines or [f"exit code {proc.returncode}"])[0]
        line = re.sub(r"^\w{3} [ \d]\d [\d:]{8} \S+ ", "", line.strip())
        return line[:300]

    def write_config(self) -> None:
        for d in (self.base, self.conf, self.spool, self.data):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        import pwd
        pw = pwd.getpwnam("postfix")          # KeyError: no postfix user
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        main_cf = f"""\
# Private Postfix instance for the mailbox_guard benchmark: a plain relay.
compatibility_level = 3.6
queue_directory = {self.spool}
data_directory = {self.data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench.test
mydomain = bench.test
myorigin = bench.test
mydestination =
relay_domains = {DOMAIN}
relayhost = [127.0.0.1]:{self.next_hop}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
# No syslog daemon here: postlogd writes the mail log to a file of this instance.
maillog_file = {self.maillog}
maillog_file_prefixes = {self.base}
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_peername_lookup = no
"""
        chroot_off = "\n".join(f"{svc:<10} unix  {p:<7} -       n       {w:<7} {m:<7} {cmd}"
                               for svc, p, w, m, cmd in (
            ("pickup", "n", "60", "1", "pickup"), ("cleanup", "n", "-", "0", "cleanup"),
            ("qmgr", "n", "300", "1", "qmgr"), ("rewrite", "-", "-", "-", "trivial-rewrite"),
            ("bounce", "-", "-", "0", "bounce"), ("defer", "-", "-", "0", "bounce"),
            ("trace", "-", "-", "0", "bounce"), ("verify", "-", "-", "1", "verify"),
            ("flush", "n", "1000?", "0", "flush"), ("proxymap", "-", "-", "-", "proxymap"),
            ("proxywrite", "-", "-", "1", "proxymap"), ("smtp", "-", "-", "-", "smtp"),
            ("relay", "-", "-", "-", "smtp"), ("showq", "n", "-", "-", "showq"),
            ("error", "-", "-", "-", "error"), ("retry", "-", "-", "-", "error"),
            ("discard", "-", "-", "-", "discard"), ("anvil", "-", "-", "1", "anvil"),
            ("scache", "-", "-", "1", "scache")))
        master_cf = (f"# service type private unpriv chroot wakeup maxproc command\n"
                     f"127.0.0.1:{self.port} inet n - n - - smtpd\n{chroot_off}\n"
                     f"postlog   unix-dgram n  -       n       -       1       postlogd\n")
        (self.conf / "main.cf").write_text(main_cf)
        (self.conf / "master.cf").write_text(master_cf)

    def start(self) -> "Postfix":
        if not os.access(POSTFIX, os.X_OK):
            raise BenchError(f"{POSTFIX} not installed")
        if os.geteuid() != 0:
            raise BenchError("starting a Postfix instance needs root")
        try:
            self.write_config()
        except KeyError:
            raise BenchError("no 'postfix' user on this system") from None
        check = self.postfix("check")
        if check.returncode != 0:
            raise BenchError(f"postfix check failed: {self._why(check)}")
        PROCS.postfix.append(self)
        self.started = True
        start = self.postfix("start")
        if start.returncode != 0:
            raise BenchError(f"postfix start failed: {self._why(start)}")
        pid_file = self.spool / "pid" / "master.pid"
        try:
            self.master_pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pass
        wait_for_banner(self.port, "postfix", log=self.maillog, expect=b"bench.test")
        return self

    def alive(self) -> None:
        if self.master_pid is not None:
            try:
                os.kill(self.master_pid, 0)
            except ProcessLookupError:
                raise BenchError(f"postfix master exited during the bench (log: {self.maillog})") from None

    def cpu(self) -> float | None:
        return None                           # many processes come and go: not tracked

    def loop_cpu(self) -> float | None:
        return None

    def queued(self) -> int:
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.spool / sub):
                n += len(files)
        return n

    def after_load(self, result: dict, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            n = self.queued()
            if n == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"postfix queue did not drain: {n} message(s) after {timeout:.0f}s "
                                 f"(log: {self.maillog})")
            time.sleep(0.05)
        # When the queue was seen empty: an upper bound on the time to deliver it all.
        result["drained_per_s_approx"] = result["accepted"] / max(time.time() - result["started_at"], 1e-6)

    def version(self) -> str:
        proc = subprocess.run(["postconf", "-c", str(self.conf), "-h", "mail_version"],
                              capture_output=True, text=True)
        return proc.stdout.strip() or "?"

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            self.postfix("stop", timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.master_pid is None:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(self.master_pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:                                  # the master we started did not stop: end it
            os.kill(self.master_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- load
def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b")
    mult = 1
    if t.endswith("k"):
        mult, t = 1024, t[:-1]
    elif t.endswith("m"):
        mult, t = 1024 * 1024, t[:-1]
    return int(float(t) * mult)


def size_label(size: int) -> str:
    return f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"


def parse_scenarios(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            size, conns = part.split(":")
            out.append((parse_size(size), int(conns)))
        except ValueError:
            raise BenchError(f"bad scenario {part!r} (use SIZE:CONNECTIONS, e.g. 2k:10,100k:50)") from None
    if not out:
        raise BenchError("no scenarios given")
    return out


def load(server: Server, size: int, conns: int, messages: int, args, client: str) -> dict:
    argv = [PY, str(HERE / "loadgen.py"), "--port", str(server.port), "--connections", str(conns),
            "--size", str(size), "--messages", str(messages), "--pipelining", CLIENTS[client]]
    cpu0, loop0 = server.cpu(), server.loop_cpu()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT,
                              preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        server.alive()
        raise BenchError(f"load generator against {server.name} took longer than {args.timeout:.0f}s") from None
    if proc.returncode != 0:
        server.alive()
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise BenchError(f"load generator against {server.name} failed: {err}")
    result = json.loads(proc.stdout)
    server.after_load(result, timeout=max(60.0, messages / 20))
    server.alive()
    cpu1, loop1 = server.cpu(), server.loop_cpu()
    if cpu0 is not None and cpu1 is not None and result["accepted"]:
        result["server_cpu_ms_per_msg"] = (cpu1 - cpu0) * 1000 / result["accepted"]
    if loop0 is not None and loop1 is not None and result["accepted"]:
        result["loop_cpu_ms_per_msg"] = (loop1 - loop0) * 1000 / result["accepted"]
    return result


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    keys = ("msgs_per_s", "p50_ms", "p99_ms", "delivered_per_s", "drained_per_s_approx",
            "server_cpu_ms_per_msg", "loop_cpu_ms_per_msg")
    out = {k: median([r.get(k) for r in runs]) for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    out["accepted"] = sum(r["accepted"] for r in runs)
    out["pipelining"] = all(r.get("pipelining") for r in runs)
    samples = [s for r in runs for s in r.get("error_samples", [])]
    out["error_samples"] = samples[:5]
    return out


# ----------------------------------------------------------------------------- decision step
def decision_cpu(sizes: list[int], runs: int, quick: bool, timeout: float) -> list[dict]:
    """``bench/decision_cpu.py`` in its own process (nothing else of the bench in its
    CPU time): per size, CPU microseconds per message of the session alone."""
    argv = [PY, str(HERE / "decision_cpu.py"), "--json", "--runs", str(runs),
            "--sizes", ",".join(str(s) for s in sizes)]
    if quick:
        argv += ["--messages", "300"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          preexec_fn=_die_with_parent)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise BenchError(f"decision step measurement failed: {err}")
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- report
def fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1000


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def render(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table: the first ``left`` columns left-aligned, the others right."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i < left else c.rjust(w)   # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(row) for row in rows])


def table(results: list[dict], have_postfix: bool) -> str:
    head = ["scenario", "client", "raw msg/s", "mg msg/s"]
    if have_postfix:
        head += ["postfix msg/s"]
    head += ["mg/raw"] + (["mg/postfix"] if have_postfix else [])
    head += ["p50 ms raw / mg" + (" / pf" if have_postfix else ""), "mg p99 ms", "mg delivered/s",
             "CPU us/msg raw / mg (mg loop)"]
    rows = []
    for r in results:
        get = lambda key, field: (r["servers"].get(key) or {}).get(field)     # noqa: E731
        raw, mg, pf = (get(k, "msgs_per_s") for k in ("raw", "mailbox_guard", "postfix"))
        row = [r["scenario"], r["client"], fmt(raw), fmt(mg)]
        if have_postfix:
            row += [fmt(pf)]
        row += [ratio(mg, raw)] + ([ratio(mg, pf)] if have_postfix else [])
        keys = ("raw", "mailbox_guard") + (("postfix",) if have_postfix else ())
        row += [" / ".join(fmt(get(k, "p50_ms"), ".1f") for k in keys), fmt(get("mailbox_guard", "p99_ms"), ".1f"),
                fmt(get("mailbox_guard", "delivered_per_s")),
                " / ".join(fmt(None if get(k, "server_cpu_ms_per_msg") is None
                               else get(k, "server_cpu_ms_per_msg") * 1000) for k in ("raw", "mailbox_guard"))
                + f" ({fmt(us(get('mailbox_guard', 'loop_cpu_ms_per_msg')))})"]
        rows.append(row)
    return render(head, rows, left=2)


def decision_table(rows: list[dict], results: list[dict]) -> str:
    """The decision step's CPU per message beside the engine's CPU per message in the
    socket bench (median over the rows of that size): the whole process (store
    writer and delivery included) and its event loop's thread."""
    out = []
    for d in rows:
        of_size = [r["servers"]["mailbox_guard"] for r in results if r["size"] == d["size"]]
        engine = median([s.get("server_cpu_ms_per_msg") for s in of_size])
        loop = median([s.get("loop_cpu_ms_per_msg") for s in of_size])
        share = f"{d['reused_us_per_msg'] / us(loop):.0%}" if loop else "-"
        out.append([size_label(d["size"]), fmt(d["new_session_us_per_msg"]), fmt(d["reused_us_per_msg"]),
                    fmt(us(engine)), fmt(us(loop)), share])
    return render(["message", "decision us/msg, new session", "decision us/msg, reused session",
                   "engine CPU us/msg", "engine loop thread us/msg", "decision share of loop"], out)


def targets(results: list[dict], have_postfix: bool) -> list[str]:
    lines = []
    for r in results:
        s = r["servers"]
        mg = s["mailbox_guard"]["msgs_per_s"]
        checks = []
        want = TARGET_RAW.get((r["size"], r["connections"], r["client"]))
        if want is not None and s["raw"]["msgs_per_s"]:
            checks.append(("raw aiosmtpd", want, mg / s["raw"]["msgs_per_s"]))
        if have_postfix and s["postfix"]["msgs_per_s"]:
            checks.append(("postfix", TARGET_POSTFIX, mg / s["postfix"]["msgs_per_s"]))
        for name, want, got in checks:
            lines.append(f"target {r['scenario']} {r['client']}: mailbox_guard >= {want:g}x {name}: "
                         f"{got:.2f}x, {'meets' if got >= want else 'MISSES'}")
    return lines


def machine_info(loops: dict, loadgen_loop: str) -> dict:
    cpu_model = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu_model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import aiosmtpd
        aiosmtpd_version = aiosmtpd.__version__
    except Exception:
        aiosmtpd_version = "?"
    return {
        "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": cpu_model,
        "python": platform.python_version(), "platform": platform.platform(),
        "aiosmtpd": aiosmtpd_version, "raw_sink_loop": loops.get("raw", "-"),
        "mailbox_guard_loop": loops.get("mailbox_guard", "-"), "loadgen_loop": loadgen_loop,
        "loadavg_start": os.getloadavg(),
    }


def loadgen_loop_name() -> str:
    probe = subprocess.run([PY, "-c", "import sys; sys.path.insert(0, %r); import loadgen; print(loadgen.loop_name())"
                            % str(HERE)], capture_output=True, text=True)
    return probe.stdout.strip() or "?"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="./run bench", description="Measure mailbox_guard against a raw aiosmtpd sink and Postfix "
                                        "on loopback; prints medians of several runs.")
    ap.add_argument("--scenarios", default=None,
                    help=f"SIZE:CONNECTIONS list (default {DEFAULT_SCENARIOS}; with --profile 2k:10)")
    ap.add_argument("--clients", default=None,
                    help=f"client kinds, of {', '.join(CLIENTS)} (default {DEFAULT_CLIENTS}; "
                         f"with --profile unpipelined)")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per scenario and server (default 3)")
    ap.add_argument("--messages", type=int, default=None,
                    help="messages per run (default 2000 below 10 KB, else 500)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up messages per scenario and server (default 10%% of --messages, at least 50)")
    ap.add_argument("--quick", action="store_true",
                    help="short run: 2 KB and 100 KB x 10, 1 run of 300 (2 KB) / 60 (100 KB) messages")
    ap.add_argument("--no-postfix", action="store_true", help="do not measure Postfix")
    ap.add_argument("--no-decision", action="store_true", help="do not measure the decision step's CPU")
    ap.add_argument("--profile", metavar="FILE",
                    help="run only mailbox_guard, under cProfile, on the first scenario and client; write "
                         "the profile to FILE and print its heaviest functions")
    ap.add_argument("--profiler", choices=("cprofile", "py-spy"), default="cprofile",
                    help="with --profile: cProfile in the engine (exact calls, slowed down), or py-spy "
                         "sampling it from outside during the measured runs (all threads; needs py-spy "
                         "on PATH or --py-spy)")
    ap.add_argument("--native", action="store_true", help="with --profiler py-spy: C frames too (uvloop, "
                                                                 "libpython, libc)")
    ap.add_argument("--gil", action="store_true", help="with --profiler py-spy: only samples of the thread "
                                                       "holding the GIL (who keeps the others waiting)")
    ap.add_argument("--py-spy", metavar="PATH", default=None, help="the py-spy executable (default: from PATH)")
    ap.add_argument("--top", type=int, default=25, help="functions per list printed with --profile (default 25)")
    ap.add_argument("--json", metavar="FILE", help="write all figures (every run) to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (homes, logs, Postfix queue)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one load run")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    default_scenarios = "2k:10" if args.profile else "2k:10,100k:10" if args.quick else DEFAULT_SCENARIOS
    try:
        scenarios = parse_scenarios(args.scenarios or default_scenarios)
    except BenchError as exc:
        ap.error(str(exc))
    clients = [c.strip() for c in (args.clients or ("unpipelined" if args.profile else DEFAULT_CLIENTS)).split(",")
               if c.strip()]
    bad = [c for c in clients if c not in CLIENTS]
    if bad or not clients:
        ap.error(f"bad --clients {args.clients!r} (use {', '.join(CLIENTS)})")
    runs = args.runs or (1 if args.quick else 3)

    def messages_for(size: int, conns: int) -> int:
        if args.messages:
            return args.messages
        if args.quick:       # a smoke test, but still a few messages per connection
            return max(300 if size < 10240 else 60, 3 * conns)
        return 2000 if size < 10240 else 500

    def warmup_for(size: int, conns: int) -> int:
        if args.warmup is not None:
            return args.warmup
        return max(50, conns, messages_for(size, conns) // 10)

    work = Path(tempfile.mkdtemp(prefix="mg-bench-"))
    os.chmod(work, 0o755)
    failed = False
    try:
        if args.profile and args.profiler == "py-spy":
            return _py_spy(args, scenarios[0], clients[0], runs, messages_for, warmup_for, work)
        if args.profile:
            return _profile(args, scenarios[0], clients[0], runs, messages_for, warmup_for, work)
        return _bench(args, scenarios, clients, runs, messages_for, warmup_for, work)
    except BenchError as exc:
        failed = True
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        failed = True
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        PROCS.stop_all()
        if args.keep or failed:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def start_downstream(work: Path) -> Server:
    if os.access(SMTP_SINK, os.X_OK):
        downstream: Server = PostfixSink(work).start()
    else:
        downstream = RawSink(work, "downstream raw aiosmtpd").start()
    say(f"downstream sink: {downstream.name} on 127.0.0.1:{downstream.port}")
    return downstream


def run_line(r: int, runs: int, client: str, server: Server, res: dict) -> str:
    extra = ""
    if res.get("delivered_per_s") is not None:
        extra = f", delivered {res['delivered']} at {res['delivered_per_s']:.0f}/s"
    if res.get("server_cpu_ms_per_msg") is not None:
        extra += f", CPU {res['server_cpu_ms_per_msg'] * 1000:.0f} us/msg"
        if res.get("loop_cpu_ms_per_msg") is not None and server.name == "mailbox_guard":
            extra += f" ({res['loop_cpu_ms_per_msg'] * 1000:.0f} in the loop thread)"
    return (f"   run {r + 1}/{runs} {client:<11} {server.name:<13} {res['msgs_per_s']:7.0f} msg/s  "
            f"p50 {fmt(res['p50_ms'], '.1f')} ms  p99 {fmt(res['p99_ms'], '.1f')} ms"
            f"{extra}{'  ERRORS ' + str(res['errors']) if res['errors'] else ''}")


def _bench(args, scenarios, clients, runs, messages_for, warmup_for, work: Path) -> int:
    say(f"work folder {work}")
    decision = None
    if not args.no_decision:
        say(f"== decision step: CPU per message of the session with no socket, median of {runs} run(s)")
        decision = decision_cpu(sorted({s for s, _ in scenarios}), runs, args.quick, args.timeout)
    downstream = start_downstream(work)
    servers: dict[str, Server] = {}
    mg = MailboxGuard(work, downstream.port).start()
    loops = {"mailbox_guard": process_loop(mg.proc.pid)}
    # The baseline on the engine's own event loop: the two differ in their own code only.
    raw = RawSink(work, loop="uvloop" if loops["mailbox_guard"] == "uvloop" else "asyncio").start()
    loops["raw"] = process_loop(raw.proc.pid)
    servers["raw"], servers["mailbox_guard"] = raw, mg
    postfix_note = None
    if args.no_postfix:
        postfix_note = "postfix: not measured (--no-postfix)"
    elif not os.path.exists(POSTFIX):
        postfix_note = f"postfix: not measured ({POSTFIX} not installed)"
    else:
        try:
            pf = Postfix(work, downstream.port).start()
            servers["postfix"] = pf
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            postfix_note = f"postfix: not measured ({exc})"
            for p in list(PROCS.postfix):
                p.stop()
            PROCS.postfix = []
    if postfix_note:
        say(postfix_note)
    say("servers: " + ", ".join(f"{s.name} 127.0.0.1:{s.port}" for s in servers.values())
        + f"; loops: mailbox_guard {loops['mailbox_guard']}, raw aiosmtpd {loops['raw']}")

    info = machine_info(loops, loadgen_loop_name())
    info["fsync_ms_start"] = fsync_ms(work)
    if "postfix" in servers:
        info["postfix"] = servers["postfix"].version()
    info["downstream"] = downstream.name

    results = []
    for size, conns in scenarios:
        label = f"{size_label(size)} x {conns}"
        n, w = messages_for(size, conns), warmup_for(size, conns)
        say(f"== {label}: warm-up {w}, then {runs} run(s) of {n} messages per server and client "
            f"({', '.join(clients)})")
        for key, server in servers.items():
            if w > 0:
                load(server, size, conns, w, args, clients[0])
        per: dict[str, dict[str, list[dict]]] = {c: {key: [] for key in servers} for c in clients}
        for r in range(runs):
            for client in clients:
                for key, server in servers.items():
                    res = load(server, size, conns, n, args, client)
                    per[client][key].append(res)
                    say(run_line(r, runs, client, server, res))
        for client in clients:
            results.append({"scenario": label, "client": client, "size": size, "connections": conns,
                            "messages": n, "runs": runs,
                            "servers": {k: summarize(v) for k, v in per[client].items()},
                            "all_runs": per[client]})
    info["loadavg_end"] = os.getloadavg()
    info["fsync_ms_end"] = fsync_ms(work)

    print()
    print(f"mailbox_guard benchmark (loopback; medians of {runs} run(s) per figure; "
          f"msg/s = accepted 250s per second)")
    print(f"machine: {info['nproc']} CPU(s) ({info['cpu']}), Python {info['python']}, "
          f"aiosmtpd {info['aiosmtpd']}; loops: raw sink {info['raw_sink_loop']}, "
          f"mailbox_guard {info['mailbox_guard_loop']}, load generator {info['loadgen_loop']}")
    print(f"downstream sink: {downstream.name}; "
          + (f"postfix {info['postfix']}" if "postfix" in servers else postfix_note)
          + f"; load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end"
          + f"; fsync of the work folder {info['fsync_ms_start']:.2f} ms at start, "
            f"{info['fsync_ms_end']:.2f} ms at end")
    print("clients: pipelined = MAIL/RCPT/DATA in one write (to every server); unpipelined = "
          "each command waits for its reply")
    print()
    print(table(results, "postfix" in servers))
    if decision:
        print()
        print("decision step (bench/decision_cpu.py: Session + default checks, no socket, no store; "
              "CPU time per message):")
        print(decision_table(decision, results))
    print()
    for line in targets(results, "postfix" in servers):
        print(line)
    for r in results:
        for key, s in r["servers"].items():
            if s["errors"]:
                print(f"note: {r['scenario']} {r['client']} {servers[key].name}: {s['errors']} error(s), e.g. "
                      f"{s['error_samples'][0] if s['error_samples'] else '?'}")
            want = r["client"] == "pipelined"
            if s["pipelining"] != want and s["accepted"]:
                print(f"note: {r['scenario']} {r['client']} {servers[key].name}: the client did "
                      f"{'not ' if want else ''}pipeline")

    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "runs": runs, "clients": clients,
                                               "postfix_note": postfix_note, "decision": decision,
                                               "scenarios": results}, indent=1))
        say(f"figures written to {args.json}")
    return 0


# ----------------------------------------------------------------------------- profile
OUR_CODE = r"mailbox_guard/"
LIBRARIES = r"aiosmtpd/|asyncio/|uvloop/"


def short_name(func: tuple[str, int, str]) -> str:
    """site-packages/..., the project's relative path, or the builtin's name."""
    filename, line, name = func
    if filename == "~":
        return name
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3."):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            if marker == "lib/python3.":
                filename = "stdlib/" + filename.split("/", 1)[1]
            break
    return f"{filename}:{line}({name})"


def profile_rows(stats, pattern: str | None, col: int, top: int, total: float) -> str:
    """The ``top`` heaviest functions (col 2: own time, 3: cumulative) whose file
    matches ``pattern``: calls, own and cumulative seconds and share, us per call."""
    rx = re.compile(pattern) if pattern else None
    rows = [(func, v) for func, v in stats.stats.items() if rx is None or rx.search(func[0])]
    rows.sort(key=lambda fv: fv[1][col], reverse=True)
    out = []
    for func, (cc, nc, tt, ct, _) in rows[:top]:
        calls = f"{nc}" if nc == cc else f"{nc}/{cc}"
        out.append([short_name(func), calls, f"{tt:.3f}", f"{tt / total:.1%}" if total else "-",
                    f"{ct:.3f}", f"{ct / total:.1%}" if total else "-", f"{ct / nc * 1e6:.1f}" if nc else "-"])
    if not out:
        return "(none)"
    return render(["function", "calls", "own s", "own %", "cum s", "cum %", "cum us/call"], out)


def _profile(args, scenario, client, runs, messages_for, warmup_for, work: Path) -> int:
    """The engine under cProfile (``bench/profile_engine.py``: CPU time of the event
    loop's thread) for one scenario and client: warm-up, the runs, a clean stop (the
    profile is written when the process ends), then the heaviest functions of our
    code and of aiosmtpd/asyncio."""
    import pstats
    out = Path(args.profile).resolve()
    out.unlink(missing_ok=True)
    size, conns = scenario
    say(f"work folder {work}")
    downstream = start_downstream(work)
    mg = MailboxGuard(work, downstream.port, profile=out).start()
    n, w = messages_for(size, conns), warmup_for(size, conns)
    label = f"{size_label(size)} x {conns}"
    say(f"== profiling mailbox_guard ({process_loop(mg.proc.pid)}) at {label}, {client}: "
        f"warm-up {w}, then {runs} run(s) of {n} messages")
    if w > 0:
        load(mg, size, conns, w, args, client)
    for r in range(runs):
        say(run_line(r, runs, client, mg, load(mg, size, conns, n, args, client)))
    mg.proc.send_signal(signal.SIGTERM)
    try:
        mg.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise BenchError("mailbox_guard under cProfile did not stop within 60s") from None
    if not out.exists():
        raise BenchError(f"cProfile wrote no profile (mailbox_guard exit code {mg.proc.returncode}; "
                         f"log: {mg.log})")
    print(f"profile of mailbox_guard, {label}, {client}: warm-up {w} + {runs} x {n} messages "
          f"(start-up and stop included); file {out}")
    stats = pstats.Stats(str(out))
    total = stats.total_tt
    for title, pattern, sorts in (("all functions", None, (("tottime", 2),)),
                                  ("our code", OUR_CODE, (("tottime", 2), ("cumulative", 3))),
                                  ("aiosmtpd / asyncio / uvloop", LIBRARIES, (("tottime", 2), ("cumulative", 3)))):
        for sort, col in sorts:
            print(f"\n---- {title}, by {sort} (total {total:.2f} s of CPU in the event loop's thread)")
            print(profile_rows(stats, pattern, col, args.top, total))
    return 0


def _py_spy(args, scenario, client, runs, messages_for, warmup_for, work: Path) -> int:
    """py-spy samples the running engine (every thread; each sample pauses it for a
    moment, so the stacks are consistent) during the measured runs only; prints the heaviest functions of the event loop's
    thread, own and cumulative, and the samples per thread."""
    spy = args.py_spy or shutil.which("py-spy")
    if not spy or not os.access(spy, os.X_OK):
        raise BenchError("py-spy not found: pip install py-spy (anywhere) and put it on PATH, or give --py-spy")
    out = Path(args.profile).resolve()
    out.unlink(missing_ok=True)
    size, conns = scenario
    say(f"work folder {work}")
    downstream = start_downstream(work)
    mg = MailboxGuard(work, downstream.port).start()
    n, w = messages_for(size, conns), warmup_for(size, conns)
    label = f"{size_label(size)} x {conns}"
    say(f"== sampling mailbox_guard ({process_loop(mg.proc.pid)}) with py-spy at {label}, {client}: "
        f"warm-up {w}, then {runs} run(s) of {n} messages")
    if w > 0:
        load(mg, size, conns, w, args, client)
    log = work / "py-spy.log"
    sampler = PROCS.spawn("py-spy", [spy, "record", "--pid", str(mg.proc.pid), "--rate", "250", "--threads",
                                     *(["--native"] if args.native else []), *(["--gil"] if args.gil else []),
                                     "--format", "raw",
                                     "-o", str(out)], log=log, grace=30)
    time.sleep(1.0)                     # attached before the load starts
    if sampler.poll() is not None:
        raise BenchError(f"py-spy exited with code {sampler.returncode}{log_tail(log)}")
    for r in range(runs):
        say(run_line(r, runs, client, mg, load(mg, size, conns, n, args, client)))
    sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        sampler.wait(30)
    except subprocess.TimeoutExpired:
        raise BenchError("py-spy did not stop within 30s") from None
    if not out.exists():
        raise BenchError(f"py-spy wrote no samples{log_tail(log)}")
    print(f"py-spy samples of mailbox_guard, {label}, {client}: {runs} x {n} messages after a warm-up "
          f"of {w}; file {out} (collapsed stacks)")
    print(spy_report(out, mg.proc.pid, args.top))
    return 0


def spy_report(path: Path, main_tid: int, top: int) -> str:
    """Samples per thread; for the event loop's thread the heaviest functions (own:
    the innermost frame; cumulative: anywhere on the stack), all and ours only."""
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    cum: dict[str, int] = {}
    main = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        threads[frames[0]] = threads.get(frames[0], 0) + n
        if not frames[0].startswith(f"thread ({main_tid})"):
            continue
        main += n
        # "func (file:line)" -> "file(func)": a function, whatever the line.
        funcs = [re.sub(r"^(.*) \((.*?)(?::\d+)?\)$", r"\2(\1)", f) for f in frames[1:]]
        if funcs:
            own[funcs[-1]] = own.get(funcs[-1], 0) + n
        for f in set(funcs):
            cum[f] = cum.get(f, 0) + n
    total = sum(threads.values())
    parts = [render(["thread", "samples", "share"],
                    [[t, str(c), f"{c / total:.1%}"] for t, c in sorted(threads.items(), key=lambda kv: -kv[1])])]
    for title, pick, kinds in (("all functions", lambda f: True, (("own", own),)),
                               ("our code", lambda f: f.startswith(OUR_CODE), (("own", own), ("cumulative", cum))),
                               ("aiosmtpd / asyncio / uvloop", lambda f: re.match(LIBRARIES, f) is not None,
                                (("own", own), ("cumulative", cum)))):
        for kind, table_ in kinds:
            rows = sorted(((f, c) for f, c in table_.items() if pick(f)), key=lambda fc: -fc[1])[:top]
            parts.append(f"---- event loop thread, {title}, {kind} ({main} samples)\n"
                         + (render(["function", "samples", "share of loop thread"],
                                   [[f, str(c), f"{c / main:.1%}"] for f, c in rows]) if rows else "(none)"))
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
