"""One Raft transport in its own process, with few file descriptors, for pressure tests.

::

    python -m tests.support.raft_transport_listener --node 2 --bind 127.0.0.1:PORT \\
        --peer 1=127.0.0.1:PORT1 --secret-hex HEX [--spare-fds 16] [--loop uvloop] ...

It lowers ``RLIMIT_NOFILE`` to the descriptors it already holds plus ``--spare-fds``, so
a flood of connections makes ``accept()`` fail with ``EMFILE``.  It prints ``READY
host:port`` on stdout once listening, echoes every payload back to its sender, and
answers the payload ``b"stats"`` with the JSON of ``listener_stats()``.  Logs go to
stderr.  It stops by itself when stdin closes or after ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import sys
import threading

from nebula.raft.transport import Transport


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    peers = dict((int(i), a) for i, a in (p.split("=", 1) for p in args.peer))
    transport: Transport

    def on_message(frm: int, payload: bytes) -> None:
        if payload == b"stats":
            transport.send(frm, json.dumps(transport.listener_stats()).encode())
        else:
            transport.send(frm, payload)

    transport = Transport(
        args.node,
        args.bind,
        peers,
        bytes.fromhex(args.secret_hex),
        on_message=on_message,
        handshake_timeout=args.handshake_timeout,
        max_unauthenticated=args.max_unauthenticated,
        retry_interval=0.02,
        max_retry_interval=0.2,
    )
    await transport.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + args.spare_fds
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"READY {transport.address}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), args.deadline)
    except TimeoutError:
        pass
    finally:
        await transport.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", type=int, required=True)
    ap.add_argument("--bind", required=True)
    ap.add_argument("--peer", action="append", default=[])
    ap.add_argument("--secret-hex", required=True)
    ap.add_argument("--spare-fds", type=int, default=16)
    ap.add_argument("--handshake-timeout", type=float, default=0.5)
    ap.add_argument("--max-unauthenticated", type=int, default=100_000)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--deadline", type=float, default=30.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
