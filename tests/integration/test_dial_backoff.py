"""The dialer's backoff: a peer that completes the handshake and drops the connection at
once is redialed with growing delays, not twenty times a second (found in review); a
connection that lasted is redialed at once (a validator that restarted)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import uvloop

from nebula.aio.conn import Dialer
from nebula.aio.validator_side import PrivvalListener
from nebula.backends.native import NativeBackend
from nebula.config import Endpoint
from nebula.crypto.keys import Ed25519Key
from nebula.service import SigningService
from nebula.state.local import LocalStore
from nebula.types import PingRequest, WireFamily
from tests.support.ports import free_ports

CHAIN = "backoff-chain"
FAMILY = WireFamily.V0_38


def _dialer(tmp_path: Path, port: int) -> Dialer:
    key = Ed25519Key.from_seed(bytes(range(32)))
    service = SigningService(CHAIN, FAMILY, NativeBackend(key), LocalStore(tmp_path / "s"))
    return Dialer(
        Endpoint("tcp", host="127.0.0.1", port=port),
        service,
        FAMILY,
        identity_seed=bytes(32),
        backoff_min=0.05,
        backoff_max=1.0,
    )


def test_a_peer_that_drops_every_connection_at_once_is_redialed_with_backoff(
    tmp_path: Path,
) -> None:
    async def body() -> tuple[int, float]:
        (port,) = free_ports(1)
        listener = PrivvalListener(f"tcp://127.0.0.1:{port}", FAMILY)
        await listener.start()
        dialer = _dialer(tmp_path, port)
        dialer.start()
        accepted = 0
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 3.0:
                try:
                    conn = await listener.accept(timeout=0.5)
                except TimeoutError:
                    continue
                accepted += 1
                conn.close()  # handshake done, dropped at once
        finally:
            await dialer.stop()
            await listener.close()
        return accepted, time.monotonic() - t0

    accepted, took = uvloop.run(body())
    # With backoff (0.05 s doubling to 1 s, halved by jitter at worst): about 6-9
    # connections in 3 s; reset after every handshake it was ~25 a second.
    assert 2 <= accepted <= 15, f"{accepted} connections in {took:.1f}s"


def test_a_connection_that_lasted_is_redialed_at_once(tmp_path: Path) -> None:
    async def body() -> float:
        (port,) = free_ports(1)
        listener = PrivvalListener(f"tcp://127.0.0.1:{port}", FAMILY)
        await listener.start()
        dialer = _dialer(tmp_path, port)
        dialer.start()
        try:
            # Build the backoff up with quick drops, then hold one connection for longer
            # than backoff_max and drop it: the next dial comes within backoff_min.
            for _ in range(4):
                (await listener.accept(timeout=10)).close()
            conn = await listener.accept(timeout=10)
            assert await conn.request(PingRequest())
            await asyncio.sleep(1.2)
            conn.close()
            t = time.monotonic()
            await listener.accept(timeout=10)
            return time.monotonic() - t
        finally:
            await dialer.stop()
            await listener.close()

    again = uvloop.run(body())
    assert again < 0.5, f"redialed after {again:.2f}s"
