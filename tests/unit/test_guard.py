"""The pure double-sign rules (FilePV semantics)."""

from __future__ import annotations

import pytest

from nebula import proto
from nebula.errors import DoubleSignRefused, RegressionRefused, StateError
from nebula.guard import SignRecord, Verdict, apply, check
from nebula.types import BlockID, PartSetHeader, SignedMsgType, Timestamp, Vote

CHAIN = "guard-chain"


def vote_bytes(
    h: int,
    r: int,
    typ: int = SignedMsgType.PREVOTE,
    block: bytes = b"\x01" * 32,
    ts: Timestamp | None = None,
) -> bytes:
    bid = BlockID(block, PartSetHeader(1, b"\x02" * 32)) if block else BlockID()
    return proto.vote_sign_bytes(
        CHAIN,
        Vote(type=typ, height=h, round=r, block_id=bid, timestamp=ts or Timestamp(1700000000, 5)),
    )


def rec(h: int, r: int, s: int, sb: bytes = b"sb", sig: bytes = b"sig") -> SignRecord:
    return SignRecord(h, r, s, sb, sig)


def test_first_signature_is_accepted() -> None:
    assert check(None, 1, 0, 2, b"x").verdict == Verdict.ACCEPT


@pytest.mark.parametrize(
    ("last", "hrs"),
    [((5, 0, 2), (6, 0, 1)), ((5, 0, 2), (5, 1, 1)), ((5, 1, 2), (5, 1, 3))],
)
def test_strictly_higher_is_accepted(last, hrs) -> None:
    assert check(rec(*last), *hrs, b"x").verdict == Verdict.ACCEPT


@pytest.mark.parametrize(
    ("last", "hrs", "text"),
    [
        ((5, 0, 2), (4, 9, 3), "height regression. Got 4, last height 5"),
        ((5, 2, 2), (5, 1, 3), "round regression at height 5. Got 1, last round 2"),
        ((5, 2, 3), (5, 2, 2), "step regression at height 5 round 2. Got 2, last step 3"),
    ],
)
def test_regressions_are_refused(last, hrs, text) -> None:
    d = check(rec(*last), *hrs, b"x")
    assert d.verdict == Verdict.REFUSE
    assert isinstance(d.error, RegressionRefused)
    assert str(d.error) == text


def test_identical_request_returns_stored_signature() -> None:
    sb = vote_bytes(7, 0)
    d = check(rec(7, 0, 2, sb, b"stored"), 7, 0, 2, sb)
    assert d.verdict == Verdict.SAME
    assert d.record is not None and d.record.signature == b"stored"


def test_only_timestamp_differs_returns_stored_signature_and_timestamp() -> None:
    old_ts, new_ts = Timestamp(1700000000, 5), Timestamp(1700000009, 77)
    stored = vote_bytes(7, 0, ts=old_ts)
    d = check(rec(7, 0, 2, stored, b"stored"), 7, 0, 2, vote_bytes(7, 0, ts=new_ts))
    assert d.verdict == Verdict.SAME_TIMESTAMP
    assert d.timestamp == old_ts
    assert d.record is not None and d.record.signature == b"stored"


def test_conflicting_block_is_refused() -> None:
    stored = vote_bytes(7, 0, block=b"\x01" * 32)
    d = check(rec(7, 0, 2, stored), 7, 0, 2, vote_bytes(7, 0, block=b"\x09" * 32))
    assert d.verdict == Verdict.REFUSE
    assert isinstance(d.error, DoubleSignRefused)
    assert d.error.code == 2


def test_nil_versus_block_at_same_step_is_refused() -> None:
    stored = vote_bytes(7, 0, block=b"")
    d = check(rec(7, 0, 2, stored), 7, 0, 2, vote_bytes(7, 0))
    assert isinstance(d.error, DoubleSignRefused)


def test_same_hrs_without_stored_sign_bytes_is_refused() -> None:
    d = check(SignRecord(7, 0, 2), 7, 0, 2, b"x")
    assert isinstance(d.error, StateError)


def test_apply_moves_state_only_on_accept() -> None:
    r1 = rec(1, 0, 2, vote_bytes(1, 0))
    state, d = apply(None, r1)
    assert d.verdict == Verdict.ACCEPT and state == r1
    conflicting = rec(1, 0, 2, vote_bytes(1, 0, block=b"\x05" * 32), b"other")
    state2, d2 = apply(state, conflicting)
    assert d2.verdict == Verdict.REFUSE and state2 is state
    retry = rec(1, 0, 2, vote_bytes(1, 0), b"fresh-signature")
    state3, d3 = apply(state, retry)
    assert d3.verdict == Verdict.SAME and state3 is state
    assert d3.record is not None and d3.record.signature == r1.signature


def test_apply_refuses_records_without_signature() -> None:
    _, d = apply(None, SignRecord(1, 0, 2, b"sb", b""))
    assert d.verdict == Verdict.REFUSE


def test_proposal_timestamp_only_difference() -> None:
    from nebula.types import Proposal

    def prop(ts: Timestamp) -> bytes:
        return proto.proposal_sign_bytes(
            CHAIN,
            Proposal(
                height=9,
                round=1,
                pol_round=-1,
                block_id=BlockID(b"\x03" * 32, PartSetHeader(1, b"\x04" * 32)),
                timestamp=ts,
            ),
        )

    stored = prop(Timestamp(1_700_000_000, 0))
    d = check(rec(9, 1, 1, stored, b"p"), 9, 1, 1, prop(Timestamp(1_700_000_100, 0)))
    assert d.verdict == Verdict.SAME_TIMESTAMP and d.timestamp == Timestamp(1_700_000_000, 0)
