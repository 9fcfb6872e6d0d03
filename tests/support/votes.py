"""Votes for the integration tests: a vote at height ``h`` on a fixed block, with a
timestamp that grows with the height and a fixed validator address."""

from __future__ import annotations

from nebula.types import BlockID, PartSetHeader, SignedMsgType, Timestamp, Vote

BLOCK = BlockID(b"\x11" * 32, PartSetHeader(1, b"\x22" * 32))


def vote(h: int, r: int = 0, *, block: BlockID = BLOCK, typ: int = SignedMsgType.PREVOTE) -> Vote:
    return Vote(
        type=typ,
        height=h,
        round=r,
        block_id=block,
        timestamp=Timestamp(1_700_000_000 + h, 0),
        validator_address=b"\x01" * 20,
    )
