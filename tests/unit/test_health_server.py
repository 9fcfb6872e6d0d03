"""The /metrics, /healthz, /readyz server against clients that misbehave.

It runs on the signing event loop and its sockets are the process's file descriptors:
clients that open connections and never send a request must not take every
descriptor the validator connections, the Raft peers and the state file need.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket

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


def test_a_burst_of_scrapes_does_not_hold_the_event_loop() -> None:
    """Hundreds of connections that ask for /metrics at once: each exposition takes
    ~1 ms of the event loop every chain shares (~0.8 s for 500 in one loop pass, more
    than a Raft election timeout); at most ``max_connections`` are served together."""

    async def body() -> None:
        metrics = Metrics()
        exposed = 0
        expose = metrics.expose

        def counting() -> bytes:
            nonlocal exposed
            exposed += 1
            return expose()

        metrics.expose = counting  # type: ignore[method-assign]
        server, port = await _server(metrics, 30.0)
        loop = asyncio.get_running_loop()
        socks = []
        try:
            for _ in range(300):
                s = socket.socket()
                s.setblocking(False)
                await loop.sock_connect(s, ("127.0.0.1", port))
                socks.append(s)
            await asyncio.sleep(0.3)  # every connection accepted, waiting for its request
            seen: list[int] = []
            done = False

            async def monitor() -> None:
                while not done:
                    seen.append(exposed)
                    await asyncio.sleep(0)

            mon = asyncio.ensure_future(monitor())
            await asyncio.sleep(0.01)
            for s in socks:
                s.send(b"GET /metrics HTTP/1.1\r\n\r\n")
            limit = getattr(server, "max_connections", 64)
            await _wait_for(lambda: exposed >= limit, 10)
            await asyncio.sleep(0.5)
            done = True
            await mon
            burst = max(b - a for a, b in itertools.pairwise(seen))
            assert burst <= limit, f"{burst} expositions in one pass of the event loop"
        finally:
            for s in socks:
                s.close()
            await server.close()

    uvloop.run(asyncio.wait_for(body(), 60))
