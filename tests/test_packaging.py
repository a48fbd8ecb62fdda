"""The built artefacts, run as an admin runs them. ``packaging/build-pyz`` builds
``mailbox-guard.pyz`` (shiv), and the archive runs with an interpreter that has
only the standard library: ``serve`` relays a message to a sink, ``status --json``
reports on it, ``tui --help`` answers. The project's wheel (what ``pip install .``
installs) and the archive, each run by Debian's ``/usr/bin/python3`` in a clean
environment, add a user who then logs in: every data file the code opens
(``schema.sql``, the list of common passwords) is inside. Plus the archive's
contents, its compiled modules under the kernel's W^X rule, and the systemd unit.

The archive and the wheel are built once per session (10-15 s each with a warm pip
cache); set ``MAILBOX_GUARD_PYZ=path`` to test a prebuilt archive instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, make_message, wait_for_banner

pytestmark = pytest.mark.timeout(600)

UNIT = ROOT / "packaging" / "mailbox-guard.service"
SYSTEM_PYTHON = "/usr/bin/python3"       # Debian's, the unit's ExecStart
LEFT_OUT = ("aiohttp", "requests", "pip")
COMPILED = ("argon2", "_argon2_cffi_bindings", "_cffi_backend", "uvloop", "pydantic_core", "maxminddb")


@pytest.fixture(scope="session")
def pyz(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("MAILBOX_GUARD_PYZ")
    if prebuilt:
        return Path(prebuilt).resolve()
    out = tmp_path_factory.mktemp("pyz") / "mailbox-guard.pyz"
    proc = subprocess.run([sys.executable, str(ROOT / "packaging" / "build-pyz"), "--output", str(out)],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"build-pyz failed:\n{proc.stdout}\n{proc.stderr}"
    assert out.is_file()
    return out


@pytest.fixture(scope="session")
def bare_python() -> str:
    """The interpreter under the venv: same version, none of the venv's packages."""
    python = getattr(sys, "_base_executable", None) or sys.executable
    version = subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == str(sys.version_info[:2])
    return python


@pytest.fixture(scope="session")
def system_python() -> str:
    assert os.access(SYSTEM_PYTHON, os.X_OK), f"{SYSTEM_PYTHON} is required (Debian: python3)"
    return SYSTEM_PYTHON


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory, system_python) -> Path:
    """The project as ``pip install .`` installs it, into a fresh venv of
    /usr/bin/python3 (no system site-packages, no pip inside); its dependencies come
    from the package index. Returns the venv's ``bin``."""
    work = tmp_path_factory.mktemp("wheel")
    # A copy of the checkout: pip builds in the source folder, and a stale build/
    # there could hide a file the wheel misses.
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "mailbox-guard-data"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

    def run(cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"

    run([*pip, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(work / "dist"), str(source)])
    (wheel,) = (work / "dist").glob("mailbox_guard-*.whl")
    venv = work / "venv"
    run([system_python, "-m", "venv", "--without-pip", str(venv)])
    run([*pip, "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-compile", str(wheel)])
    return venv / "bin"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """What a fresh login on a machine with only python3 has: no PYTHON*, no SHIV_*."""
    home.mkdir(parents=True, exist_ok=True)
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **extra}


# ----------------------------------------------------------------------------- contents
def stop(engine: subprocess.Popen) -> int:
    """SIGTERM, as systemd stops it; its exit code (a kill after 60 s is a failure)."""
    if engine.poll() is None:
        engine.send_signal(signal.SIGTERM)
    try:
        return engine.wait(60)
    except subprocess.TimeoutExpired:
        engine.kill()
        engine.wait()
        return -9


