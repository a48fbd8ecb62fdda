"""Benchmark: mailbox_guard against a raw aiosmtpd sink (and Postfix), on loopback.

Not a test: it measures. In one run it starts, each in its own process,

* **raw**: a bare aiosmtpd accept-and-discard server (``bench/raw_sink.py``,
  default asyncio loop) — the baseline every figure is divided by;
* **mailbox_guard**: ``python -m mailbox_guard serve`` with a fresh home, guarding
  ``example.test`` with the next hop a downstream sink (Postfix ``smtp-sink`` when
  installed, else another raw aiosmtpd sink);
* **postfix** (where ``/usr/sbin/postfix`` exists): a private Postfix instance set up
  as a plain relay for ``example.test`` to the same downstream sink;

and drives each with ``bench/loadgen.py`` (a separate process) for every scenario
(message size x concurrent connections): a warm-up, then ``--runs`` measured runs,
servers interleaved run by run so machine noise hits them alike. It reports medians:
accepted msg/s, p50/p99 time from end of data to the 250, and for mailbox_guard the
delivered msg/s (queue drained to the sink; read from its store).

    ./run bench                       # all scenarios, 3 runs each
    ./run bench --quick               # smoke: 1 run, few messages
    ./run bench --scenarios 2k:10,100k:50 --runs 5 --json out.json
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

DEFAULT_SCENARIOS = "2k:10,2k:50,100k:10,100k:50"


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


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of one process (not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


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
        return cpu_seconds(self.proc.pid) if self.proc is not None else None

    def after_load(self, result: dict, timeout: float) -> None:
        """Wait until what was accepted has left (servers that queue); add figures."""


class RawSink(Server):
    def __init__(self, work: Path, name: str = "raw aiosmtpd") -> None:
        self.name = name
        self.port = free_port()
        self.log = work / f"{name.replace(' ', '-')}.log"

    def start(self) -> "RawSink":
        self.proc = PROCS.spawn(self.name, [PY, str(HERE / "raw_sink.py"), "--port", str(self.port)],
                                log=self.log)
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

    def __init__(self, work: Path, next_hop: int) -> None:
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
        self.proc = PROCS.spawn(self.name, [PY, "-m", "mailbox_guard", "serve", "--inbound",
                                            f"127.0.0.1:{self.port}"],
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


def load(server: Server, size: int, conns: int, messages: int, args) -> dict:
    argv = [PY, str(HERE / "loadgen.py"), "--port", str(server.port), "--connections", str(conns),
            "--size", str(size), "--messages", str(messages), "--pipelining", args.pipelining]
    cpu0 = server.cpu()
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
    cpu1 = server.cpu()
    if cpu0 is not None and cpu1 is not None and result["accepted"]:
        result["server_cpu_ms_per_msg"] = (cpu1 - cpu0) * 1000 / result["accepted"]
    return result


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    keys = ("msgs_per_s", "p50_ms", "p99_ms", "delivered_per_s", "drained_per_s_approx",
            "server_cpu_ms_per_msg")
    out = {k: median([r.get(k) for r in runs]) for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    out["accepted"] = sum(r["accepted"] for r in runs)
    out["pipelining"] = all(r.get("pipelining") for r in runs)
    samples = [s for r in runs for s in r.get("error_samples", [])]
    out["error_samples"] = samples[:5]
    return out


# ----------------------------------------------------------------------------- report
def fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def lat(s: dict | None) -> str:
    if not s or s.get("p50_ms") is None:
        return "-"
    return f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f}"


def table(results: list[dict], have_postfix: bool) -> str:
    head = ["scenario", "raw aiosmtpd msg/s", "mailbox_guard msg/s", "ratio", "mg p50 / p99 ms",
            "raw p50 / p99 ms", "mg delivered/s"]
    if have_postfix:
        head += ["postfix msg/s", "pf p50 / p99 ms", "mg/postfix"]
    rows = []
    for r in results:
        raw, mg, pf = r["servers"].get("raw"), r["servers"].get("mailbox_guard"), r["servers"].get("postfix")
        row = [r["scenario"], fmt(raw and raw["msgs_per_s"]), fmt(mg and mg["msgs_per_s"]),
               ratio(mg and mg["msgs_per_s"], raw and raw["msgs_per_s"]), lat(mg), lat(raw),
               fmt(mg and mg["delivered_per_s"])]
        if have_postfix:
            row += [fmt(pf and pf["msgs_per_s"]), lat(pf), ratio(mg and mg["msgs_per_s"], pf and pf["msgs_per_s"])]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(row) for row in rows])


def machine_info(args, mg_loop: str, loadgen_loop: str) -> dict:
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
        "aiosmtpd": aiosmtpd_version, "raw_sink_loop": "asyncio (default loop)",
        "mailbox_guard_loop": mg_loop, "loadgen_loop": loadgen_loop,
        "loadavg_start": os.getloadavg(),
    }


def mg_loop_name() -> str:
    proc = subprocess.run([PY, "-c", "import uvloop; print('uvloop', uvloop.__version__)"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "asyncio (uvloop not installed)"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="./run bench", description="Measure mailbox_guard against a raw aiosmtpd sink and Postfix "
                                        "on loopback; prints medians of several runs.")
    ap.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                    help=f"SIZE:CONNECTIONS list (default {DEFAULT_SCENARIOS})")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per scenario and server (default 3)")
    ap.add_argument("--messages", type=int, default=None,
                    help="messages per run (default 2000 below 10 KB, else 500)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up messages per scenario and server (default 10%% of --messages, at least 50)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run of 300 (2 KB) / 60 (100 KB) messages, at least 3 per connection")
    ap.add_argument("--no-postfix", action="store_true", help="do not measure Postfix")
    ap.add_argument("--pipelining", choices=("auto", "on", "off"), default="auto",
                    help="client pipelining of MAIL/RCPT/DATA: as advertised (default), always, never")
    ap.add_argument("--json", metavar="FILE", help="write all figures (every run) to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (homes, logs, Postfix queue)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one load run")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    try:
        scenarios = parse_scenarios(args.scenarios)
    except BenchError as exc:
        ap.error(str(exc))
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
        return _bench(args, scenarios, runs, messages_for, warmup_for, work)
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


def _bench(args, scenarios, runs, messages_for, warmup_for, work: Path) -> int:
    say(f"work folder {work}")
    if os.access(SMTP_SINK, os.X_OK):
        downstream: Server = PostfixSink(work).start()
    else:
        downstream = RawSink(work, "downstream raw aiosmtpd").start()
    say(f"downstream sink: {downstream.name} on 127.0.0.1:{downstream.port}")
    servers: dict[str, Server] = {}
    servers["raw"] = RawSink(work).start()
    servers["mailbox_guard"] = MailboxGuard(work, downstream.port).start()
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
    say("servers: " + ", ".join(f"{s.name} 127.0.0.1:{s.port}" for s in servers.values()))

    probe = subprocess.run([PY, "-c", "import sys; sys.path.insert(0, %r); import loadgen; print(loadgen.loop_name())"
                            % str(HERE)], capture_output=True, text=True)
    info = machine_info(args, mg_loop_name(), probe.stdout.strip() or "?")
    if "postfix" in servers:
        info["postfix"] = servers["postfix"].version()
    info["downstream"] = downstream.name

    results = []
    for size, conns in scenarios:
        label = f"{size_label(size)} x {conns}"
        n, w = messages_for(size, conns), warmup_for(size, conns)
        say(f"== {label}: warm-up {w}, then {runs} run(s) of {n} messages per server")
        for key, server in servers.items():
            if w > 0:
                load(server, size, conns, w, args)
        per: dict[str, list[dict]] = {key: [] for key in servers}
        for r in range(runs):
            for key, server in servers.items():
                res = load(server, size, conns, n, args)
                per[key].append(res)
                extra = ""
                if res.get("delivered_per_s") is not None:
                    extra = f", delivered {res['delivered']} at {res['delivered_per_s']:.0f}/s"
                say(f"   run {r + 1}/{runs} {server.name:<14} {res['msgs_per_s']:8.0f} msg/s  "
                    f"p50 {fmt(res['p50_ms'], '.1f')} ms  p99 {fmt(res['p99_ms'], '.1f')} ms"
                    f"{extra}{'  ERRORS ' + str(res['errors']) if res['errors'] else ''}")
        results.append({"scenario": label, "size": size, "connections": conns, "messages": n, "runs": runs,
                        "servers": {k: summarize(v) for k, v in per.items()},
                        "all_runs": per})
    info["loadavg_end"] = os.getloadavg()

    print()
    print(f"mailbox_guard benchmark (loopback; medians of {runs} run(s) per figure; "
          f"msg/s = accepted 250s per second)")
    print(f"machine: {info['nproc']} CPU(s) ({info['cpu']}), Python {info['python']}, "
          f"aiosmtpd {info['aiosmtpd']}; loops: raw sink {info['raw_sink_loop']}, "
          f"mailbox_guard {info['mailbox_guard_loop']}, load generator {info['loadgen_loop']}")
    print(f"downstream sink: {downstream.name}; "
          + (f"postfix {info['postfix']}" if "postfix" in servers else postfix_note)
          + f"; load average {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end")
    print()
    print(table(results, "postfix" in servers))
    print()
    notes = []
    for r in results:
        for key, s in r["servers"].items():
            if s["errors"]:
                notes.append(f"{r['scenario']} {servers[key].name}: {s['errors']} error(s), e.g. "
                             f"{s['error_samples'][0] if s['error_samples'] else '?'}")
    pipelined = [servers[k].name for k in servers if all(r["servers"][k]["pipelining"] for r in results)]
    print(f"client pipelining ({args.pipelining}): "
          + (", ".join(pipelined) if pipelined else "none") + " pipelined MAIL/RCPT/DATA")
    for r in results:
        raw, mg = r["servers"]["raw"]["msgs_per_s"], r["servers"]["mailbox_guard"]["msgs_per_s"]
        if raw and mg is not None:
            want = 0.5 if r["size"] < 10240 else 1.0
            verdict = "meets" if mg / raw >= want else "MISSES"
            print(f"target {r['scenario']}: mailbox_guard >= {want:g}x raw: {mg / raw:.2f}x, {verdict}")
    for n in notes:
        print("note: " + n)

    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "runs": runs, "pipelining": args.pipelining,
                                               "postfix_note": postfix_note, "scenarios": results}, indent=1))
        say(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
