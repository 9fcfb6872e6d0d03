"""A `nebula start` process's life: one per state file, its first start, systemd's
readiness protocol and a clean stop on SIGTERM. Real processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from nebula import proto
from nebula.aio.validator_side import PrivvalListener
from nebula.crypto.keys import generate
from nebula.devnet.cluster import NebulaNode
from nebula.guard import SignRecord
from nebula.state.local import LocalStore, read_states
from nebula.types import (
    BlockID,
    SignVoteRequest,
    WireFamily,
)
from tests.support.nebula_proc import NebulaProcess
from tests.support.ports import free_ports
from tests.support.votes import vote

CHAIN = "life-chain"


def _node(tmp_path: Path, key, addr: str) -> NebulaProcess:
    return NebulaProcess(
        tmp_path / "neb", chain_id=CHAIN, version="v0_38", key=key, connections=[addr]
    )


def _wait_exit(node: NebulaNode, timeout: float) -> int:
    assert node.proc is not None
    return node.proc.wait(timeout)


def test_second_start_on_one_state_file_is_refused(tmp_path: Path) -> None:
    """Two signers on one state file would each keep their own mark and sign twice."""
    key = generate("ed25519")
    (port,) = free_ports(1)
    addr = f"tcp://127.0.0.1:{port}"

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        with _node(tmp_path, key, addr) as first:
            conn = await lst.accept(timeout=20)
            assert (await conn.request(SignVoteRequest(vote(5), CHAIN))).error is None
            # The same config, a second process (an overlapping restart, a double start).
            second = NebulaNode(first.config_path, log_path=tmp_path / "second.log")
            second.start()
            try:
                rc = await asyncio.to_thread(_wait_exit, second, 60)
            finally:
                second.stop()
            log = second.log_text()
            assert rc == 2, log
            state = first.home / "state.json"
            assert f"state file {state} is in use by another process (pid {first.pid}" in log
            assert "two signers on one state" in log
            # The first one is untouched and keeps the mark: a conflicting vote at the
            # height it signed is refused, the next height is signed.
            assert first.alive()
            other = await conn.request(SignVoteRequest(vote(5, block=BlockID()), CHAIN))
            assert other.error is not None and other.vote.signature == b""
            r = await conn.request(SignVoteRequest(vote(6), CHAIN))
            assert r.error is None
            assert key.verify(proto.vote_sign_bytes(CHAIN, vote(6)), r.vote.signature)
            assert "NO SIGN STATE" not in log  # the refused one never looked at the state
        await lst.close()

    asyncio.run(main())


def test_first_start_says_signing_starts_at_zero_and_how_to_fix_it(tmp_path: Path) -> None:
    key = generate("ed25519")
    (port,) = free_ports(1)
    addr = f"tcp://127.0.0.1:{port}"

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        neb = _node(tmp_path, key, addr)
        with neb:
            conn = await lst.accept(timeout=20)
            text = neb.log_text()
            assert f"NO SIGN STATE for chain {CHAIN}" in text
            assert "0/0/0" in text and "initial_state_path" in text
            assert "nebula state import" in text
            assert (await conn.request(SignVoteRequest(vote(3), CHAIN))).error is None
        # Started again with a mark: no warning.
        log_size = len(neb.log_text())
        with neb:
            await lst.accept(timeout=20)
            assert "NO SIGN STATE" not in neb.log_text()[log_size:]
        await lst.close()

    asyncio.run(main())


def _notify_socket(tmp_path: Path, kind: str) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "abstract":
        name = f"nebula-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        s.bind(b"\0" + name.encode())
        return s, "@" + name
    path = tmp_path / "notify.sock"
    s.bind(str(path))
    return s, str(path)


def _recv_until(s: socket.socket, needle: str, timeout: float) -> list[str]:
    """Datagrams received until one contains ``needle`` (AssertionError on timeout)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(s.recv(4096).decode())
        except TimeoutError:
            break
        if any(needle in line for line in got[-1].split("\n")):
            return got
    raise AssertionError(f"{needle!r} not received; got {got}")


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_systemd_notify_and_clean_stop_on_sigterm(tmp_path: Path, kind: str) -> None:
    key = generate("ed25519")
    (port,) = free_ports(1)
    addr = f"tcp://127.0.0.1:{port}"
    notify, address = _notify_socket(tmp_path, kind)

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        neb = _node(tmp_path, key, addr)
        neb.env["NOTIFY_SOCKET"] = address
        neb.start()
        try:
            ready = await asyncio.to_thread(_recv_until, notify, "READY=1", 60)
            assert "STOPPING=1" not in "".join(ready)
            assert f"STATUS=serving chain {CHAIN}" in "".join(ready)
            conn = await lst.accept(timeout=20)
            last = None
            for h in range(1, 11):
                r = await conn.request(SignVoteRequest(vote(h), CHAIN))
                assert r.error is None
                last = r.vote.signature
            neb.signal(signal.SIGTERM)
            stopping = await asyncio.to_thread(_recv_until, notify, "STOPPING=1", 30)
            assert "READY=1" not in "".join(stopping)
            rc = await asyncio.to_thread(_wait_exit, neb, 30)
            assert rc == 0, neb.log_tail()
            # The validator connection was closed by the signer.
            assert await asyncio.wait_for(conn.reader.read(1 << 16), 10) == b""
        finally:
            neb.stop()
            notify.close()
            await lst.close()
        assert "stopped cleanly" in neb.log_text()
        # The state is intact and durable: the last signed vote, with its signature.
        state = neb.home / "state.json"
        rec = read_states(state)[CHAIN]
        assert (rec.height, rec.round, rec.step) == (10, 0, 2) and rec.signature == last
        assert rec == SignRecord(
            10, 0, 2, proto.vote_sign_bytes(CHAIN, vote(10)), last, rec.ext_sign_bytes, b""
        )
        # Lock released and admin socket removed: the next start can take over.
        LocalStore(state).close_sync()
        assert not (neb.home / "state.json.admin" / "admin.sock").exists()

    asyncio.run(main())
