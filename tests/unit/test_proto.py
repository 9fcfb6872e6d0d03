"""privval codec and canonical sign bytes: vectors, round trips, robustness, twin identity.

Every test that takes ``kernel_impl`` runs against the compiled kernel and its pure twin;
the ``*_twins_agree`` tests run both on the same random input and compare.
"""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula import _fast, proto
from nebula.errors import DecodeError, FrameError
from nebula.types import (
    GO_ZERO_TIME_SECONDS,
    BlockID,
    PartSetHeader,
    PingRequest,
    PingResponse,
    Proposal,
    PubKeyRequest,
    PubKeyResponse,
    RemoteSignerError,
    SignBytesRequest,
    SignBytesResponse,
    SignedProposalResponse,
    SignedVoteResponse,
    SignProposalRequest,
    SignVoteRequest,
    Timestamp,
    Vote,
    WireFamily,
    extension_signature_required,
)
from tests.conftest import kernel
from tests.support.vectors import h, load

V0_34, V0_38, V1_0 = WireFamily.V0_34, WireFamily.V0_38, WireFamily.V1_0
FAMILIES = (V0_34, V0_38, V1_0)

_VERSION_FAMILY = {
    "v0.34": V0_34,
    "v0.37": V0_34,
    "v0.38": V0_38,
    "v0.39": V0_38,
    "v0.40": V0_38,
    "v1.0": V1_0,
}

MESSAGES = load("privval_messages")["vectors"]
SIGN_BYTES = load("sign_bytes")["vectors"]


def examples(n: int) -> settings:
    """Hypothesis settings; kernel_impl is a plain string, so reusing it is harmless."""
    return settings(
        max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )


def pb(impl: str) -> ModuleType:
    return kernel("pb", impl)


def both() -> tuple[ModuleType, ModuleType]:
    try:
        compiled = _fast.load_compiled("pb")
    except ImportError:
        if _fast.REQUIRE_COMPILED:
            raise
        pytest.skip("compiled kernels not built")
    return compiled, _fast.load_pure("pb")


def families_of(vector: dict[str, Any]) -> list[WireFamily]:
    versions = vector["versions"]
    if versions == ["all"] or versions == ["tmkms"]:
        return list(FAMILIES)
    fams = {_VERSION_FAMILY[v] for v in versions if v in _VERSION_FAMILY}
    return [f for f in FAMILIES if f in fams]


def is_request(message: bytes) -> bool:
    return (message[0] >> 3) % 2 == 1  # odd oneof tags are requests


def msg_vector(name: str) -> bytes:
    return h(next(v for v in MESSAGES if v["name"] == name)["message_hex"])


# ==== privval message vectors ===================================================================


@pytest.mark.parametrize("vector", MESSAGES, ids=[v["name"] for v in MESSAGES])
def test_message_vector_roundtrip(kernel_impl: str, vector: dict[str, Any]) -> None:
    k = pb(kernel_impl)
    message = h(vector["message_hex"])
    assert k.encode_delimited(message) == h(vector["wire_hex"])
    for family in families_of(vector):
        if is_request(message):
            decoded = k.decode_request(message, family)
            assert k.encode_request(decoded, family) == message
        else:
            decoded = k.decode_response(message, family)
            if vector["versions"] == ["tmkms"]:
                # tmkms leaves the vote out; Go always writes it, so only decoding applies.
                assert decoded.vote == Vote()
                assert decoded.error == RemoteSignerError(
                    2, "double signing requested at height: 100"
                )
                continue
            assert k.encode_response(decoded, family) == message


@pytest.mark.parametrize("vector", MESSAGES, ids=[v["name"] for v in MESSAGES])
def test_message_vector_through_reader(kernel_impl: str, vector: dict[str, Any]) -> None:
    k = pb(kernel_impl)
    wire = h(vector["wire_hex"])
    reader = k.DelimitedReader(proto.MAX_REQUEST_SIZE)
    got = []
    for i in range(len(wire)):  # one byte at a time
        got += reader.feed(wire[i : i + 1])
    assert got == [h(vector["message_hex"])]
    assert reader.buffered() == 0
    assert k.DelimitedReader(len(got[0])).feed(wire * 3) == got * 3


