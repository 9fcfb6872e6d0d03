"""The compiled sign-state command kernel against its pure twin (nebula/_fast/cmd_py.py).

Every member applies every committed entry through this kernel, so a difference between
the twins would be a difference between members' decisions.  Properties:

* encoding: the same bytes for any record (and the same error for one out of range);
* decoding: of damaged or random bytes, the same record or the same StateError, message
  included;
* applying: a random sequence of SIGN / TSIGN / RAISE commands (few chains, few heights,
  so repeats, regressions, retries and timestamp-only differences are frequent) leaves the
  same states and returns the same decisions, step by step;
* the compiled kernel's records are real SignRecords: equal, hash-equal and frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nebula import proto
from nebula.errors import StateError
from nebula.guard import Decision, SignRecord, Verdict
from nebula.types import BlockID, SignedMsgType, Timestamp, Vote
from tests.fuzz.conftest import both_kernels, fuzz_settings, mutations

REC = SignRecord(7, 1, 2, b"sign-bytes", b"sig", b"ext", b"ext-sig")

_u64 = st.integers(0, 2**64 - 1)
_u32 = st.integers(0, 2**32 - 1)
_field = st.binary(max_size=80)
_records = st.builds(SignRecord, _u64, _u32, st.integers(0, 3), _field, _field, _field, _field)
_chains = st.binary(max_size=40)


def _result(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except StateError as e:
        return "error", (type(e), str(e))


def _decision(d: Any) -> Any:
    if isinstance(d, Decision):
        err = d.error
        return (d.verdict, d.record, d.timestamp, type(err), str(err) if err else None)
    return d


@fuzz_settings(300)
@given(st.sampled_from([1, 2, 3]), _chains, _records, _field, _field)
def test_encoding_is_the_same(op: int, chain: bytes, rec: SignRecord, sig: bytes, esig: bytes):
    fast, pure = both_kernels("cmd")
    assert fast.encode_command(op, chain, rec) == pure.encode_command(op, chain, rec)
    assert fast.record_bytes(chain, rec) == pure.record_bytes(chain, rec)
    signed = fast.encode_signed(op, chain, rec, sig, esig)
    assert signed == pure.encode_signed(op, chain, rec, sig, esig)
    assert signed == pure.encode_command(
        op, chain, dataclasses.replace(rec, signature=sig, ext_signature=esig)
    )
    assert fast.decode_command(signed) == pure.decode_command(signed)


def test_encoding_refusals_are_the_same() -> None:
    fast, pure = both_kernels("cmd")
    for bad in (
        SignRecord(2**64, 0, 1, b"x", b"s"),
        SignRecord(1, 2**32, 1, b"x", b"s"),
        SignRecord(-1, 0, 1, b"x", b"s"),
        SignRecord(1, 0, 256, b"x", b"s"),
    ):
        for k in (fast, pure):
            with pytest.raises(StateError, match="out of range"):
                k.encode_command(1, b"c", bad)
    for k in (fast, pure):
        with pytest.raises(StateError, match="chain id too long"):
            k.encode_command(1, b"c" * 0x10000, REC)
        with pytest.raises(ValueError, match="unknown op"):
            k.encode_command(4, b"c", REC)


_GOOD = (
    bytes([1, 1])
    + b"\x05\x00chain"
    + REC.height.to_bytes(8, "little")
    + bytes([1, 0, 0, 0, 2])
    + b"".join(
        len(f).to_bytes(4, "little") + f for f in (b"sign-bytes", b"sig", b"ext", b"ext-sig")
    )
)


@fuzz_settings(600)
@given(mutations(_GOOD, 120))
@example(b"")
@example(b"\x01")
@example(_GOOD[:-1])
@example(_GOOD + b"\x00")
def test_decoding_is_the_same(data: bytes) -> None:
    fast, pure = both_kernels("cmd")
    got = _result(fast.decode_command, data)
    assert got == _result(pure.decode_command, data)
    assert _result(fast.decode_command, bytearray(data)) == got
    for off in (0, 2, len(data)):
        assert _result(fast.read_record, data, off) == _result(pure.read_record, data, off)


def _sign_bytes(height: int, round: int, step: int, block: int, ts: int) -> bytes:
    vote = Vote(
        type=SignedMsgType.PREVOTE if step == 2 else SignedMsgType.PRECOMMIT,
        height=height,
        round=round,
        block_id=BlockID(bytes([block]) * 32) if block else BlockID(),
        timestamp=Timestamp(1_700_000_000 + ts, 0),
    )
    return proto.vote_sign_bytes("fuzz-chain", vote)


_commands = st.tuples(
    st.sampled_from([1, 1, 1, 2, 3]),  # op: SIGN most of the time
    st.sampled_from([b"a", b"b"]),
    st.integers(1, 3),  # height
    st.integers(0, 1),  # round
    st.integers(0, 3),  # step
    st.integers(0, 2),  # block (0: nil)
    st.integers(0, 2),  # timestamp: several ones for the same vote
    st.sampled_from([b"", b"sig-1", b"sig-2"]),
    st.booleans(),  # empty sign bytes
)


@fuzz_settings(400)
@given(st.lists(_commands, max_size=40))
def test_applying_is_the_same(seq: list[tuple[Any, ...]]) -> None:
    fast, pure = both_kernels("cmd")
    s_fast: dict[bytes, SignRecord] = {}
    s_pure: dict[bytes, SignRecord] = {}
    verdicts = set()
    for op, chain, h, r, s, block, ts, sig, empty in seq:
        sb = b"" if empty else _sign_bytes(h, r, max(s, 2), block, ts)
        data = pure.encode_command(op, chain, SignRecord(h, r, s, sb, sig))
        got = _result(fast.apply, s_fast, data)
        want = _result(pure.apply, s_pure, data)
        assert (got[0], _decision(got[1])) == (want[0], _decision(want[1]))
        assert s_fast == s_pure
        if isinstance(want[1], Decision):
            verdicts.add(want[1].verdict)
    if len(seq) == 40:
        # Long sequences reach more than the accept path (a sanity check on the strategy).
        assert verdicts - {Verdict.ACCEPT}


def test_applying_covers_every_verdict() -> None:
    fast, pure = both_kernels("cmd")
    sb1 = _sign_bytes(5, 0, 2, 1, 0)
    sb1_later = _sign_bytes(5, 0, 2, 1, 1)
    sb2 = _sign_bytes(5, 0, 2, 2, 0)
    steps = [
        (1, SignRecord(5, 0, 2, sb1, b"s1"), Verdict.ACCEPT),
        (1, SignRecord(5, 0, 2, sb1, b"s1"), Verdict.SAME),
        (1, SignRecord(5, 0, 2, sb1_later, b"s9"), Verdict.SAME_TIMESTAMP),
        (1, SignRecord(5, 0, 2, sb2, b"s2"), Verdict.REFUSE),  # conflicting data
        (1, SignRecord(4, 0, 3, sb2, b"s2"), Verdict.REFUSE),  # regression
        (1, SignRecord(6, 0, 2, b"x", b""), Verdict.REFUSE),  # no signature
        (3, SignRecord(6, 0, 2, b"x", b""), Verdict.ACCEPT),  # TSIGN: none needed
        (2, SignRecord(9, 0, 1, b"", b""), True),  # RAISE
        (2, SignRecord(8, 0, 1, b"", b""), False),
    ]
    for k in (fast, pure):
        states: dict[bytes, SignRecord] = {}
        for op, rec, want in steps:
            got = k.apply(states, k.encode_command(op, b"c", rec))
            if isinstance(want, bool):
                assert got is want
            else:
                assert got.verdict == want
        assert states[b"c"].hrs == (9, 0, 1)
    with pytest.raises(StateError):
        fast.apply({}, b"\x02\x01")
    states = {b"c": REC}
    with pytest.raises(StateError):
        fast.apply(states, fast.encode_command(1, b"c", REC)[:-1])
    assert states == {b"c": REC}


def test_compiled_records_are_frozen_signrecords() -> None:
    fast, _ = both_kernels("cmd")
    op, chain, rec = fast.decode_command(fast.encode_command(1, b"chain", REC))
    assert (op, chain) == (1, b"chain")
    assert type(rec) is SignRecord and rec == REC and hash(rec) == hash(REC)
    assert rec.hrs == (7, 1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.height = 8  # type: ignore[misc]
    assert dataclasses.replace(rec, height=8).height == 8
    d = fast.apply({}, fast.encode_command(1, b"chain", REC))
    assert type(d) is Decision and d == Decision(Verdict.ACCEPT, record=REC) and d.ok
