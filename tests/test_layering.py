"""The dependency direction is a contract: the engine never imports the operator
surfaces (textual, typer, tui, cli); checks and policy import no aiosmtpd and no
sqlite3; only smtp_server imports aiosmtpd. Checked in a fresh interpreter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE_MODULES = sorted(
    "mailbox_guard." + ".".join(p.relative_to(ROOT / "mailbox_guard").with_suffix("").parts)
    for p in (ROOT / "mailbox_guard").rglob("*.py")
    if p.name not in ("__init__.py", "__main__.py"))


def imported_by(module: str) -> set[str]:
    code = (f"import sys, json; import {module}; "
            "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    return set(json.loads(out.stdout))


def test_engine_modules_were_found():
    assert "mailbox_guard.engine" in ENGINE_MODULES and "mailbox_guard.checks.rcpt_relay" in ENGINE_MODULES


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engine_never_imports_operator_surfaces(module):
    assert not imported_by(module) & {"textual", "typer", "tui", "cli", "rich"}


@pytest.mark.parametrize("module", [m for m in ENGINE_MODULES
                                    if m.startswith("mailbox_guard.checks.")
                                    or m in ("mailbox_guard.policy", "mailbox_guard.pipeline",
                                             "mailbox_guard.addresses", "mailbox_guard.config")])
def test_checks_and_policy_import_no_smtp_library_and_no_sqlite(module):
    assert not imported_by(module) & {"aiosmtpd", "sqlite3", "_sqlite3", "aiosmtplib"}


def test_no_engine_file_names_an_operator_surface():
    """Textual check over every engine file, __main__ included: the engine reaches its
    command line only through the installed entry point."""
    pattern = re.compile(r"^\s*(from|import)\s+(cli|tui|typer|textual|rich)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "mailbox_guard").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_only_the_adapter_imports_aiosmtpd():
    offenders = []
    for path in (ROOT / "mailbox_guard").rglob("*.py"):
        text = path.read_text()
        if ("import aiosmtpd" in text or "from aiosmtpd" in text) and path.name != "smtp_server.py":
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
