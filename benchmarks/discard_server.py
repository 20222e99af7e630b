"""A bare aiosmtpd server that accepts every message and throws it away.

It is both the baseline the benchmark compares mailflow against and, when postfix's
``smtp-sink`` is not usable, the relay target. Run as a subprocess::

    python -m benchmarks.discard_server --port 0

It prints ``listening <port>`` once bound and ``messages <n>`` when it gets SIGTERM
or SIGINT, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class DiscardHandler:
    """Counts messages, keeps nothing."""

    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        return "250 2.0.0 Ok: discarded"


async def serve(host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT; return the number of messages accepted."""
    loop = asyncio.get_running_loop()
    handler = DiscardHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare.test", decode_data=False, loop=loop),
        host=host,
        port=port,
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 2)
    return handler.messages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    count = asyncio.run(serve(args.host, args.port))
    print(f"messages {count}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
