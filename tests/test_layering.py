"""The dependency direction is a contract: .importlinter at the repository top holds it
(layers from the engine down to the data types; checks, policy, model, session and mail
import no SMTP library, no sqlite and no store; nothing in mailbox_guard imports an
operator surface; only mailbox_guard.smtp imports aiosmtpd), and these tests run it,
show that it fails on a forbidden import, and keep two textual checks and one
fresh-interpreter check that need no import graph."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The test extra installs it; a missing import-linter is an error here, never a skip.
import importlinter  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mailbox_guard"
CONFIG = ROOT / ".importlinter"
SURFACES = ("cli", "tui", "typer", "textual", "click", "rich")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the tree at cwd (it reads cwd/.importlinter and puts cwd first
    on sys.path, so a copy is analysed, not the installed package). No cache: it would
    be runtime data in the repository."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    # A wide console: rich wraps long contract names and import chains at 80 columns.
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_import_contracts_are_kept():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 kept, 0 broken" in run.stdout, run.stdout


def test_every_module_of_the_engine_sits_in_a_layer():
    """A new package outside the layers would be bound by no direction at all."""
    config = configparser.ConfigParser()
    config.read(CONFIG)
    layers = config["importlinter:contract:engine-layers"]["layers"]
    in_layers = {name.strip() for line in layers.splitlines() for name in re.split(r"[|:]", line)
                 if name.strip()}
    on_disk = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert in_layers == on_disk


def test_a_forbidden_import_breaks_the_contract(tmp_path):
    """A copy of the tree with three forbidden imports added: import-linter fails and
    names each one, by importer, imported module and line."""
    for name in ("mailbox_guard", "cli", "tui"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(CONFIG, tmp_path / ".importlinter")

    def append(relative: str, line: str) -> int:
        path = tmp_path / "mailbox_guard" / relative
        text = path.read_text()
        path.write_text(text + ("" if text.endswith("\n") else "\n") + line + "\n")
        return len(path.read_text().splitlines())

    sqlite_line = append("checks/rcpt_relay.py", "import sqlite3")
    store_line = append("policy/decide.py", "from mailbox_guard.store import db")
    aiosmtpd_line = append("lookups/dns.py", "import aiosmtpd")

    run = lint_imports(tmp_path)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert "3 broken" in out, out
    assert "mailbox_guard.checks is not allowed to import sqlite3" in out, out
    assert f"mailbox_guard.checks.rcpt_relay -> sqlite3 (l.{sqlite_line})" in out, out
    assert "mailbox_guard.policy is not allowed to import mailbox_guard.store" in out, out
    assert f"mailbox_guard.policy.decide -> mailbox_guard.store.db (l.{store_line})" in out, out
    # Indirectly too: the session imports policy.decide, which now reaches the store.
    assert "mailbox_guard.session is not allowed to import mailbox_guard.store" in out, out
    assert "Illegal imports of protected package aiosmtpd" in out, out
    assert f"mailbox_guard.lookups.dns -> aiosmtpd (l.{aiosmtpd_line})" in out, out


def test_no_engine_file_names_an_operator_surface():
    """Textual check over every engine file, __main__ included: the engine reaches its
    command line only through the installed entry point."""
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(SURFACES)})\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_only_the_smtp_package_imports_aiosmtpd():
    pattern = re.compile(r"^\s*(from|import)\s+aiosmtpd\b", re.M)
    importers = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())}
    assert importers == {"smtp"}


def test_importing_the_engine_loads_no_operator_surface():
    """What import-linter cannot see: a dependency of ours that drags in a terminal
    library. Checked in a fresh interpreter, where sys.modules is the truth."""
    code = ("import sys, json, mailbox_guard.engine; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True, timeout=60)
    loaded = set(json.loads(run.stdout))
    assert "aiosmtpd" in loaded     # the import really built the engine
    assert loaded & set(SURFACES) == set()
