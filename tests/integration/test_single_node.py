"""A real `nebula start` process driven by the Python validator side (no chain).

Covers the privval conversation over TCP (SecretConnection) and Unix sockets, and the
bad input of issue 2: every kind gets a clear error, nothing is signed, and the process
keeps serving (it reconnects and answers the next good request).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from nebula import proto
from nebula.aio.validator_side import PrivvalListener
from nebula.crypto.keys import Ed25519Key, generate, write_key_file
from nebula.types import (
    BlockID,
    PingRequest,
    PingResponse,
    PubKeyRequest,
    SignVoteRequest,
    WireFamily,
)
from tests.support.nebula_proc import NebulaProcess
from tests.support.ports import free_ports
from tests.support.votes import vote

CHAIN = "it-chain"


def _addr(tmp_path: Path, transport: str) -> str:
    if transport == "unix":
        return f"unix://{tmp_path}/pv.sock"
    (port,) = free_ports(1)
    return f"tcp://127.0.0.1:{port}"


def _nebula(tmp_path: Path, addr: str, key: Ed25519Key, version: str = "v0_38") -> NebulaProcess:
    return NebulaProcess(
        tmp_path / "neb", chain_id=CHAIN, version=version, key=key, connections=[addr]
    )


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_sign_and_retry_over_real_connection(tmp_path, transport) -> None:
    key = generate("ed25519")
    addr = _addr(tmp_path, transport)

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        with _nebula(tmp_path, addr, key):
            conn = await lst.accept(timeout=15)
            assert isinstance(await conn.request(PingRequest()), PingResponse)
            pk = await conn.request(PubKeyRequest(CHAIN))
            assert pk.pub_key == key.public_key
            sigs = []
            for h in range(1, 30):
                r = await conn.request(SignVoteRequest(vote(h), CHAIN))
                assert r.error is None
                assert key.verify(proto.vote_sign_bytes(CHAIN, vote(h)), r.vote.signature)
                sigs.append(r.vote.signature)
            again = await conn.request(SignVoteRequest(vote(29), CHAIN))
            assert again.vote.signature == sigs[-1]
            conflict = await conn.request(SignVoteRequest(vote(29, block=BlockID()), CHAIN))
            assert conflict.error is not None and conflict.vote.signature == b""
            regress = await conn.request(SignVoteRequest(vote(3), CHAIN))
            assert regress.error is not None and "height regression" in regress.error.description
            wrong = await conn.request(SignVoteRequest(vote(40), "other-chain"))
            assert wrong.error is not None and wrong.vote.signature == b""
        await lst.close()

    asyncio.run(main())


async def _still_serves(lst: PrivvalListener, key, h: int) -> None:
    conn = await lst.accept(timeout=15)
    r = await conn.request(SignVoteRequest(vote(h), CHAIN))
    assert r.error is None and key.verify(proto.vote_sign_bytes(CHAIN, vote(h)), r.vote.signature)


BAD_INPUTS = {
    # name: bytes sent inside the (encrypted) stream after a good exchange
    "oversized_frame": proto.encode_uvarint(proto.MAX_REQUEST_SIZE + 1) + b"\x00" * 16,
    "overlong_uvarint": b"\xff" * 11,
    "garbage_protobuf": proto.encode_delimited(b"\x1a\x05\xff\xff\xff\xff\xff"),
    "unknown_message": proto.encode_delimited(b"\x7a\x00"),  # field 15
    "empty_message": proto.encode_delimited(b""),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_drops_connection_and_keeps_serving(tmp_path, name) -> None:
    key = generate("ed25519")
    addr = _addr(tmp_path, "tcp")

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        with _nebula(tmp_path, addr, key) as neb:
            conn = await lst.accept(timeout=15)
            assert (await conn.request(SignVoteRequest(vote(1), CHAIN))).error is None
            await conn.send_raw(BAD_INPUTS[name])
            # Nebula answers nothing to it and closes the connection...
            data = await asyncio.wait_for(conn.reader.read(1 << 16), 10)
            assert data == b""
            # ...then dials again and signs the next height; nothing was signed meanwhile.
            await _still_serves(lst, key, 2)
            assert neb.alive()
        await lst.close()
        assert "connection to" in neb.log_text()

    asyncio.run(main())


def test_a_silent_validator_is_dropped_after_idle_timeout_and_redialed(tmp_path) -> None:
    """dial.idle_timeout: a connection the validator keeps sending on stays up however
    long it lives; one that goes silent is dropped after idle_timeout (not before) and
    Nebula dials again."""
    key = generate("ed25519")
    addr = _addr(tmp_path, "tcp")
    neb = _nebula(tmp_path, addr, key)
    cfg = neb.config_path.read_text()
    assert cfg.count("[dial]\n") == 1
    neb.config_path.write_text(cfg.replace("[dial]\n", "[dial]\nidle_timeout = 1.0\n"))

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        with neb:
            conn = await lst.accept(timeout=15)
            loop = asyncio.get_running_loop()
            # Busy for 3 idle periods: a request every 0.4 s keeps the connection.
            for h in range(1, 9):
                assert (await conn.request(SignVoteRequest(vote(h), CHAIN))).error is None
                await asyncio.sleep(0.4)
            assert not conn.closed
            # Silent: Nebula closes it about a second after its last answer, not before.
            assert (await conn.request(SignVoteRequest(vote(9), CHAIN))).error is None
            t0 = loop.time()
            data = await asyncio.wait_for(conn.reader.read(1 << 16), 10)
            waited = loop.time() - t0
            assert data == b"" and 0.9 <= waited < 3.0, (data, waited)
            await _still_serves(lst, key, 10)
            assert neb.alive()
        await lst.close()
        assert "silent for 1.0s" in neb.log_text()

    asyncio.run(main())


def test_truncated_and_wrong_mac_frames(tmp_path) -> None:
    key = generate("ed25519")
    addr = _addr(tmp_path, "tcp")

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        with _nebula(tmp_path, addr, key) as neb:
            # A sealed frame with a flipped bit: authentication fails, connection dropped.
            conn = await lst.accept(timeout=15)
            sealed = bytearray(conn.session.seal(proto.encode_delimited(b"\x3a\x00")))
            sealed[100] ^= 1
            conn.writer.write(bytes(sealed))
            assert await asyncio.wait_for(conn.reader.read(1 << 16), 10) == b""
            # Half a frame, then the peer goes away: Nebula waits, then reconnects.
            conn = await lst.accept(timeout=15)
            conn.writer.write(conn.session.seal(b"\x02\x3a\x00")[:500])
            await conn.writer.drain()
            conn.close()
            await _still_serves(lst, key, 1)
            assert neb.alive()
            assert "failed" in neb.log_text().lower() or "authentic" in neb.log_text().lower()
        await lst.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "eph",
    [
        bytes(32),
        b"\x01" + bytes(31),
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ],
)
def test_low_order_ephemeral_key_is_rejected(tmp_path, eph) -> None:
    key = generate("ed25519")
    (port,) = free_ports(1)
    seen: list[bytes] = []

    async def main() -> None:
        got_close = asyncio.Event()

        async def on_conn(reader, writer):
            writer.write(b"\x22\x0a\x20" + eph)
            data = await reader.read(1 << 16)  # Nebula's own key message
            seen.append(data)
            rest = await asyncio.wait_for(reader.read(1 << 16), 10)
            if rest == b"":
                got_close.set()
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", port)
        with _nebula(tmp_path, f"tcp://127.0.0.1:{port}", key) as neb:
            await asyncio.wait_for(got_close.wait(), 15)
            assert neb.alive()
            neb.wait_log("low-order", timeout=10)
        server.close()

    asyncio.run(main())
    assert seen and len(seen[0]) >= 35


def test_broken_config_and_unreadable_key_fail_clearly(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('chain_id = "x"\nbogus = 1\n[signing.native]\n')
    r = subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "start", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "unknown field `bogus`" in r.stderr and "bad.toml" in r.stderr
    assert "Traceback" not in r.stderr

    key = generate("ed25519")
    kp = tmp_path / "privkey"
    write_key_file(kp, key)
    kp.chmod(0o644)
    cfg.write_text('chain_id = "x"\n[signing.native]\nprivate_key_path = "./privkey"\n')
    r = subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "start", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "chmod 600" in r.stderr and "Traceback" not in r.stderr
    kp.write_text("not base64!!")
    kp.chmod(0o600)
    r = subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "start", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "privkey" in r.stderr and "Traceback" not in r.stderr
