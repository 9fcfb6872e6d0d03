"""nebula.aio.lookup: one host name lookup in flight per connection owner (a hanging DNS
must not take the event loop's resolver threads from every other connection)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from nebula.aio.conn import Dialer
from nebula.aio.lookup import Lookup, is_ip
from nebula.config import Endpoint


def _patched(loop: asyncio.AbstractEventLoop, hang: float, calls: list[str]) -> None:
    async def getaddrinfo(host: str, port: int, **kw: object) -> list:
        calls.append(host)
        if len(calls) == 1:
            await asyncio.sleep(hang)
        if host == "nowhere.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]


def test_one_lookup_in_flight_shared_then_a_fresh_one() -> None:
    async def go() -> None:
        calls: list[str] = []
        _patched(asyncio.get_running_loop(), 1.0, calls)
        lk = Lookup("vault.test", 8200)
        for _ in range(5):  # five attempts time out behind one hanging lookup
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(lk.address(), 0.01)
        assert calls == ["vault.test"]
        assert await lk.address() == "127.0.0.1"  # the same lookup's answer
        assert calls == ["vault.test"]
        assert await lk.address() == "127.0.0.1"  # done: the next connection looks again
        assert calls == ["vault.test", "vault.test"]
        assert await Lookup("10.1.2.3", 1).address() == "10.1.2.3"  # literals: no lookup
        assert await Lookup("::1", 1).address() == "::1"
        assert len(calls) == 2
        with pytest.raises(socket.gaierror):
            await Lookup("nowhere.test", 1).address()

    asyncio.run(go())
    assert is_ip("127.0.0.1") and is_ip("::1") and not is_ip("vault.test")


def test_a_dialer_retrying_a_hanging_name_keeps_one_lookup_in_flight() -> None:
    async def go() -> None:
        calls: list[str] = []
        loop = asyncio.get_running_loop()
        _patched(loop, 2.0, calls)
        got = asyncio.Event()

        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            got.set()
            w.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ep = Endpoint("tcp", host="validator.test", port=port)
        dialer = Dialer(
            ep, None, None, identity_seed=bytes(32), handshake_timeout=0.05,  # type: ignore[arg-type]
            backoff_min=0.01, backoff_max=0.02,
        )  # fmt: skip
        dialer.start()
        try:
            await asyncio.sleep(0.3)  # several attempts time out behind the hanging lookup
            assert calls == ["validator.test"]
            await asyncio.wait_for(got.wait(), 5)  # the lookup answers: it connects
        finally:
            await dialer.stop()
            server.close()

    asyncio.run(go())
