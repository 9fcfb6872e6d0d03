"""A `nebula start` process's life: one per state file, its first start. Real processes,
real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nebula import proto
from nebula.aio.validator_side import PrivvalListener
from nebula.crypto.keys import generate
from nebula.devnet.cluster import NebulaNode
from nebula.types import (
    BlockID,
    PartSetHeader,
    SignedMsgType,
    SignVoteRequest,
    Timestamp,
    Vote,
    WireFamily,
)
from tests.support.nebula_proc import NebulaProcess
from tests.support.ports import free_ports

CHAIN = "life-chain"
BLOCK = BlockID(b"\x11" * 32, PartSetHeader(1, b"\x22" * 32))


def vote(h: int, block: BlockID = BLOCK) -> Vote:
    return Vote(
        type=SignedMsgType.PREVOTE,
        height=h,
        round=0,
        block_id=block,
        timestamp=Timestamp(1_700_000_000 + h, 0),
        validator_address=b"\x01" * 20,
    )


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
            other = await conn.request(SignVoteRequest(vote(5, BlockID()), CHAIN))
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
