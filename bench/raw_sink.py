"""The baseline: a bare aiosmtpd accept-and-discard SMTP server.

Plain ``loop.create_server(lambda: SMTP(handler))`` (no Controller thread, no
storage): ``handle_DATA`` answers 250 and drops the message. This is what "raw
aiosmtpd" means in the benchmark. ``--loop`` picks the event loop; the bench gives
it the one the engine runs on (uvloop where installed, as ``run_engine`` does), so
that the two servers differ in their own code only.

    python bench/raw_sink.py --port 40123 [--host 127.0.0.1] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiosmtpd.smtp import SMTP


class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard()
    # A fixed hostname: aiosmtpd would otherwise call socket.getfqdn() per connection.
    server = await loop.create_server(lambda: SMTP(handler, hostname="sink.test"),
                                      host, port, reuse_address=True, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="asyncio")
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(main(args.host, args.port))
    else:
        asyncio.run(main(args.host, args.port))
