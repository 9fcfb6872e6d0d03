"""A validator connection whose peer sends requests and never reads the answers.

A SecretConnection ping is 3 plaintext bytes and its answer one sealed 1044-byte frame:
341 pings fit in one frame of the peer's, so ~30 KiB sent make ~10 MiB of answers.  The
signer must not buffer answers without bound for a peer that does not read them (it
stops reading requests instead), and such a connection ends at the idle timeout.
Both request loops: the inline one and the streams one.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from pathlib import Path

import pytest
import uvloop

from nebula import proto
from nebula.aio.conn import Dialer
from nebula.aio.validator_side import PrivvalListener
from nebula.backends.native import NativeBackend
from nebula.config import Endpoint
from nebula.crypto.keys import Ed25519Key
from nebula.service import SigningService
from nebula.state.local import LocalStore
from nebula.types import PingRequest, WireFamily
from tests.support.ports import free_ports

CHAIN = "bp-chain"
FAMILY = WireFamily.V0_38
KEY = Ed25519Key.from_seed(bytes(range(32)))
PING = proto.encode_delimited(proto.encode_request(PingRequest(), FAMILY))  # 3 bytes

# Far above any sane buffer for a peer that sends one request at a time, far below what
# the flood makes (~34 MiB of answers).
LIMIT = 8 << 20


@pytest.mark.parametrize("loop_kind", ["inline", "streams"])
def test_a_peer_that_never_reads_does_not_grow_the_write_buffer_without_bound(
    tmp_path: Path, loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if loop_kind == "streams":
        import nebula.aio.conn as conn_mod

        monkeypatch.setattr(conn_mod, "_stream_buffer", lambda reader: None)

    async def body() -> None:
        (port,) = free_ports(1)
        listener = PrivvalListener(f"tcp://127.0.0.1:{port}", FAMILY)
        await listener.start()
        service = SigningService(CHAIN, FAMILY, NativeBackend(KEY), LocalStore(tmp_path / "s"))
        dialer = Dialer(
            Endpoint("tcp", host="127.0.0.1", port=port),
            service,
            FAMILY,
            identity_seed=bytes(32),
            idle_timeout=1.5,
        )
        dialer.start()
        conn = await listener.accept()
        try:
            assert isinstance(await conn.request(PingRequest()), object)
            # The peer stops reading: a small receive window, and its stream reader is
            # never read again (it pauses the socket once 128 KiB are buffered).
            sock = conn.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            frame = PING * (1024 // len(PING))  # 341 pings per sealed frame
            sealed = conn.session.seal(frame * 100)  # ~34k pings, ~100 KiB on the wire
            conn.writer.transport.write(sealed)  # not drained: the signer may stop reading
            transport = dialer._writer.transport
            peak = 0
            for _ in range(150):
                await asyncio.sleep(0.02)
                if transport.is_closing():
                    break
                peak = max(peak, transport.get_write_buffer_size())
            assert peak < LIMIT, f"{peak} bytes of answers buffered for a peer that reads none"
            # The connection of a peer that reads nothing ends (idle timeout), and the
            # dialer dials again.
            for _ in range(400):
                if dialer.connects >= 2:
                    break
                await asyncio.sleep(0.025)
            assert dialer.connects >= 2, "the stuck connection was never dropped"
        finally:
            await dialer.stop()
            await listener.close()

    uvloop.run(asyncio.wait_for(body(), 60))


@pytest.mark.parametrize("loop_kind", ["inline", "streams"])
def test_pipelined_requests_do_not_hold_the_event_loop(
    tmp_path: Path, loop_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validator that pipelines thousands of requests in one write: the event loop,
    shared with every other chain, still runs other callbacks between small groups of
    them (not once after all of them: ~0.4 s for 30k refused requests, more with a slow
    log)."""
    if loop_kind == "streams":
        import nebula.aio.conn as conn_mod

        monkeypatch.setattr(conn_mod, "_stream_buffer", lambda reader: None)

    async def body() -> None:
        path = str(tmp_path / "pv.sock")
        listener = PrivvalListener(f"unix://{path}", FAMILY)
        await listener.start()
        service = SigningService(CHAIN, FAMILY, NativeBackend(KEY), LocalStore(tmp_path / "s"))
        answered = 0
        handle = service.handle

        async def counting(req):  # type: ignore[no-untyped-def]
            nonlocal answered
            answered += 1
            return await handle(req)

        service.handle = counting  # type: ignore[method-assign]
        dialer = Dialer(Endpoint("unix", path=path), service, FAMILY, identity_seed=bytes(32))
        dialer.start()
        conn = await listener.accept()
        try:
            await conn.request(PingRequest())
            n = 30000
            seen: list[int] = []
            done = False

            async def monitor() -> None:
                while not done:
                    seen.append(answered)
                    await asyncio.sleep(0)

            mon = asyncio.ensure_future(monitor())
            await asyncio.sleep(0.01)
            conn.writer.write(PING * n)
            got = 0
            while got < n:
                data = await asyncio.wait_for(conn.reader.read(1 << 20), 10)
                assert data
                got += len(conn.framer.feed(data))
            done = True
            await mon
            burst = max(b - a for a, b in itertools.pairwise(seen))
            assert burst <= 1000, f"{burst} requests answered without the loop running"
        finally:
            await dialer.stop()
            await listener.close()

    uvloop.run(asyncio.wait_for(body(), 60))


@pytest.mark.parametrize("loop_kind", ["inline", "streams"])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_peer_that_reads_late_gets_every_answer_in_order(
    tmp_path: Path, loop_kind: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading stops while the answers wait, and resumes when the peer takes them: no
    request is lost or answered twice."""
    if loop_kind == "streams":
        import nebula.aio.conn as conn_mod

        monkeypatch.setattr(conn_mod, "_stream_buffer", lambda reader: None)

    async def body() -> None:
        if transport == "unix":
            path = str(tmp_path / "pv.sock")
            listener = PrivvalListener(f"unix://{path}", FAMILY)
            endpoint = Endpoint("unix", path=path)
        else:
            (port,) = free_ports(1)
            listener = PrivvalListener(f"tcp://127.0.0.1:{port}", FAMILY)
            endpoint = Endpoint("tcp", host="127.0.0.1", port=port)
        await listener.start()
        service = SigningService(CHAIN, FAMILY, NativeBackend(KEY), LocalStore(tmp_path / "s"))
        dialer = Dialer(endpoint, service, FAMILY, identity_seed=bytes(32), idle_timeout=10.0)
        dialer.start()
        conn = await listener.accept()
        try:
            await conn.request(PingRequest())
            # Enough answers to fill the socket and the transport's buffer (a unix
            # socket's answer is 3 bytes, a SecretConnection one 1044).
            n = 20000 if transport == "tcp" else 100000
            conn.writer.transport.write(conn.session.seal(PING * n))
            await asyncio.sleep(0.5)  # the signer's answers pile up meanwhile
            got = 0
            while got < n:
                data = await asyncio.wait_for(conn.reader.read(1 << 20), 10)
                assert data, f"closed after {got} answers"
                msgs = conn.framer.feed(conn.session.feed(data))
                assert all(m == msgs[0] for m in msgs)
                got += len(msgs)
            assert got == n
            assert isinstance(await conn.request(PingRequest()), object)
            assert dialer.connects == 1
        finally:
            await dialer.stop()
            await listener.close()

    uvloop.run(asyncio.wait_for(body(), 60))
