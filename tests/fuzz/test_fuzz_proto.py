"""Fuzzing the privval codec (nebula.proto's kernel): compiled kernel and pure twin.

Inputs are protobuf-shaped on purpose - random field trees with the real field numbers,
every wire type, nested messages, groups and boundary varints - plus damaged copies of the
test vectors, so the decoders get past the first byte.  Properties:

* decoding raises nothing but DecodeError (a NebulaError, with a message);
* what decodes is self-consistent: ``decode_request_for_signing`` agrees with
  ``decode_request`` and the sign-bytes functions, a decoded request re-encodes to bytes
  that decode to the same request, and the canonical split finds the decoded timestamp;
* ``DelimitedReader`` only raises FrameError, stays failed, never buffers more than
  ``max_size`` plus a prefix, and gives the same messages however the stream is chunked;
* the compiled kernel and the pure twin give the same result or the same error class.
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from nebula.errors import DecodeError, FrameError
from nebula.types import (
    PingRequest,
    PubKeyRequest,
    SignBytesRequest,
    SignProposalRequest,
    SignVoteRequest,
    WireFamily,
)
from tests.conftest import kernel
from tests.fuzz.conftest import both_kernels, fuzz_settings, outcome
from tests.support.vectors import h, load

FAMILIES = (WireFamily.V0_34, WireFamily.V0_38, WireFamily.V1_0)
FAMILY = st.sampled_from(FAMILIES)

MESSAGES = [h(v["message_hex"]) for v in load("privval_messages")["vectors"]]
WIRE = [h(v["wire_hex"]) for v in load("privval_messages")["vectors"]]
SIGN_BYTES = [h(v["sign_bytes_hex"]) for v in load("sign_bytes")["vectors"]]

DECODERS = ("decode_request", "decode_response", "decode_request_for_signing")
MAX_REQUEST_SIZE = (1 << 20) + 4096  # nebula.proto.MAX_REQUEST_SIZE

# ---- a protobuf-shaped input generator ----------------------------------------------------


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return uvarint(field << 3 | wire_type)


def ld(field: int, payload: bytes) -> bytes:
    return key(field, 2) + uvarint(len(payload)) + payload


# Varint values at every boundary the decoders care about: int32/uint32/int64 wrap-around,
# the Timestamp range (as two's complement), nanos limits, PRECOMMIT/PROPOSAL types.
_U64 = 1 << 64
_BOUNDARIES = [
    0,
    1,
    2,
    32,
    127,
    128,
    999_999_999,
    1_000_000_000,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
    _U64 - 1,
    -62135596800 % _U64,  # 0001-01-01, Go's zero time
    -62135596801 % _U64,
    253402300799,  # 9999-12-31T23:59:59
    253402300800,
    -1 % _U64,
]
VARINT_VALUE = st.one_of(
    st.sampled_from(_BOUNDARIES), st.integers(0, 300), st.integers(0, _U64 - 1)
)
# Mostly the field numbers the schema uses, sometimes anything encodable (0 and 2**29 are
# invalid field numbers, 2**32 an absurd one).
FIELD = st.one_of(
    st.integers(1, 11),
    st.integers(1, 11),
    st.sampled_from([0, 12, 15, 16, 2047, (1 << 29) - 1, 1 << 29, 1 << 32]),
)


def _varint_field(t: tuple[int, int]) -> bytes:
    return key(t[0], 0) + uvarint(t[1])


SCALAR_FIELD = st.one_of(
    st.tuples(FIELD, VARINT_VALUE).map(_varint_field),
    st.tuples(FIELD, st.binary(min_size=8, max_size=8)).map(lambda t: key(t[0], 1) + t[1]),
    st.tuples(FIELD, st.binary(min_size=4, max_size=4)).map(lambda t: key(t[0], 5) + t[1]),
    st.tuples(FIELD, st.binary(max_size=40)).map(lambda t: ld(*t)),
    st.tuples(FIELD, st.text(max_size=12)).map(lambda t: ld(t[0], t[1].encode())),
    # a key with any wire type (6 and 7 are invalid) and nothing or junk after it
    st.tuples(FIELD, st.integers(0, 7), st.binary(max_size=3)).map(
        lambda t: key(t[0], t[1]) + t[2]
    ),
    # an overlong (11-byte) or 64-bit-overflowing varint value
    st.tuples(FIELD, st.sampled_from([b"\x80" * 10 + b"\x00", b"\xff" * 9 + b"\x02"])).map(
        lambda t: key(t[0], 0) + t[1]
    ),
)


def _messages(inner: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    nested = st.one_of(
        st.tuples(FIELD, inner).map(lambda t: ld(*t)),
        # a group: start, body, end (sometimes unbalanced)
        st.tuples(FIELD, inner, st.booleans()).map(
            lambda t: key(t[0], 3) + t[1] + (key(t[0], 4) if t[2] else b"")
        ),
    )
    return st.lists(st.one_of(SCALAR_FIELD, nested), max_size=6).map(b"".join)


PB_MESSAGE = st.recursive(
    st.lists(SCALAR_FIELD, max_size=6).map(b"".join), _messages, max_leaves=25
)

# A privval ``Message``: one or more oneof members (tags 1..10 are the real ones), each
# carrying a random protobuf body, sometimes followed by stray fields.
PRIVVAL_MESSAGE = st.tuples(
    st.lists(st.tuples(st.integers(1, 11), PB_MESSAGE), min_size=1, max_size=2),
    st.lists(SCALAR_FIELD, max_size=2),
).map(lambda t: b"".join(ld(tag, body) for tag, body in t[0]) + b"".join(t[1]))


# Schema-guided messages: the privval field layout (protocol.md §2-§3), each field written
# with its declared wire type most of the time and something else now and then, so that
# inputs reach the nested Vote / BlockID / Timestamp decoders.
_TS_SECONDS = st.integers(-62135596800, 253402300799).map(lambda s: s % _U64)
_SCHEMA_LEAVES: dict[str, st.SearchStrategy[int | bytes]] = {
    "varint": VARINT_VALUE,
    "seconds": st.one_of(_TS_SECONDS, VARINT_VALUE),
    "nanos": st.one_of(st.integers(0, 999_999_999), VARINT_VALUE),
    "bytes": st.one_of(st.binary(max_size=40), st.sampled_from([b"", bytes(32), bytes(64)])),
    "string": st.one_of(
        st.text(max_size=16).map(str.encode),
        st.binary(max_size=8),  # often invalid UTF-8
    ),
    "key_type": st.sampled_from([b"ed25519", b"secp256k1", b"bls12_381", b"bls12381", b""]),
}
_TIMESTAMP = {1: "seconds", 2: "nanos"}
_PART_SET_HEADER = {1: "varint", 2: "bytes"}
_BLOCK_ID = {1: "bytes", 2: _PART_SET_HEADER}
_VOTE = {
    1: "varint",
    2: "varint",
    3: "varint",
    4: _BLOCK_ID,
    5: _TIMESTAMP,
    6: "bytes",
    7: "varint",
    8: "bytes",
    9: "bytes",
    10: "bytes",
}
_PROPOSAL = {
    1: "varint",
    2: "varint",
    3: "varint",
    4: "varint",
    5: _BLOCK_ID,
    6: _TIMESTAMP,
    7: "bytes",
}
_ERROR = {1: "varint", 2: "string"}
_PUBLIC_KEY = {1: "bytes", 2: "bytes", 3: "bytes"}
_ONEOF: dict[int, dict[int, Any]] = {
    1: {1: "string"},
    2: {1: _PUBLIC_KEY, 2: _ERROR, 3: "bytes", 4: "key_type"},
    3: {1: _VOTE, 2: "string", 3: "varint"},
    4: {1: _VOTE, 2: _ERROR},
    5: {1: _PROPOSAL, 2: "string"},
    6: {1: _PROPOSAL, 2: _ERROR},
    7: {},
    8: {},
    9: {1: "bytes"},
    10: {1: "bytes", 2: _ERROR},
}


def _schema_field(field: int, kind: Any) -> st.SearchStrategy[bytes]:
    if isinstance(kind, dict):
        return schema_message(kind).map(lambda body: ld(field, body))
    if kind in ("varint", "seconds", "nanos"):
        return _SCHEMA_LEAVES[kind].map(lambda v: key(field, 0) + uvarint(v))
    return _SCHEMA_LEAVES[kind].map(lambda v: ld(field, v))


def schema_message(schema: dict[int, Any]) -> st.SearchStrategy[bytes]:
    fields = [_schema_field(f, kind) for f, kind in schema.items()]
    entry = st.one_of(*fields, *fields, *fields, SCALAR_FIELD) if fields else SCALAR_FIELD
    return st.lists(entry, max_size=len(schema) + 2).map(b"".join)


SCHEMA_MESSAGE = st.one_of(
    [schema_message(body).map(lambda b, tag=tag: ld(tag, b)) for tag, body in _ONEOF.items()]
)


@st.composite
def damaged(draw: st.DrawFn, sources: list[bytes]) -> bytes:
    """A vector, damaged: cut, bytes flipped/inserted/deleted, or spliced with another."""
    out = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert", "delete", "splice", "dup"]))
        pos = draw(st.integers(0, len(out)))
        if op == "cut":
            del out[pos:]
        elif op == "flip" and pos < len(out):
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=4) | SCALAR_FIELD)
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 3))]
        elif op == "splice":
            out[pos:] = draw(st.sampled_from(sources))[pos:]
        else:
            out += out[pos:]
    return bytes(out)


MESSAGE_INPUT = st.one_of(
    SCHEMA_MESSAGE, SCHEMA_MESSAGE, PRIVVAL_MESSAGE, damaged(MESSAGES), st.binary(max_size=80)
)
SIGN_BYTES_INPUT = st.one_of(
    damaged(SIGN_BYTES),
    schema_message({**_VOTE, 5: _TIMESTAMP, 6: "string"}).map(lambda b: uvarint(len(b)) + b),
    schema_message({**_PROPOSAL, 7: "string"}).map(lambda b: uvarint(len(b)) + b),
    PB_MESSAGE.map(lambda body: uvarint(len(body)) + body),
    st.binary(max_size=80),
)


# ---- properties of one kernel --------------------------------------------------------------


def _check_decoded_request(pb: ModuleType, msg: bytes, family: WireFamily) -> None:
    """Everything a successful decode promises, on one kernel."""
    req_out = outcome(pb.decode_request, msg, family)
    fused_out = outcome(pb.decode_request_for_signing, msg, family)
    if req_out[0] == "error":
        assert fused_out == req_out
        assert req_out[1] is DecodeError
        return
    req = req_out[1]
    assert fused_out[0] == "ok"
    fused_req, sign_bytes, ext_sign_bytes = fused_out[1]
    assert fused_req == req
    if isinstance(req, SignVoteRequest):
        assert sign_bytes == pb.vote_sign_bytes(req.chain_id, req.vote)
        body, ts = pb.canonical_vote_without_timestamp(sign_bytes, False)
        assert ts == req.vote.timestamp
        assert len(body) < len(sign_bytes)
        if ext_sign_bytes is not None:
            assert family is not WireFamily.V0_34
            assert ext_sign_bytes == pb.vote_extension_sign_bytes(req.chain_id, req.vote)
    elif isinstance(req, SignProposalRequest):
        assert sign_bytes == pb.proposal_sign_bytes(req.chain_id, req.proposal)
        assert pb.canonical_vote_without_timestamp(sign_bytes)[1] == req.proposal.timestamp
        assert ext_sign_bytes is None
    else:
        assert isinstance(req, PubKeyRequest | PingRequest | SignBytesRequest)
        assert sign_bytes is None and ext_sign_bytes is None
    # What we accepted re-encodes to a message that decodes to the same request.
    assert pb.decode_request(pb.encode_request(req, family), family) == req


@fuzz_settings(300)
@given(family=FAMILY, msg=MESSAGE_INPUT)
@example(family=WireFamily.V0_38, msg=MESSAGES[0])
def test_decode_request_only_decode_errors(
    kernel_impl: str, family: WireFamily, msg: bytes
) -> None:
    _check_decoded_request(kernel("pb", kernel_impl), msg, family)


@fuzz_settings(200)
@given(family=FAMILY, msg=MESSAGE_INPUT)
def test_decode_response_only_decode_errors(
    kernel_impl: str, family: WireFamily, msg: bytes
) -> None:
    pb = kernel("pb", kernel_impl)
    kind, resp = outcome(pb.decode_response, msg, family)
    if kind == "error":
        assert resp is DecodeError
        return
    # Decoding is deterministic and does not depend on the buffer type.
    assert pb.decode_response(bytearray(msg), family) == resp
    assert pb.decode_response(memoryview(msg), family) == resp


@fuzz_settings(200)
@given(sign_bytes=SIGN_BYTES_INPUT, proposal=st.sampled_from([None, False, True]))
def test_canonical_split_only_decode_errors(
    kernel_impl: str, sign_bytes: bytes, proposal: bool | None
) -> None:
    pb = kernel("pb", kernel_impl)
    kind, result = outcome(pb.canonical_vote_without_timestamp, sign_bytes, proposal)
    if kind == "error":
        assert result is DecodeError
        return
    body, _ = result
    assert len(body) < len(sign_bytes)  # the length prefix at least is gone


@fuzz_settings(150)
@given(data=st.binary(max_size=16), pos=st.integers(-2, 18))
def test_decode_uvarint_only_decode_errors(kernel_impl: str, data: bytes, pos: int) -> None:
    pb = kernel("pb", kernel_impl)
    kind, result = outcome(pb.decode_uvarint, data, pos)
    if kind == "error":
        assert result is DecodeError
        return
    value, end = result
    assert 0 <= pos < end <= len(data) and end - pos <= 10
    assert pb.encode_uvarint(value) == data[pos:end] or data[end - 1] == 0  # non-minimal


# ---- DelimitedReader -------------------------------------------------------------------------

STREAM = st.one_of(
    st.lists(st.sampled_from(WIRE), max_size=6).map(b"".join),
    st.lists(damaged(WIRE), max_size=4).map(b"".join),
    st.binary(max_size=200),
    st.lists(st.binary(max_size=60).map(lambda m: uvarint(len(m)) + m), max_size=5).map(b"".join),
    # prefixes only: huge lengths, 10- and 11-byte varints, 64-bit overflow
    st.lists(VARINT_VALUE.map(uvarint), max_size=3).map(b"".join),
    st.sampled_from([b"\xff" * 9 + b"\x01", b"\xff" * 9 + b"\x02", b"\x80" * 11]),
)
MAX_SIZE = st.one_of(st.integers(0, 300), st.sampled_from([MAX_REQUEST_SIZE, (1 << 63) - 1]))


def _feed_all(reader: Any, stream: bytes, cuts: list[int]) -> tuple[list[bytes], Any]:
    """Feed ``stream`` cut at ``cuts``: (messages delivered, None or the error class)."""
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    delivered: list[bytes] = []
    for a, b in itertools.pairwise(bounds):
        kind, result = outcome(reader.feed, stream[a:b])
        if kind == "error":
            assert result is FrameError
            # a failed reader stays failed
            assert outcome(reader.feed, b"\x00")[1] is FrameError
            return delivered, result
        delivered += result
        assert reader.buffered() <= reader.max_size + 10
    return delivered, None


def reference_split(stream: bytes, max_size: int) -> tuple[list[bytes], bool]:
    """protocol.md §2.1 framing, stated plainly: (complete messages, whether it fails).

    It fails as soon as a length prefix is longer than 10 bytes, overflows 64 bits or
    shows a length above ``max_size``; a trailing partial message just waits.
    """
    messages: list[bytes] = []
    pos = 0
    while pos < len(stream):
        length = 0
        for i in range(11):
            if i == 10:
                return messages, True
            if pos + i >= len(stream):
                return messages, False
            b = stream[pos + i]
            if i == 9 and b > 1:
                return messages, True
            length |= (b & 0x7F) << (7 * i)
            if length > max_size:
                return messages, True
            if b < 0x80:
                break
        start = pos + i + 1
        if start + length > len(stream):
            return messages, False
        messages.append(stream[start : start + length])
        pos = start + length
    return messages, False


@fuzz_settings(300)
@given(
    stream=STREAM,
    max_size=MAX_SIZE,
    cuts=st.lists(st.integers(0, 400), max_size=10),
)
def test_delimited_reader_matches_reference(
    kernel_impl: str, stream: bytes, max_size: int, cuts: list[int]
) -> None:
    pb = kernel("pb", kernel_impl)
    expected, fails = reference_split(stream, max_size)
    whole, whole_err = _feed_all(pb.DelimitedReader(max_size), stream, [])
    pieces, pieces_err = _feed_all(pb.DelimitedReader(max_size), stream, cuts)
    assert (whole_err is FrameError) == fails == (pieces_err is FrameError)
    if not fails:
        assert whole == pieces == expected
    else:
        # the feed that fails delivers nothing; earlier feeds delivered a prefix
        assert whole == []
        assert pieces == expected[: len(pieces)]


# ---- the twins agree --------------------------------------------------------------------------


@fuzz_settings(400)
@given(family=FAMILY, msg=MESSAGE_INPUT)
def test_twins_agree_on_messages(family: WireFamily, msg: bytes) -> None:
    compiled, pure = both_kernels("pb")
    for name in DECODERS:
        assert outcome(getattr(compiled, name), msg, family) == outcome(
            getattr(pure, name), msg, family
        ), name


@fuzz_settings(200)
@given(sign_bytes=SIGN_BYTES_INPUT, proposal=st.sampled_from([None, False, True]))
def test_twins_agree_on_canonical_split(sign_bytes: bytes, proposal: bool | None) -> None:
    compiled, pure = both_kernels("pb")
    assert outcome(compiled.canonical_vote_without_timestamp, sign_bytes, proposal) == outcome(
        pure.canonical_vote_without_timestamp, sign_bytes, proposal
    )


@fuzz_settings(200)
@given(stream=STREAM, max_size=MAX_SIZE, cuts=st.lists(st.integers(0, 400), max_size=10))
def test_twins_agree_on_delimited_streams(stream: bytes, max_size: int, cuts: list[int]) -> None:
    compiled, pure = both_kernels("pb")
    a, b = compiled.DelimitedReader(max_size), pure.DelimitedReader(max_size)
    assert _feed_all(a, stream, cuts) == _feed_all(b, stream, cuts)
    assert a.buffered() == b.buffered()
