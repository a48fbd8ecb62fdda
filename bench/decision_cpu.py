"""CPU cost of the decision step per message: the protocol-free session, no socket.

Drives :class:`mailbox_guard.session.session.Session` as ``policy test`` does (the
default checks, a policy guarding ``example.test``, ``commit=None``: the messages are
built but not stored) with the load generator's own messages, and reports the CPU
time (``time.process_time``) per message in microseconds, two ways:

* **new session**: CONNECT, EHLO, MAIL, RCPT, DATA for every message (what one
  connection per message costs the decision code);
* **reused session**: MAIL, RCPT, DATA on an open session (what the socket bench
  does: its connections are reused).

Each figure is the median of ``--runs`` runs of ``--messages`` messages.

    python bench/decision_cpu.py [--sizes 2k,100k] [--messages 2000] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]   # bench/ first: "bench" is bench.py

import loadgen                                                          # noqa: E402
from mailbox_guard.checks import default_checks                         # noqa: E402
from mailbox_guard.mail.addresses import parse_path                     # noqa: E402
from mailbox_guard.model import SessionFacts                            # noqa: E402
from mailbox_guard.policy.snapshot import Policy                        # noqa: E402
from mailbox_guard.queue.ops import new_queue_id                        # noqa: E402
from mailbox_guard.session.pipeline import Pipeline                     # noqa: E402
from mailbox_guard.session.session import Deps, Session                 # noqa: E402

PEER = "127.0.0.1"           # where the socket bench connects from (not a trusted network)


def bodies(size: int, count: int) -> list[bytes]:
    """The loadgen's message of ``size`` bytes, with a Message-ID of its own each."""
    before, after = loadgen.build_message(size, 0)
    return [before + f"{i:020d}".encode() + after for i in range(count)]


def expect_queued(result) -> None:
    if not result.reply.startswith("250"):
        raise SystemExit(f"decision_cpu: the session refused the bench message: {result.reply}")


async def measure(size: int, count: int, reuse: bool) -> float:
    """CPU microseconds per message over ``count`` messages."""
    policy = Policy.from_sections(1, domains=[{"name": "example.test"}])
    deps = Deps(pipeline=Pipeline(default_checks()), policy=lambda: policy,
                new_queue_id=new_queue_id, commit=None)
    sender = parse_path("<sender@bench-client.test>")
    rcpt = parse_path("<a@example.test>")
    msgs = bodies(size, count)

    def new_session(n: int) -> Session:
        return Session(SessionFacts(connection_id=f"B{n}", listener="inbound", listener_kind="inbound",
                                    peer_ip=PEER, peer_port=40000 + n % 20000,
                                    trusted_network=policy.is_trusted(PEER)), deps)

    async def greeted(n: int) -> Session:
        s = new_session(n)
        if await s.connect() is not None or await s.helo("bench-client.test", True) is not None:
            raise SystemExit("decision_cpu: the session refused the bench client at CONNECT/EHLO")
        return s

    open_session = await greeted(0) if reuse else None
    gc.collect()
    t0 = time.process_time()
    for n, body in enumerate(msgs):
        s = open_session if reuse else await greeted(n)
        reply = await s.mail(sender, ["SIZE=%d" % size])
        reply = reply or (await s.rcpt(rcpt, []))[0]
        if reply is not None:
            raise SystemExit(f"decision_cpu: the session refused the bench envelope: {reply}")
        result = await s.data(body)
        if n == 0:
            expect_queued(result)
        if not reuse:
            s.close()
    return (time.process_time() - t0) * 1e6 / count


def run(sizes: list[int], messages: dict[int, int], runs: int) -> list[dict]:
    out = []
    for size in sizes:
        row = {"size": size, "messages": messages[size]}
        for reuse in (False, True):
            key = "reused_us_per_msg" if reuse else "new_session_us_per_msg"
            asyncio.run(measure(size, max(20, messages[size] // 10), reuse))       # warm-up
            values = [asyncio.run(measure(size, messages[size], reuse)) for _ in range(runs)]
            row[key] = statistics.median(values)
            row[key.replace("_per_msg", "_runs")] = values
        out.append(row)
    return out


def main() -> None:
    from bench import parse_size, size_label
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2k,100k", help="message sizes (default 2k,100k)")
    ap.add_argument("--messages", type=int, default=None, help="messages per run (default 2000 below 10 KB, else 500)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    messages = {s: args.messages or (2000 if s < 10240 else 500) for s in sizes}
    rows = run(sizes, messages, args.runs)
    if args.json:
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
        return
    for r in rows:
        print(f"{size_label(r['size']):>7}: {r['new_session_us_per_msg']:7.0f} us/msg with a new session, "
              f"{r['reused_us_per_msg']:7.0f} us/msg on a reused one (median of {args.runs})")


if __name__ == "__main__":
    main()
