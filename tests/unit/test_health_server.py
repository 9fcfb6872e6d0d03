"""The /metrics, /healthz, /readyz server against clients that misbehave.

It runs on the signing event loop and its sockets are the process's file descriptors:
clients that open connections and never send a request must not take every
descriptor the validator connections, the Raft peers and the state file need.
"""

from __future__ import annotations

import asyncio
import os

import uvloop

from nebula.metrics import HealthServer, Metrics
from tests.support.ports import free_ports


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _server(metrics: Metrics, timeout: float) -> tuple[HealthServer, int]:
    (port,) = free_ports(1)
    server = HealthServer(metrics, "127.0.0.1", port, lambda: (True, "ok"))
    server.timeout = timeout
    await server.start()
    return server, port


async def _wait_for(cond, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.05)):
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


def test_idle_connections_beyond_the_limit_are_closed_at_once() -> None:
    """Connections that never send their request hold a descriptor each until the
    request deadline; more than the server's limit of them are closed at once."""

    async def body() -> None:
        server, port = await _server(Metrics(), 30.0)
        writers = []
        try:
            base = _fds()
            n = getattr(server, "max_connections", 64) + 50
            for _ in range(n):
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                writers.append(w)
            # n client descriptors, at most max_connections of the server's.
            assert await _wait_for(
                lambda: _fds() <= base + n + getattr(server, "max_connections", 64) + 2, 2
            ), f"{_fds() - base - n} idle server connections held"
        finally:
            for w in writers:
                w.close()
            await server.close()

    uvloop.run(asyncio.wait_for(body(), 60))