def test_archive_holds_the_runtime_schema_and_css_and_not_the_unused_clients(pyz):
    with zipfile.ZipFile(pyz) as z:
        names = set(z.namelist())
        environment = json.loads(z.read("environment.json"))
        schema = z.read("site-packages/mailbox_guard/schema.sql")
        target = json.loads(z.read("site-packages/bin/pyz-target.json"))
    assert environment["entry_point"] == "cli.app:main"
    assert schema == (ROOT / "schema.sql").read_bytes()

    # Every module, data file and subpackage of ours (tui.screens, mailbox_guard/data, ...).
    ours = [p.relative_to(ROOT).as_posix() for top in ("mailbox_guard", "cli", "tui")
            for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert "mailbox_guard/data/common-passwords.txt" in ours
    assert [f for f in ours if f"site-packages/{f}" not in names] == []

    top = {n.split("/")[1] for n in names if n.startswith("site-packages/") and n.count("/") >= 2}
    top |= {n.split("/")[1] for n in names if n.startswith("site-packages/") and n.count("/") == 1}
    for name in COMPILED:
        assert any(t == name or t.startswith(name + ".") for t in top), name
    for name in LEFT_OUT:
        assert name not in top
        assert not [t for t in top if t.lower().startswith(name + "-") and t.endswith(".dist-info")]
    assert target["python"] == "%d.%d" % sys.version_info[:2] and target["exact_python"]


def test_the_bare_interpreter_has_only_the_standard_library(bare_python, tmp_path):
    probe = ("import importlib.util as u; print([m for m in " + repr(
        ["aiosmtpd", "typer", "textual", "cffi", "_cffi_backend", "pydantic", "dns", "mailbox_guard", "cli"])
        + " if u.find_spec(m)])")
    proc = subprocess.run([bare_python, "-I", "-S", "-c", probe], env=clean_env(tmp_path / "home"),
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- end to end
def test_pyz_serves_relays_reports_status_and_stops_cleanly(pyz, bare_python, sink, tmp_path):
    home = tmp_path / "login"              # $HOME: empty, so shiv unpacks to ~/.shiv
    state = tmp_path / "state"             # the gateway's --home
    env = clean_env(home)

    def pyz_cmd(*args: str) -> list[str]:
        return [bare_python, "-I", "-S", str(pyz), "--home", str(state), *args]

    def cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(pyz_cmd(*args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"mailbox-guard {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
        return proc

    cli("domains", "add", "example.test", "--next-hop", sink.hop)
    cli("config", "set", "dns.nameservers", "127.0.0.1:9")      # never the system resolver in tests
    cli("config", "set", "smtp.hostname", "gw.test")
    assert [p.name.split("_")[0] for p in (home / ".shiv").iterdir() if p.is_dir()] == ["mailbox-guard.pyz"]

    inbound, submission = free_port(), free_port()
    log_path = tmp_path / "engine.log"
    with open(log_path, "wb") as log:
        engine = subprocess.Popen(pyz_cmd("serve", "--inbound", f"127.0.0.1:{inbound}",
                                          "--submission", f"127.0.0.1:{submission}"),
                                  env=dict(env, PYTHONUNBUFFERED="1"), cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_banner(inbound, timeout=30, proc=engine)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n--- engine log ---\n{log_path.read_text(errors='replace')}") from None

        original = make_message(subject="through the pyz")
        with smtplib.SMTP("127.0.0.1", inbound, local_hostname="client.test", timeout=10) as s:
            s.sendmail("alice@sender.test", ["bob@example.test"], original)
        got = sink.wait_for(1)[0]
        assert got.mail_from == "alice@sender.test"
        assert got.rcpt_tos == ["bob@example.test"]
        assert got.data.endswith(original)

        info = json.loads(cli("status", "--json").stdout)
        assert info["pid"] == engine.pid
        assert {(lst["kind"], lst["port"]) for lst in info["listeners"]} == {
            ("inbound", inbound), ("submission", submission)}
        assert "queue" in info
        # The single file carries no gssapi package: GSSAPI is not offered, and the
        # engine says why instead of failing.
        assert info["gssapi"]["offered"] is False
        assert "gssapi package is not installed" in info["gssapi"]["reason"]

        help_text = cli("tui", "--help").stdout
        assert "Usage" in help_text and "tui" in help_text
    finally:
        code = stop(engine)
    assert code == 0, log_path.read_text(errors="replace")
    assert "stopped cleanly" in log_path.read_text(errors="replace")


# ----------------------------------------------------------------------------- first user, wheel and pyz
PASSWORD = "Corr3ct-Horse-Battery"


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE       # the engine's first-start self-signed certificate
    return ctx


def add_a_user_who_then_logs_in(command: list[str], env: dict[str, str], tmp_path: Path) -> None:
    """An admin's first steps with a fresh install: a domain, a user (the password
    policy reads the shipped list of common passwords), the engine, a login."""
    state = tmp_path / "state"

    def cli(*args: str, stdin: str | None = None, ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*command, "--home", str(state), *args], input=stdin, env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert (proc.returncode == 0) is ok, f"mailbox-guard {' '.join(args)} -> {proc.returncode}\n{proc.stderr}"
        return proc

    cli("domains", "add", "example.test", "--next-hop", "127.0.0.1:9")
    cli("config", "set", "dns.nameservers", "127.0.0.1:9")      # never the system resolver in tests
    assert "added alice@example.test" in cli("users", "add", "alice@example.test", "--password-stdin",
                                             stdin=PASSWORD + "\n").stdout
    common = cli("users", "add", "bob@example.test", "--password-stdin", stdin="Welcome2024!\n", ok=False)
    assert common.returncode == 1
    assert common.stderr.strip().splitlines() == [
        "mailbox-guard: password is on the list of common passwords (policy *)"]

    inbound, submission = free_port(), free_port()
    log_path = tmp_path / "engine.log"
    with open(log_path, "wb") as log:
        engine = subprocess.Popen([*command, "--home", str(state), "serve", "--inbound", f"127.0.0.1:{inbound}",
                                   "--submission", f"127.0.0.1:{submission}"],
                                  env=dict(env, PYTHONUNBUFFERED="1"), cwd=tmp_path, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_banner(submission, timeout=30, proc=engine)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n--- engine log ---\n{log_path.read_text(errors='replace')}") from None
        with smtplib.SMTP("127.0.0.1", submission, local_hostname="client.test", timeout=10) as s:
            s.starttls(context=insecure())
            s.ehlo()
            s.user, s.password = "alice@example.test", "Wr0ng-Horse-Battery"
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                s.auth("PLAIN", s.auth_plain)
            assert refused.value.smtp_code == 535
            s.password = PASSWORD
            assert s.auth("PLAIN", s.auth_plain)[0] == 235
            assert s.docmd("MAIL", "FROM:<alice@example.test>")[0] == 250
    finally:
        code = stop(engine)
    assert code == 0, log_path.read_text(errors="replace")


def test_the_installed_wheel_adds_a_user_who_then_logs_in(installed_wheel, tmp_path):
    add_a_user_who_then_logs_in([str(installed_wheel / "mailbox-guard")], clean_env(tmp_path / "login"), tmp_path)


def test_the_pyz_run_by_the_system_python_adds_a_user_who_then_logs_in(pyz, system_python, tmp_path):
    version = subprocess.run([system_python, "-I", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == str(sys.version_info[:2]), f"{system_python} is {version}: the archive is built for this one"
    # As the unit runs it: -I, but with Debian's own site-packages on the path.
    add_a_user_who_then_logs_in([system_python, "-I", str(pyz)], clean_env(tmp_path / "login"), tmp_path)


# ----------------------------------------------------------------------------- the unit's interpreter
def _service_python(bare_python: str) -> str:
    """Debian's /usr/bin/python3 (the unit's ExecStart) when it is this minor version."""
    system = "/usr/bin/python3"
    if os.path.exists(system):
        version = subprocess.run([system, "-I", "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
        if version == str(sys.version_info[:2]):
            return system
    return bare_python


PROBE = r"""
import ctypes, importlib, importlib.machinery, json, sys
from pathlib import Path
import argon2, uvloop
import aiosmtpd.smtp, dkim, spf, dns.asyncresolver, geoip2.database, sqlite_utils, textual.app, typer
import mailbox_guard.store.db, mailbox_guard.engine, cli.app
hasher = argon2.PasswordHasher()
assert hasher.verify(hasher.hash("secret"), "secret")
async def main():
    return 42
assert uvloop.run(main()) == 42
assert "CREATE" in mailbox_guard.store.db.schema_text()
# Every compiled module in the archive, imported.
site = Path(mailbox_guard.__file__).parent.parent
suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
names = sorted(".".join(p.relative_to(site).parent.parts + (p.name.split(".")[0],))
               for p in site.rglob("*.so") if p.name.endswith(suffixes))
files = {n: importlib.import_module(n).__file__ for n in names}
files["mailbox_guard.store.db"] = mailbox_guard.store.db.__file__
libc = ctypes.CDLL(None, use_errno=True)
print(json.dumps({"mdwe": libc.prctl(66, 0, 0, 0, 0), "files": files}))     # PR_GET_MDWE
"""

# Sets the kernel's memory-deny-write-execute rule (Linux >= 6.3; what the unit's
# MemoryDenyWriteExecute=yes enforces with seccomp), then becomes the real command.
MDWE_LAUNCHER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:      # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_compiled_modules_load_from_the_archive_under_the_units_interpreter_and_wx_rule(
        pyz, bare_python, tmp_path):
    python = _service_python(bare_python)
    shiv_root = tmp_path / "shiv"
    env = clean_env(tmp_path / "home", SHIV_ROOT=str(shiv_root), SHIV_INTERPRETER="1")
    # As in the unit: -I but with site-packages (Debian's own cffi and friends are
    # on the path there); the archive's copies must win.
    command = [python, "-I", str(pyz), "-c", PROBE]
    launched = subprocess.run([python, "-I", "-c", MDWE_LAUNCHER, *command], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    if launched.returncode == 77:            # an older kernel: no W^X rule, still check the imports
        launched = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr
    result = json.loads(launched.stdout.strip().splitlines()[-1])
    assert {"_cffi_backend", "_argon2_cffi_bindings._ffi", "uvloop.loop",
            "pydantic_core._pydantic_core"} <= set(result["files"])
    for name, file in result["files"].items():
        assert Path(file).is_relative_to(shiv_root), (name, file)
    # The kernel of these machines has PR_SET_MDWE (Linux 6.3+); an older one cannot
    # check the unit's MemoryDenyWriteExecute rule, and that is a failure, not a pass.
    assert result["mdwe"] >= 0, "no PR_SET_MDWE on this kernel: the W^X rule could not be checked"
    assert result["mdwe"] & 1


def test_the_archive_refuses_an_interpreter_it_was_not_built_for_in_one_line(pyz, bare_python, tmp_path):
    # The same archive, told that it was built for CPython 3.99: what a 3.12 user
    # of a 3.11 build sees (checked by hand with real 3.10 and 3.12 interpreters).
    other = tmp_path / "mailbox-guard.pyz"
    with zipfile.ZipFile(pyz) as src, zipfile.ZipFile(other, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "site-packages/bin/pyz-target.json":
                data = json.dumps(dict(json.loads(data), python="3.99")).encode()
            dst.writestr(info, data)
    proc = subprocess.run([bare_python, "-I", "-S", str(other), "--help"], env=clean_env(tmp_path / "home"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    version = "%d.%d" % sys.version_info[:2]
    assert proc.stderr.startswith("mailbox-guard.pyz: built for CPython 3.99 on linux")
    assert f"this is cpython {version}" in proc.stderr and "packaging/build-pyz --python" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the unit
def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_is_hardened_and_runs_the_pyz_as_its_own_user():
    s = unit_settings()
    expected = {
        "User": "mailbox-guard", "Group": "mailbox-guard",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "StateDirectory": "mailbox-guard",
        "StateDirectoryMode": "0750", "ReadWritePaths": "/var/lib/mailbox-guard",
        "KillSignal": "SIGTERM", "TimeoutStopSec": "60", "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    assert {k: s.get(k, [None])[-1] for k in expected} == expected
    assert "@system-service" in s["SystemCallFilter"]
    assert "SHIV_ROOT=/var/lib/mailbox-guard/.shiv" in s["Environment"]
    (exec_start,) = s["ExecStart"]
    assert exec_start.startswith("/usr/bin/python3 /opt/mailbox-guard/mailbox-guard.pyz "
                                 "--home /var/lib/mailbox-guard serve ")
    assert "PrivateUsers" not in s          # would take the port capability away


def test_systemd_accepts_the_unit_and_rates_it_ok(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is required (Debian: systemd; ./run test installs it)"
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
                              capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
