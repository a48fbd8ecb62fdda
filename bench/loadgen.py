"""SMTP load generator: C connections send N messages of S bytes in total; prints JSON.

Run in its own process so its CPU is not counted in the server's. Each connection
does EHLO once, then loops MAIL, RCPT, DATA, body; the connection is reused for the
next message. MAIL/RCPT/DATA go in one write when the server advertises PIPELINING
(``--pipelining auto``, the default; ``off`` always waits for each reply).

The clock starts once all connections have been opened and greeted (so connection
set-up is not counted) and stops at the last reply. Latency per message is the time
from writing the end of the message data (body and the final ``.`` line go out in
one write) to reading the server's reply; only 250 replies count as accepted.

    python bench/loadgen.py --port 40123 --connections 10 --size 2048 --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import sys
import time

LINE = 76          # body line length before CRLF (RFC 5322 allows 998)


def loop_name() -> str:
    try:
        import uvloop
        return f"uvloop {uvloop.__version__}"
    except ImportError:
        return "asyncio"


def build_message(size: int, conn_no: int) -> tuple[bytes, bytes]:
    """Headers and body of exactly ``size`` bytes (with a 20-digit Message-ID
    placeholder filled per message). Returns (before_id, after_id)."""
    before = (f"From: Bench Sender <sender@bench-client.test>\r\n"
              f"To: Bench Recipient <user{conn_no}@example.test>\r\n"
              f"Subject: benchmark message of {size} bytes\r\n"
              f"Date: Tue, 01 Dec 2026 08:00:00 +0000\r\n"
              f"MIME-Version: 1.0\r\n"
              f"Content-Type: text/plain; charset=us-ascii\r\n"
              f"Message-ID: <").encode()
    after_head = b"@bench-client.test>\r\n\r\n"
    fixed = len(before) + 20 + len(after_head)
    remaining = max(size - fixed, 2)
    pattern = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstuvwxyz "
    lines = []
    while remaining > 0:
        n = min(LINE + 2, remaining)
        if n < 3:                     # pad the previous line instead of a lone CRLF
            lines[-1] = lines[-1][:-2] + b"x" * n + b"\r\n"
            break
        text = (pattern * 2)[:n - 2]
        lines.append(text + b"\r\n")
        remaining -= n
    return before, after_head + b"".join(lines)


class ReplyError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One (possibly multi-line) SMTP reply: (code, full text)."""
    text = b""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        text += line
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), text
            except ValueError:
                raise ReplyError(f"bad reply {line[:80]!r}") from None


class Stats:
    def __init__(self, total: int) -> None:
        self.total = total
        self.issued = 0
        self.accepted = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.latencies: list[float] = []
        self.reconnects = 0
        self.pipelined: set[bool] = set()

    def ticket(self) -> bool:
        if self.issued >= self.total:
            return False
        self.issued += 1
        return True

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:200])


async def open_session(host: str, port: int, pipelining: str, timeout: float):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    code, text = await asyncio.wait_for(read_reply(reader), timeout)
    if code != 220:
        writer.close()
        raise ReplyError(f"banner: {text.decode(errors='replace').strip()}")
    writer.write(b"EHLO bench-client.test\r\n")
    code, text = await asyncio.wait_for(read_reply(reader), timeout)
    if code != 250:
        writer.close()
        raise ReplyError(f"EHLO: {text.decode(errors='replace').strip()}")
    advertised = any(line[4:].strip().upper() == b"PIPELINING" for line in text.split(b"\r\n"))
    pipe = pipelining == "on" or (pipelining == "auto" and advertised)
    return reader, writer, pipe


async def worker(no: int, sess, args, stats: Stats, start: asyncio.Event) -> None:
    reader, writer, pipe = sess
    stats.pipelined.add(pipe)
    before, after = build_message(args.size, no)
    env = (f"MAIL FROM:<sender@bench-client.test> SIZE={args.size}\r\n"
           f"RCPT TO:<user{no}@example.test>\r\n").encode()
    seq = 0
    prefix = f"{os.getpid() % 100000:05d}{no:05d}".encode()
    lat = stats.latencies
    await start.wait()
    while stats.ticket():
        seq += 1
        try:
            if reader is None:
                stats.reconnects += 1
                reader, writer, pipe = await open_session(args.host, args.port, args.pipelining, args.timeout)
            if pipe:
                writer.write(env + b"DATA\r\n")
                replies = [await read_reply(reader) for _ in range(3)]
            else:
                replies = []
                for cmd in env.split(b"\r\n")[:2] + [b"DATA"]:
                    writer.write(cmd + b"\r\n")
                    replies.append(await read_reply(reader))
                    if replies[-1][0] >= 400:
                        break
            codes = [c for c, _ in replies]
            if codes != [250, 250, 354]:
                bad = next((t for c, t in replies if c >= 400), replies[-1][1])
                stats.error(bad.decode(errors="replace").strip())
                if len(codes) == 3 and codes[2] == 354:      # DATA accepted anyway: send an empty message
                    writer.write(b".\r\n")
                    await read_reply(reader)
                writer.write(b"RSET\r\n")
                await read_reply(reader)
                continue
            data = before + prefix + f"{seq:010d}".encode() + after + b".\r\n"
            t0 = time.perf_counter()
            writer.write(data)
            code, text = await asyncio.wait_for(read_reply(reader), args.timeout)
            t1 = time.perf_counter()
            if code == 250:
                stats.accepted += 1
                lat.append(t1 - t0)
            else:
                stats.error(text.decode(errors="replace").strip())
        except (OSError, ConnectionError, ReplyError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            stats.error(f"{type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        try:
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(read_reply(reader), 5)
        except Exception:
            pass
        writer.close()


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)      # nearest rank
    return sorted_values[k]


async def run(args) -> dict:
    stats = Stats(args.messages)
    sessions = await asyncio.gather(*(open_session(args.host, args.port, args.pipelining, args.timeout)
                                      for _ in range(args.connections)), return_exceptions=True)
    failed = [s for s in sessions if isinstance(s, BaseException)]
    if failed:
        for s in sessions:
            if not isinstance(s, BaseException):
                s[1].close()
        raise SystemExit(f"loadgen: cannot open {len(failed)} of {args.connections} connection(s) "
                         f"to {args.host}:{args.port}: {failed[0]!r}")
    start = asyncio.Event()
    tasks = [asyncio.ensure_future(worker(i, s, args, stats, start)) for i, s in enumerate(sessions)]
    await asyncio.sleep(0)
    wall0 = time.time()
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    lat = sorted(stats.latencies)
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    return {
        "accepted": stats.accepted, "errors": stats.errors, "error_samples": stats.error_samples,
        "reconnects": stats.reconnects, "messages": args.messages, "size": args.size,
        "connections": args.connections, "elapsed": elapsed,
        "msgs_per_s": stats.accepted / elapsed if elapsed > 0 else 0.0,
        "p50_ms": None if p50 is None else p50 * 1000, "p99_ms": None if p99 is None else p99 * 1000,
        "started_at": wall0, "ended_at": wall0 + elapsed,
        "pipelining": sorted(stats.pipelined) == [True], "loop": loop_name(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes (headers + body)")
    ap.add_argument("--messages", type=int, default=1000, help="messages in total, over all connections")
    ap.add_argument("--pipelining", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds allowed for any one reply")
    args = ap.parse_args()
    try:
        import uvloop
        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