def test_vector_contents(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    pub = bytes.fromhex("556a436f1218d30942efe798420f51dc9b6a311b929c578257457d05c5fcf230")
    for name, family in (
        ("pubkey_response_ed25519_v034_v038", V0_38),
        ("pubkey_response_ed25519_v034_v038", V0_34),
        ("pubkey_response_ed25519_v1", V1_0),
    ):
        assert k.decode_response(msg_vector(name), family) == PubKeyResponse("ed25519", pub)

    req = k.decode_request(msg_vector("sign_vote_request_v038"), V0_38)
    assert isinstance(req, SignVoteRequest)
    v = req.vote
    assert (v.type, v.height, v.round, v.validator_index) == (2, 3, 2, 56789)
    assert v.block_id.part_set_header.total == 1_000_000
    assert v.timestamp == Timestamp(1570983284, 0)  # 2019-10-13T16:14:44Z
    assert v.extension == b"extension"
    assert req.chain_id == "" and req.skip_extension_signing is False

    req = k.decode_request(msg_vector("sign_vote_request_v1_skip_extension_signing"), V1_0)
    assert req.skip_extension_signing is True and req.chain_id == "test_chain_id"

    prop = k.decode_request(msg_vector("sign_proposal_request"), V0_38)
    assert isinstance(prop, SignProposalRequest)
    assert (prop.proposal.type, prop.proposal.pol_round) == (1, 2)
    assert prop.proposal.signature == b"it's a signature"

    assert k.decode_request(msg_vector("sign_bytes_request_v1"), V1_0) == SignBytesRequest(b"hello")
    assert k.decode_request(msg_vector("ping_request"), V0_34) == PingRequest()
    assert k.decode_response(msg_vector("ping_response"), V1_0) == PingResponse()


def test_error_responses_match_go(kernel_impl: str) -> None:
    """error_response() + encode_response give the Go signer's bytes (vectors)."""
    k = pb(kernel_impl)
    err = RemoteSignerError(1, "it's a error")
    for family in FAMILIES:
        vote_err = proto.error_response(SignVoteRequest(), err)
        assert k.encode_response(vote_err, family) == msg_vector("signed_vote_response_error")
        prop_err = proto.error_response(SignProposalRequest(), err)
        assert k.encode_response(prop_err, family) == msg_vector("signed_proposal_response_error")
    pk_err = proto.error_response(PubKeyRequest(), err)
    for family in (V0_34, V0_38):
        assert k.encode_response(pk_err, family) == msg_vector("pubkey_response_error_v034_v038")
    assert k.encode_response(pk_err, V1_0) == msg_vector("pubkey_response_error_v1")
    assert proto.error_response(SignBytesRequest(), err) == SignBytesResponse(error=err)
    with pytest.raises(ValueError):
        proto.error_response(PingRequest(), err)


# ==== sign bytes vectors ===========================================================================


def _timestamp(spec: dict[str, Any]) -> Timestamp:
    if "seconds" in spec:
        return Timestamp(spec["seconds"], spec["nanos"])
    dt = datetime.fromisoformat(spec["rfc3339"].replace("Z", "+00:00"))
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    seconds = delta.days * 86400 + delta.seconds
    return Timestamp(seconds, delta.microseconds * 1000)


def _block_id(spec: dict[str, Any] | None) -> BlockID:
    if spec is None:
        return BlockID()
    psh = spec["part_set_header"]
    return BlockID(h(spec["hash_hex"]), PartSetHeader(psh["total"], h(psh["hash_hex"])))


def _sign_bytes_of(k: ModuleType, vector: dict[str, Any]) -> bytes:
    i = vector["inputs"]
    kind = vector["kind"]
    if kind == "CanonicalVote":
        vote = Vote(
            type=i["type"],
            height=i["height"],
            round=i["round"],
            block_id=_block_id(i["block_id"]),
            timestamp=_timestamp(i["timestamp"]),
            extension=i.get("vote_extension_utf8", "").encode(),
        )
        return k.vote_sign_bytes(i["chain_id"], vote)
    if kind == "CanonicalProposal":
        proposal = Proposal(
            type=i["type"],
            height=i["height"],
            round=i["round"],
            pol_round=i["pol_round"],
            block_id=_block_id(i["block_id"]),
            timestamp=_timestamp(i["timestamp"]),
        )
        return k.proposal_sign_bytes(i["chain_id"], proposal)
    assert kind == "CanonicalVoteExtension"
    vote = Vote(height=i["height"], round=i["round"], extension=i["extension_utf8"].encode())
    return k.vote_extension_sign_bytes(i["chain_id"], vote)


@pytest.mark.parametrize("vector", SIGN_BYTES, ids=[v["name"] for v in SIGN_BYTES])
def test_sign_bytes_vector(kernel_impl: str, vector: dict[str, Any]) -> None:
    assert _sign_bytes_of(pb(kernel_impl), vector) == h(vector["sign_bytes_hex"])


@pytest.mark.parametrize(
    "vector",
    [v for v in SIGN_BYTES if v["kind"] != "CanonicalVoteExtension"],
    ids=[v["name"] for v in SIGN_BYTES if v["kind"] != "CanonicalVoteExtension"],
)
def test_sign_bytes_vector_via_fused_decode(kernel_impl: str, vector: dict[str, Any]) -> None:
    """decode_request_for_signing computes the same sign bytes from the wire form."""
    k = pb(kernel_impl)
    i = vector["inputs"]
    bid, ts = _block_id(i["block_id"]), _timestamp(i["timestamp"])
    if vector["kind"] == "CanonicalVote":
        vote = Vote(i["type"], i["height"], i["round"], bid, ts, b"\x01" * 20, 7, b"", b"", b"")
        req: Any = SignVoteRequest(vote, i["chain_id"])
    else:
        prop = Proposal(1, i["height"], i["round"], i["pol_round"], bid, ts, b"sig")
        req = SignProposalRequest(prop, i["chain_id"])
    for family in FAMILIES:
        decoded, sign_bytes, _ = k.decode_request_for_signing(k.encode_request(req, family), family)
        assert decoded == req
        assert sign_bytes == h(vector["sign_bytes_hex"])


def test_proposal_sign_bytes_ignore_proposal_type(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    p = Proposal(type=32, height=5, round=1, pol_round=-1, timestamp=Timestamp(1, 2))
    expected = k.proposal_sign_bytes("c", p)
    for t in (0, 1, 2, 99):
        assert k.proposal_sign_bytes("c", dataclasses.replace(p, type=t)) == expected


def test_vote_sign_bytes_ignore_unsigned_fields(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    v = Vote(2, 10, 1, BlockID(b"h" * 32, PartSetHeader(1, b"p" * 32)), Timestamp(5, 6))
    base = k.vote_sign_bytes("chain", v)
    other = dataclasses.replace(
        v,
        validator_address=b"a" * 20,
        validator_index=3,
        signature=b"s" * 64,
        extension=b"e",
        extension_signature=b"x" * 64,
    )
    assert k.vote_sign_bytes("chain", other) == base
    assert k.vote_sign_bytes("chain2", v) != base


# ==== canonical_vote_without_timestamp ==============================================================

CANONICAL = [v for v in SIGN_BYTES if v["kind"] in ("CanonicalVote", "CanonicalProposal")]


@pytest.mark.parametrize("vector", CANONICAL, ids=[v["name"] for v in CANONICAL])
def test_canonical_without_timestamp_vectors(kernel_impl: str, vector: dict[str, Any]) -> None:
    k = pb(kernel_impl)
    sign_bytes = h(vector["sign_bytes_hex"])
    body, ts = k.canonical_vote_without_timestamp(sign_bytes)
    assert ts == _timestamp(vector["inputs"]["timestamp"])
    # what is left is the body minus exactly one length-delimited timestamp field
    ts_field = 6 if vector["kind"] == "CanonicalProposal" else 5
    ts_msg = bytearray()
    if ts.seconds:
        ts_msg += b"\x08" + k.encode_uvarint(ts.seconds & (2**64 - 1))
    if ts.nanos:
        ts_msg += b"\x10" + k.encode_uvarint(ts.nanos)
    ts_field_bytes = bytes([ts_field << 3 | 2]) + k.encode_delimited(bytes(ts_msg))
    _, start = k.decode_uvarint(sign_bytes)
    assert body == sign_bytes[start:].replace(ts_field_bytes, b"", 1)


def test_canonical_without_timestamp_only_timestamp_differs(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    bid = BlockID(b"h" * 32, PartSetHeader(2, b"p" * 32))
    v1 = Vote(2, 100, 3, bid, Timestamp(1_700_000_000, 5))
    v2 = dataclasses.replace(v1, timestamp=Timestamp(1_700_000_123, 999))
    v3 = dataclasses.replace(v1, block_id=BlockID())
    s1, s2, s3 = (k.vote_sign_bytes("c", v) for v in (v1, v2, v3))
    (b1, t1), (b2, t2), (b3, _) = (k.canonical_vote_without_timestamp(s) for s in (s1, s2, s3))
    assert s1 != s2 and b1 == b2 and b1 != b3
    assert (t1, t2) == (v1.timestamp, v2.timestamp)
    # proposals: the timestamp is field 6 and the block id (field 5) stays
    p1 = Proposal(32, 100, 3, -1, bid, Timestamp(10, 0))
    p2 = dataclasses.replace(p1, timestamp=Timestamp())
    p3 = dataclasses.replace(p1, pol_round=2)
    q1, q2, q3 = (k.proposal_sign_bytes("c", p) for p in (p1, p2, p3))
    (c1, u1), (c2, u2), (c3, _) = (k.canonical_vote_without_timestamp(q) for q in (q1, q2, q3))
    assert c1 == c2 and c1 != c3 and (u1, u2) == (Timestamp(10, 0), Timestamp())


@pytest.mark.parametrize(
    "bad",
    [
        b"",  # no prefix
        b"\x05\x08\x01",  # prefix longer than the body
        b"\x01\x08\x01",  # prefix shorter than the body
        b"\x02\x2a\x05",  # truncated timestamp field
        b"\x04\x2a\x02\x10\x80",  # truncated varint inside the timestamp
        b"\x04\x2a\x02\x10\xff",  # nanos -> invalid (truncated)
        b"\x0d\x2a\x0b\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # seconds out of range
        b"\x02\x08\x80",  # truncated type
        b"\x02\x29\x00",  # timestamp with wire type 1 (fixed64), truncated
        b"\x09\x29\x00\x00\x00\x00\x00\x00\x00\x00",  # timestamp field with wrong wire type
    ],
)
def test_canonical_without_timestamp_rejects_garbage(kernel_impl: str, bad: bytes) -> None:
    with pytest.raises(DecodeError):
        pb(kernel_impl).canonical_vote_without_timestamp(bad)


# ==== family differences =============================================================================


def _ext_vote() -> Vote:
    return Vote(
        2,
        7,
        1,
        BlockID(b"h" * 32, PartSetHeader(1, b"p" * 32)),
        Timestamp(1_600_000_000, 1),
        b"a" * 20,
        4,
        b"s" * 64,
        b"my-extension",
        b"x" * 64,
    )


def test_extension_fields_only_in_v038_and_v1(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    vote = _ext_vote()
    legacy = k.encode_response(SignedVoteResponse(vote), V0_34)
    modern = k.encode_response(SignedVoteResponse(vote), V0_38)
    assert b"my-extension" not in legacy and b"my-extension" in modern
    assert modern == k.encode_response(SignedVoteResponse(vote), V1_0)
    stripped = dataclasses.replace(vote, extension=b"", extension_signature=b"")
    assert k.decode_response(legacy, V0_34).vote == stripped
    assert k.decode_response(modern, V0_38).vote == vote
    # a v0.38 message read as v0.34: fields 9/10 are unknown there and skipped
    assert k.decode_response(modern, V0_34).vote == stripped
    req = k.decode_request(msg_vector("sign_vote_request_v038"), V0_34)
    assert req.vote.extension == b""


def test_skip_extension_signing_only_in_v1(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    req = SignVoteRequest(_ext_vote(), "c", skip_extension_signing=True)
    v1 = k.encode_request(req, V1_0)
    v038 = k.encode_request(req, V0_38)
    assert _payload(v1) == _payload(v038) + b"\x18\x01"
    assert k.decode_request(v1, V1_0).skip_extension_signing is True
    assert k.decode_request(v1, V0_38).skip_extension_signing is False  # unknown there


def test_pub_key_response_layouts_differ(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    key = bytes(range(32))
    resp = PubKeyResponse("ed25519", key)
    legacy, v1 = k.encode_response(resp, V0_38), k.encode_response(resp, V1_0)
    assert legacy == b"\x12\x24\x0a\x22\x0a\x20" + key
    assert v1 == b"\x12\x2b\x1a\x20" + key + b"\x22\x07ed25519"
    assert k.encode_response(resp, V0_34) == legacy
    assert k.decode_response(legacy, V0_38) == resp
    assert k.decode_response(v1, V1_0) == resp
    # each family does not understand the other's layout
    assert k.decode_response(legacy, V1_0) == PubKeyResponse()
    assert k.decode_response(v1, V0_38) == PubKeyResponse()

    bls = PubKeyResponse("bls12381", bytes(96))
    assert k.encode_response(bls, V0_38)[4:6] == b"\x1a\x60"  # PublicKey.bls12381 = 3
    assert k.encode_response(bls, V1_0).endswith(b"\x22\x09bls12_381")
    for family in (V0_38, V1_0):
        assert k.decode_response(k.encode_response(bls, family), family) == bls
    secp = PubKeyResponse("secp256k1", bytes(33))
    for family in FAMILIES:
        assert k.decode_response(k.encode_response(secp, family), family) == secp
    with pytest.raises(ValueError):
        k.encode_response(bls, V0_34)  # no BLS before v0.39
    with pytest.raises(ValueError):
        k.encode_response(PubKeyResponse("rsa", b"k"), V1_0)
    with pytest.raises(ValueError):
        k.encode_response(PubKeyResponse("", b"k"), V0_38)
    bad_type = b"\x12\x06\x22\x04rsa!"
    with pytest.raises(DecodeError):
        k.decode_response(bad_type, V1_0)


def test_sign_bytes_messages_only_in_v1(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    msg = msg_vector("sign_bytes_request_v1")
    for family in (V0_34, V0_38):
        with pytest.raises(DecodeError):  # tag 9 is unknown: the oneof is empty
            k.decode_request(msg, family)
        with pytest.raises(ValueError):
            k.encode_request(SignBytesRequest(b"x"), family)
        with pytest.raises(ValueError):
            k.encode_response(SignBytesResponse(b"x"), family)
    resp = SignBytesResponse(b"sig", RemoteSignerError(0, ""))
    assert k.encode_response(resp, V1_0) == b"\x52\x07\x0a\x03sig\x12\x00"
    assert k.decode_response(k.encode_response(resp, V1_0), V1_0) == resp


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("vote_type", "block_id", "skip", "wants_ext"),
    [
        (2, BlockID(b"h" * 32, PartSetHeader(1, b"p" * 32)), False, True),
        (2, BlockID(b"", PartSetHeader(1, b"")), False, True),  # not zero -> not nil
        (2, BlockID(), False, False),  # nil precommit
        (1, BlockID(b"h" * 32, PartSetHeader(1, b"p" * 32)), False, False),  # prevote
        (2, BlockID(b"h" * 32, PartSetHeader(1, b"p" * 32)), True, True),  # skip: v1 only
    ],
)
def test_fused_decode_extension_rule(
    kernel_impl: str,
    family: WireFamily,
    vote_type: int,
    block_id: BlockID,
    skip: bool,
    wants_ext: bool,
) -> None:
    k = pb(kernel_impl)
    vote = Vote(vote_type, 9, 0, block_id, Timestamp(3, 4), extension=b"ext")
    req = SignVoteRequest(vote, "chain", skip)
    _, sign_bytes, ext = k.decode_request_for_signing(k.encode_request(req, family), family)
    assert sign_bytes == k.vote_sign_bytes("chain", vote)
    expected = wants_ext and family is not V0_34 and not (family is V1_0 and skip)
    # The one rule every caller asks (nebula.types), against this table.
    assert extension_signature_required(family, req) is expected
    if expected:
        assert ext == k.vote_extension_sign_bytes("chain", vote)
    else:
        assert ext is None
    for msg in (PingRequest(), PubKeyRequest("c")):
        assert k.decode_request_for_signing(k.encode_request(msg, family), family) == (
            msg,
            None,
            None,
        )


# ==== decoding details =================================================================================


def test_absent_and_empty_timestamp(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    # SignVoteRequest{vote{height 1}}: no timestamp -> Go's zero time
    req = k.decode_request(b"\x1a\x04\x0a\x02\x10\x01", V0_38)
    assert req.vote.timestamp == Timestamp() == Timestamp(GO_ZERO_TIME_SECONDS, 0)
    # an empty Timestamp is the Unix epoch
    req = k.decode_request(b"\x1a\x06\x0a\x04\x10\x01\x2a\x00", V0_38)
    assert req.vote.timestamp == Timestamp(0, 0)
    # and the epoch is written as an empty Timestamp
    epoch = k.encode_request(SignVoteRequest(Vote(timestamp=Timestamp(0, 0))), V0_38)
    assert epoch == b"\x1a\x08\x0a\x06\x22\x02\x12\x00\x2a\x00"
    # an absent proposal type is 0 (the dataclass default 32 is for building proposals)
    assert k.decode_request(b"\x2a\x02\x0a\x00", V0_38).proposal.type == 0


def test_negative_int32_is_ten_byte_varint(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    vote = Vote(round=-1, validator_index=-2, timestamp=Timestamp(0, 0))
    msg = k.encode_request(SignVoteRequest(vote), V0_34)
    assert b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01" in msg
    assert b"\x38\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01" in msg
    assert k.decode_request(msg, V0_34).vote == vote
    # Go reads int32 fields from the low 32 bits of the varint; so do we
    low = k.decode_request(b"\x1a\x08\x0a\x06\x18\xff\xff\xff\xff\x0f", V0_34)
    assert low.vote.round == -1
    prop = Proposal(pol_round=-1)
    assert b"\x20\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01" in k.encode_request(
        SignProposalRequest(prop), V0_38
    )


def test_unknown_fields_are_skipped(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    unknown = (
        b"\xf8\x01\x96\x01"  # field 31 varint
        b"\xf9\x01"
        + bytes(8)  # field 31 fixed64
        + b"\xfa\x01\x03abc"  # field 31 bytes
        + b"\xfd\x01"
        + bytes(4)  # field 31 fixed32
        + b"\xfb\x01\x08\x01\x12\x01z\xfc\x01"  # field 31 group with two fields
        + b"\x80\x80\x80\x08\x00"  # field 2^21 varint (multi-byte key)
    )
    vote = _ext_vote()
    for family in FAMILIES:
        base = k.encode_request(SignVoteRequest(vote, "c"), family)
        decoded = k.decode_request(base, family)
        # unknown fields at the top level, inside the request, inside the vote
        inner = _payload(base)
        vote_len, vote_start = k.decode_uvarint(inner, 1)
        vote_bytes = inner[vote_start : vote_start + vote_len] + unknown
        request = (
            b"\x0a" + k.encode_delimited(vote_bytes) + inner[vote_start + vote_len :] + unknown
        )
        msg = unknown + b"\x1a" + k.encode_delimited(request) + unknown
        assert k.decode_request(msg, family) == decoded


def test_last_oneof_and_scalar_win_submessages_merge(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    ping = b"\x3a\x00"
    pubkey = b"\x0a\x03\x0a\x01x"
    assert k.decode_request(ping + pubkey, V0_38) == PubKeyRequest("x")
    assert k.decode_request(pubkey + ping, V0_38) == PingRequest()
    # vote{height 1, block_id{hash "a"}} + vote{height 2, block_id{psh{total 3}}}
    vote_a = b"\x10\x01\x22\x03\x0a\x01a"
    vote_b = b"\x10\x02\x22\x04\x12\x02\x08\x03"
    body = b"\x0a" + k.encode_delimited(vote_a) + b"\x0a" + k.encode_delimited(vote_b)
    v = k.decode_request(b"\x1a" + k.encode_delimited(body), V0_38).vote
    assert v.height == 2
    assert v.block_id == BlockID(b"a", PartSetHeader(3, b""))


def _uv(n: int) -> bytes:
    """Independent varint encoder for hand-built test messages."""
    n &= 2**64 - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _uv(field << 3 | 2) + _uv(len(payload)) + payload


def _svr(vote_body: bytes) -> bytes:
    """Message{SignVoteRequest{vote = vote_body}}"""
    return _ld(3, _ld(1, vote_body))


def _payload(msg: bytes) -> bytes:
    """The payload of a Message's (single) oneof field."""
    n, start = _fast.load_pure("pb").decode_uvarint(msg, 1)
    return msg[start : start + n]


MALFORMED = {
    "empty message": b"",
    "field number 0": b"\x00",
    "truncated length": b"\x3a",
    "truncated payload": b"\x3a\x01",
    "response after request": b"\x3a\x00\x42\x00",
    "ping response": b"\x42\x00",
    "pubkey response": b"\x12\x00",
    "oneof field with varint wire type": b"\x38\x00",
    "only unknown fields": b"\x5a\x00",
    "truncated vote": b"\x1a\x02\x0a\x05",
    "vote with varint wire type": b"\x1a\x02\x08\x01",
    "truncated timestamp": _svr(b"\x2a\x01"),
    "truncated block id": _svr(b"\x22\x01"),
    "truncated part set header": _svr(b"\x22\x02\x12\x05"),
    "truncated varint": _svr(b"\x08\x80"),
    "chain_id not UTF-8": _ld(3, b"\x12\x01\xff"),
    "pubkey chain_id not UTF-8": _ld(1, b"\x0a\x01\xc3"),
    "negative nanos": _svr(_ld(5, b"\x10" + _uv(-1))),
    "nanos of one second": _svr(_ld(5, b"\x10" + _uv(10**9))),
    "seconds before year 1": _svr(_ld(5, b"\x08" + _uv(GO_ZERO_TIME_SECONDS - 1))),
    "seconds after year 9999": _svr(_ld(5, b"\x08" + _uv(253402300800))),
    "varint overflow": _svr(b"\x10" + b"\xff" * 9 + b"\x02"),
    "varint longer than 10 bytes": _svr(b"\x10" + b"\x80" * 10 + b"\x00"),
    "end-group without start-group": _svr(b"\x5c"),
    "unterminated group": _svr(b"\x5b"),
    "wire type 6": _svr(b"\x5e"),
    "wire type 7": _svr(b"\x5f"),
    "truncated fixed64": _svr(b"\x59\x00"),
    "truncated fixed32": _svr(b"\x5d\x00"),
    "extension with varint wire type": _svr(b"\x48\x00"),
    "timestamp with varint wire type": _svr(b"\x28\x00"),
    "field number above 2^29-1": b"\x8a\x80\x80\x80\x10\x00",
}

WELL_FORMED_NEIGHBOURS = {
    "nanos 999999999": _svr(_ld(5, b"\x10" + _uv(999_999_999))),
    "seconds of year 1": _svr(_ld(5, b"\x08" + _uv(GO_ZERO_TIME_SECONDS))),
    "last second of year 9999": _svr(_ld(5, b"\x08" + _uv(253402300799))),
    "varint of 10 bytes": _svr(b"\x10" + b"\xff" * 9 + b"\x01"),
    "extension": _svr(b"\x4a\x01\x00"),
    "group inside an unknown field": _svr(b"\x5b\x08\x01\x5c"),
    "fixed64 and fixed32 unknown fields": _svr(b"\x59" + bytes(8) + b"\x5d" + bytes(4)),
}


@pytest.mark.parametrize("why", list(MALFORMED))
def test_malformed_requests_raise_decode_error(kernel_impl: str, why: str) -> None:
    k = pb(kernel_impl)
    with pytest.raises(DecodeError):
        k.decode_request(MALFORMED[why], V0_38)
    with pytest.raises(DecodeError):
        k.decode_request_for_signing(MALFORMED[why], V0_38)


@pytest.mark.parametrize("why", list(WELL_FORMED_NEIGHBOURS))
def test_well_formed_neighbours_decode(kernel_impl: str, why: str) -> None:
    req = pb(kernel_impl).decode_request(WELL_FORMED_NEIGHBOURS[why], V0_38)
    assert isinstance(req, SignVoteRequest)


@pytest.mark.parametrize("vector", MESSAGES, ids=[v["name"] for v in MESSAGES])
def test_truncated_vectors_raise_decode_error(kernel_impl: str, vector: dict[str, Any]) -> None:
    k = pb(kernel_impl)
    message = h(vector["message_hex"])
    decode = k.decode_request if is_request(message) else k.decode_response
    for family in families_of(vector):
        for cut in range(len(message)):
            with pytest.raises(DecodeError):
                decode(message[:cut], family)


def test_decode_accepts_buffers(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    msg = msg_vector("sign_vote_request_v038")
    expected = k.decode_request(msg, V0_38)
    assert k.decode_request(bytearray(msg), V0_38) == expected
    assert k.decode_request(memoryview(msg), V0_38) == expected
    with pytest.raises(TypeError):
        k.decode_request("not bytes", V0_38)
    with pytest.raises(TypeError):
        k.decode_request(msg, "v0_38")


def test_encode_rejects_bad_values(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    with pytest.raises(OverflowError):
        k.encode_request(SignVoteRequest(Vote(round=2**31)), V0_38)
    with pytest.raises(OverflowError):
        k.encode_request(SignVoteRequest(Vote(height=2**63)), V0_38)
    with pytest.raises(OverflowError):
        k.vote_sign_bytes("c", Vote(height=-(2**63) - 1))
    with pytest.raises(OverflowError):
        bid = BlockID(b"", PartSetHeader(-1, b""))
        k.encode_response(SignedProposalResponse(Proposal(block_id=bid)), V0_38)
    with pytest.raises(OverflowError):
        k.encode_response(SignedVoteResponse(error=RemoteSignerError(2**40)), V0_38)
    with pytest.raises(TypeError):
        k.encode_request(SignVoteRequest(Vote(signature="sig")), V0_38)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        k.vote_sign_bytes(b"chain", Vote())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        k.encode_request(PingResponse(), V0_38)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        k.encode_response(PingRequest(), V0_38)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        k.encode_uvarint(-1)
    with pytest.raises(OverflowError):
        k.encode_uvarint(2**64)
    assert k.encode_uvarint(2**64 - 1) == b"\xff" * 9 + b"\x01"
    assert k.decode_uvarint(b"\x00\xac\x02", 1) == (300, 3)
    with pytest.raises(DecodeError):
        k.decode_uvarint(b"\x80")


# ==== framing ===========================================================================================


def test_delimited_reader_limits(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    reader = k.DelimitedReader(300)
    assert reader.feed(b"") == []
    assert reader.feed(b"\x00") == [b""]
    assert reader.feed(b"\xac") == []  # half a prefix waits
    assert reader.feed(b"\x02" + b"a" * 299) == []
    assert reader.buffered() == 301
    assert reader.feed(b"a\x01") == [b"a" * 300]
    assert reader.feed(b"b") == [b"b"]

    # 301 > 300: refused as soon as the prefix is complete, nothing of the body kept
    reader = k.DelimitedReader(300)
    with pytest.raises(FrameError):
        reader.feed(b"\xad\x02")
    assert reader.buffered() == 0
    with pytest.raises(FrameError):  # and the stream stays failed
        reader.feed(b"\x00")

    # a huge length is refused from its first bytes, before the prefix even ends
    reader = k.DelimitedReader(proto.MAX_REQUEST_SIZE)
    with pytest.raises(FrameError):
        reader.feed(b"\xff\xff\xff")
    reader = k.DelimitedReader(proto.MAX_REQUEST_SIZE)
    assert reader.feed(b"\x80\x80\x80") == []  # still zero so far: wait
    with pytest.raises(FrameError):
        reader.feed(b"\x80" * 7)  # 10 bytes and still continuing
    reader = k.DelimitedReader(2**63 - 1)
    with pytest.raises(FrameError):
        reader.feed(b"\x80" * 9 + b"\x02")  # bit 64 set
    reader = k.DelimitedReader(2**63 - 1)
    assert reader.feed(b"\x81" + b"\x80" * 8 + b"\x00") == []  # overlong zero-padded: waits


def test_delimited_reader_max_request(kernel_impl: str) -> None:
    k = pb(kernel_impl)
    assert proto.MAX_REQUEST_SIZE == 1024 * 1024 + 4096
    big = SignVoteRequest(dataclasses.replace(_ext_vote(), extension=b"e" * (1 << 20)), "c")
    msg = k.encode_request(big, V0_38)
    assert len(msg) < proto.MAX_REQUEST_SIZE
    wire = k.encode_delimited(msg)
    reader = k.DelimitedReader(proto.MAX_REQUEST_SIZE)
    got = []
    for i in range(0, len(wire), 1024):  # SecretConnection-sized chunks
        got += reader.feed(wire[i : i + 1024])
    assert got == [msg]
    assert k.decode_request(got[0], V0_38) == big
    too_big = k.encode_delimited(bytes(proto.MAX_REQUEST_SIZE + 1))
    with pytest.raises(FrameError):
        k.DelimitedReader(proto.MAX_REQUEST_SIZE).feed(too_big[:8])


def test_public_api_uses_selected_kernel() -> None:
    selected = _fast.load("pb")
    assert proto.decode_request is selected.decode_request
    assert proto.vote_sign_bytes is selected.vote_sign_bytes
    assert proto.DelimitedReader is selected.DelimitedReader
    assert proto.KERNEL_COMPILED == _fast.COMPILED["pb"]
    if _fast.REQUIRE_COMPILED:
        assert proto.KERNEL_COMPILED


# ==== hypothesis: random round trips and twin identity ===================================================

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
BLOB = st.binary(max_size=40)
TEXT = st.text(max_size=20)
TIMESTAMPS = st.builds(
    Timestamp, st.integers(GO_ZERO_TIME_SECONDS, 253402300799), st.integers(0, 999_999_999)
)
BLOCK_IDS = st.just(BlockID()) | st.builds(
    BlockID, BLOB, st.builds(PartSetHeader, UINT32 | st.just(0), BLOB)
)
SMALL = st.integers(-3, 3)
ERRORS = st.none() | st.builds(RemoteSignerError, INT32 | SMALL, TEXT)


def votes(family: WireFamily) -> st.SearchStrategy[Vote]:
    ext = BLOB if family is not V0_34 else st.just(b"")
    return st.builds(
        Vote,
        st.sampled_from([0, 1, 2, 32]) | INT32,
        INT64 | SMALL,
        INT32 | SMALL,
        BLOCK_IDS,
        TIMESTAMPS,
        BLOB,
        INT32 | SMALL,
        BLOB,
        ext,
        ext,
    )


PROPOSALS = st.builds(
    Proposal, INT32 | st.just(32), INT64, INT32, INT32 | SMALL, BLOCK_IDS, TIMESTAMPS, BLOB
)
KEY_TYPES = {V0_34: ["ed25519", "secp256k1"], V0_38: ["ed25519", "secp256k1", "bls12381"]}
KEY_TYPES[V1_0] = KEY_TYPES[V0_38]


def requests(family: WireFamily) -> st.SearchStrategy[Any]:
    options = [
        st.builds(PubKeyRequest, TEXT),
        st.builds(
            SignVoteRequest,
            votes(family),
            TEXT,
            st.booleans() if family is V1_0 else st.just(False),
        ),
        st.builds(SignProposalRequest, PROPOSALS, TEXT),
        st.just(PingRequest()),
    ]
    if family is V1_0:
        options.append(st.builds(SignBytesRequest, BLOB))
    return st.one_of(options)


def responses(family: WireFamily) -> st.SearchStrategy[Any]:
    keys = st.just(PubKeyResponse(error=None)) | st.builds(
        PubKeyResponse, st.sampled_from(KEY_TYPES[family]), BLOB, ERRORS
    )
    options = [
        keys,
        st.builds(PubKeyResponse, st.just(""), st.just(b""), ERRORS),
        st.builds(SignedVoteResponse, votes(family), ERRORS),
        st.builds(SignedProposalResponse, PROPOSALS, ERRORS),
        st.just(PingResponse()),
    ]
    if family is V1_0:
        options.append(st.builds(SignBytesResponse, BLOB, ERRORS))
    return st.one_of(options)


FAMILY = st.sampled_from(FAMILIES)


@examples(300)
@given(data=st.data())
def test_random_request_roundtrip(kernel_impl: str, data: st.DataObject) -> None:
    k = pb(kernel_impl)
    family = data.draw(FAMILY)
    req = data.draw(requests(family))
    msg = k.encode_request(req, family)
    assert k.decode_request(msg, family) == req
    decoded, sign_bytes, _ = k.decode_request_for_signing(msg, family)
    assert decoded == req
    if isinstance(req, SignVoteRequest):
        assert sign_bytes == k.vote_sign_bytes(req.chain_id, req.vote)
    elif isinstance(req, SignProposalRequest):
        assert sign_bytes == k.proposal_sign_bytes(req.chain_id, req.proposal)
    else:
        assert sign_bytes is None


@examples(300)
@given(data=st.data())
def test_random_response_roundtrip(kernel_impl: str, data: st.DataObject) -> None:
    k = pb(kernel_impl)
    family = data.draw(FAMILY)
    resp = data.draw(responses(family))
    msg = k.encode_response(resp, family)
    assert k.decode_response(msg, family) == resp
    assert k.encode_response(k.decode_response(msg, family), family) == msg


@examples(200)
@given(vote=votes(V0_38), proposal=PROPOSALS, chain_id=TEXT)
def test_random_canonical_split(
    kernel_impl: str, vote: Vote, proposal: Proposal, chain_id: str
) -> None:
    k = pb(kernel_impl)
    for sign_bytes, ts, is_proposal in (
        (k.vote_sign_bytes(chain_id, vote), vote.timestamp, False),
        (k.proposal_sign_bytes(chain_id, proposal), proposal.timestamp, True),
    ):
        body, got = k.canonical_vote_without_timestamp(sign_bytes, is_proposal)
        assert got == ts
        assert len(body) < len(sign_bytes)
        if is_proposal or vote.type != 32:  # type 32 is what marks a proposal
            assert k.canonical_vote_without_timestamp(sign_bytes) == (body, got)


def _outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    """A result or DecodeError/FrameError; any other exception fails the test."""
    try:
        return ("ok", fn(*args))
    except (DecodeError, FrameError) as exc:
        return (type(exc).__name__,)


@examples(300)
@given(family=FAMILY, data=st.data())
def test_encoders_twins_agree(family: WireFamily, data: st.DataObject) -> None:
    compiled, pure = both()
    req = data.draw(requests(family))
    resp = data.draw(responses(family))
    assert compiled.encode_request(req, family) == pure.encode_request(req, family)
    assert compiled.encode_response(resp, family) == pure.encode_response(resp, family)
    vote = data.draw(votes(family))
    proposal = data.draw(PROPOSALS)
    chain_id = data.draw(TEXT)
    for name, arg in (
        ("vote_sign_bytes", vote),
        ("vote_extension_sign_bytes", vote),
        ("proposal_sign_bytes", proposal),
    ):
        assert getattr(compiled, name)(chain_id, arg) == getattr(pure, name)(chain_id, arg)
    n = data.draw(st.integers(0, 2**64 - 1))
    assert compiled.encode_uvarint(n) == pure.encode_uvarint(n)
    blob = data.draw(st.binary(max_size=300))
    assert compiled.encode_delimited(blob) == pure.encode_delimited(blob)


def _mutate(data: st.DataObject, msg: bytes) -> bytes:
    """A damaged copy: truncated, extended, or with bytes flipped/inserted/removed."""
    out = bytearray(msg)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["cut", "flip", "insert", "delete", "append"]))
        pos = data.draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "cut":
            del out[pos:]
        elif op == "flip" and out:
            out[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            out[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and out:
            del out[pos]
        else:
            out += data.draw(st.binary(min_size=1, max_size=12))
    return bytes(out)


@examples(500)
@given(family=FAMILY, data=st.data())
def test_decoders_twins_agree_on_damaged_input(family: WireFamily, data: st.DataObject) -> None:
    compiled, pure = both()
    source = data.draw(
        st.one_of(
            requests(family).map(lambda r: pure.encode_request(r, family)),
            responses(family).map(lambda r: pure.encode_response(r, family)),
            st.sampled_from([h(v["message_hex"]) for v in MESSAGES]),
        )
    )
    msg = _mutate(data, source) if data.draw(st.booleans()) else source
    for name in ("decode_request", "decode_response", "decode_request_for_signing"):
        assert _outcome(getattr(compiled, name), msg, family) == _outcome(
            getattr(pure, name), msg, family
        ), name


@examples(500)
@given(family=FAMILY, msg=st.binary(max_size=64))
def test_decoders_twins_agree_on_garbage(family: WireFamily, msg: bytes) -> None:
    compiled, pure = both()
    for name in ("decode_request", "decode_response", "decode_request_for_signing"):
        assert _outcome(getattr(compiled, name), msg, family) == _outcome(
            getattr(pure, name), msg, family
        ), name
    assert _outcome(compiled.canonical_vote_without_timestamp, msg) == _outcome(
        pure.canonical_vote_without_timestamp, msg
    )
    assert _outcome(compiled.decode_uvarint, msg) == _outcome(pure.decode_uvarint, msg)


@examples(300)
@given(data=st.data())
def test_canonical_split_twins_agree_on_damaged_sign_bytes(data: st.DataObject) -> None:
    compiled, pure = both()
    vote, proposal = data.draw(votes(V0_38)), data.draw(PROPOSALS)
    source = data.draw(
        st.sampled_from(
            [pure.vote_sign_bytes("c", vote), pure.proposal_sign_bytes("chain-x", proposal)]
            + [h(v["sign_bytes_hex"]) for v in CANONICAL]
        )
    )
    msg = _mutate(data, source)
    for kind in (None, False, True):
        assert _outcome(compiled.canonical_vote_without_timestamp, msg, kind) == _outcome(
            pure.canonical_vote_without_timestamp, msg, kind
        )


@examples(300)
@given(
    max_size=st.integers(0, 400),
    messages=st.lists(st.binary(max_size=300), max_size=5),
    tail=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
)
def test_delimited_reader_twins_agree(
    max_size: int, messages: list[bytes], tail: bytes, cuts: list[int]
) -> None:
    compiled, pure = both()
    stream = b"".join(pure.encode_delimited(m) for m in messages) + tail
    bounds = sorted({0, len(stream)} | {c for c in cuts if c < len(stream)})
    results: list[list[Any]] = []
    for reader in (compiled.DelimitedReader(max_size), pure.DelimitedReader(max_size)):
        result: list[Any] = []
        for a, b in itertools.pairwise(bounds):
            out = _outcome(reader.feed, stream[a:b])
            result.append(out)
            if out[0] != "ok":
                break
        result.append(reader.buffered())
        results.append(result)
    assert results[0] == results[1]
    if all(out[0] == "ok" for out in results[1][:-1]):
        delivered = [m for out in results[1][:-1] for m in out[1]]
        assert delivered[: len(messages)] == messages
