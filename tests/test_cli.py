"""The CLI as an admin runs it: policy nouns, --json parsed back, exit codes
(0 ok, 1 failed, 2 usage), one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from cli.app import app
from tests.conftest import ROOT


def cli(home, *args):
    return subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(home), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_domains_round_trip_with_json(tmp_path):
    home = tmp_path / "h"
    assert cli(home, "domains", "add", "Example.TEST", "--next-hop", "127.0.0.1:2600").returncode == 0
    assert cli(home, "domains", "add", "mx.test").returncode == 0
    out = cli(home, "domains", "list", "--json")
    assert json.loads(out.stdout) == [{"name": "example.test", "next_hop": "127.0.0.1:2600"},
                                      {"name": "mx.test", "next_hop": None}]
    assert cli(home, "domains", "remove", "mx.test").returncode == 0
    assert [d["name"] for d in json.loads(cli(home, "domains", "list", "--json").stdout)] == ["example.test"]


def test_failures_exit_1_with_one_line(tmp_path):
    home = tmp_path / "h"
    for args in (("domains", "add", "not a domain"), ("domains", "remove", "absent.test"),
                 ("networks", "add", "10.0.0.300/8"), ("config", "set", "smtp.max_recipients", "lots"),
                 ("config", "set", "no.such.key", "1"), ("recipients", "add", "bob@unguarded.test"),
                 ("domains", "add", "x.test", "--next-hop", "host:notaport")):
        out = cli(home, *args)
        assert out.returncode == 1, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert out.stderr.startswith("mailbox-guard: ") and "Traceback" not in out.stderr


def test_usage_errors_exit_2(tmp_path):
    home = tmp_path / "h"
    for args in (("domains", "add"), ("domains", "frobnicate"), ("serve", "--inbound", "nonsense"),
                 ("nosuchnoun",)):
        out = cli(home, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_networks_listeners_config(tmp_path):
    home = tmp_path / "h"
    assert cli(home, "networks", "add", "10.1.2.3/8", "--comment", "office").returncode == 0
    assert json.loads(cli(home, "networks", "list", "--json").stdout) == [
        {"cidr": "10.0.0.0/8", "comment": "office"}]
    defaults = json.loads(cli(home, "listeners", "list", "--json").stdout)
    assert {(r["kind"], r["port"]) for r in defaults} == {("inbound", 2525), ("submission", 2587)}
    assert cli(home, "listeners", "add", "mx", "inbound", "127.0.0.1:2626").returncode == 0
    assert [r["port"] for r in json.loads(cli(home, "listeners", "list", "--json").stdout)] == [2626]
    assert cli(home, "config", "set", "queue.retry_schedule", "30s,2m").returncode == 0
    assert cli(home, "config", "get", "queue.retry_schedule").stdout.strip() == "30s,2m"
    rows = {r["key"]: r for r in json.loads(cli(home, "config", "show", "--json").stdout)}
    assert rows["smtp.max_message_size"]["value"] == "10240000"
    assert cli(home, "config", "unset", "queue.retry_schedule").returncode == 0
    assert cli(home, "config", "get", "queue.retry_schedule").stdout.strip() == "1m,5m,15m,1h,4h"


def test_every_command_has_help_and_an_example():
    import typer.main
    root = typer.main.get_command(app)
    missing = []

    def walk(cmd, path):
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, path + [name])
        else:
            text = cmd.help or ""
            if not text.strip() or "Example:" not in text:
                missing.append(" ".join(path))
    walk(root, [])
    assert missing == []


def test_help_runs_in_process(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "domains", "--help"])
    assert result.exit_code == 0 and "next hop" in result.output.lower()
