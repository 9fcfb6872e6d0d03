"""privval codec hot paths, compiled kernel vs pure twin (pytest-benchmark).

Run timed with ``python -m pytest benches/bench_proto.py --benchmark-enable -q``; the
normal suite runs each once as a smoke test.  Target: compiled >= 5x faster than pure.
"""

from __future__ import annotations

from types import ModuleType

import pytest

from nebula import _fast
from nebula.types import (
    BlockID,
    PartSetHeader,
    SignedVoteResponse,
    SignVoteRequest,
    Timestamp,
    Vote,
    WireFamily,
)

CHAIN_ID = "cosmoshub-4"
FAMILY = WireFamily.V0_38

# A realistic non-nil precommit as a v0.38 node sends it (empty extension).
VOTE = Vote(
    type=2,
    height=23_456_789,
    round=0,
    block_id=BlockID(bytes(range(32)), PartSetHeader(1, bytes(range(32, 64)))),
    timestamp=Timestamp(1_763_700_000, 123_456_789),
    validator_address=bytes(range(20)),
    validator_index=42,
)
SIGNATURE = b"\x5a" * 64
EXT_SIGNATURE = b"\xa5" * 64


@pytest.fixture(params=["compiled", "pure"])
def pb(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "pure":
        return _fast.load_pure("pb")
    try:
        return _fast.load_compiled("pb")
    except ImportError:
        if _fast.REQUIRE_COMPILED:
            raise
        pytest.skip("compiled kernels not built")


def test_bench_vote_sign_bytes(benchmark, pb: ModuleType) -> None:
    sign_bytes = benchmark(pb.vote_sign_bytes, CHAIN_ID, VOTE)
    assert sign_bytes == _fast.load_pure("pb").vote_sign_bytes(CHAIN_ID, VOTE)


def test_bench_sign_vote_request_to_response(benchmark, pb: ModuleType) -> None:
    """Decode a SignVoteRequest, attach the signatures, encode the SignedVoteResponse."""
    msg = pb.encode_request(SignVoteRequest(VOTE, CHAIN_ID), FAMILY)

    def roundtrip() -> bytes:
        vote = pb.decode_request(msg, FAMILY).vote
        vote.signature = SIGNATURE
        vote.extension_signature = EXT_SIGNATURE
        return pb.encode_response(SignedVoteResponse(vote), FAMILY)

    out = benchmark(roundtrip)
    assert pb.decode_response(out, FAMILY).vote.signature == SIGNATURE


def test_bench_fused_request_to_response(benchmark, pb: ModuleType) -> None:
    """The service's hot path: request + both sign bytes in one call, then the response."""
    msg = pb.encode_request(SignVoteRequest(VOTE, CHAIN_ID), FAMILY)

    def roundtrip() -> bytes:
        req, sign_bytes, ext_sign_bytes = pb.decode_request_for_signing(msg, FAMILY)
        if sign_bytes is None or ext_sign_bytes is None:  # a non-nil precommit has both
            raise AssertionError("sign bytes missing")
        vote = req.vote
        vote.signature = SIGNATURE
        vote.extension_signature = EXT_SIGNATURE
        return pb.encode_response(SignedVoteResponse(vote), FAMILY)

    out = benchmark(roundtrip)
    assert pb.decode_response(out, FAMILY).vote.extension_signature == EXT_SIGNATURE


def test_bench_delimited_reader(benchmark, pb: ModuleType) -> None:
    """Split one framed SignVoteRequest out of a stream."""
    wire = pb.encode_delimited(pb.encode_request(SignVoteRequest(VOTE, CHAIN_ID), FAMILY))
    reader = pb.DelimitedReader(1 << 20)
    messages = benchmark(reader.feed, wire)
    assert len(messages) == 1
