#!/usr/bin/env python3
"""atheris harness: the privval protobuf codec, compiled kernel against its pure twin.

Input: one selector byte, then the payload.  The selector picks the wire family
(``sel % 3``) and the target (``sel // 3 % 4``):

0. the payload is a ``Message``: decode_request, decode_response and
   decode_request_for_signing on both twins (same result or same NebulaError class); a
   decoded request must agree with the fused decoder and the sign-bytes functions and
   survive re-encoding;
1. the payload is canonical sign bytes: canonical_vote_without_timestamp with
   ``proposal`` = None / False / True (``sel // 12 % 3``);
2. the payload is a framed stream: ``payload[0]`` picks the chunk size, the rest goes
   through DelimitedReader (max_size 64 / 1024 / MAX_REQUEST_SIZE by ``sel // 12 % 3``)
   whole and in chunks, on both twins;
3. decode_uvarint of ``payload[1:]`` at offset ``payload[0] % 12``.

Only the pure twin is instrumented (coverage comes from it); the compiled kernel runs on
every input and must agree.  Run: ``python fuzz/atheris/fuzz_privval.py -max_total_time=300``.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris
from _common import agree, outcome, run

with atheris.instrument_imports(include=["nebula"]):
    from nebula._fast import pb_py as PURE

from nebula import _fast
from nebula.errors import DecodeError, FrameError
from nebula.proto import MAX_REQUEST_SIZE
from nebula.types import SignProposalRequest, SignVoteRequest, WireFamily
from tests.support.vectors import h, load

COMPILED = _fast.load_compiled("pb")
FAMILIES = (WireFamily.V0_34, WireFamily.V0_38, WireFamily.V1_0)
MAX_SIZES = (64, 1024, MAX_REQUEST_SIZE)


def check_messages(msg: bytes, family: WireFamily) -> None:
    results: dict[str, tuple[str, Any]] = {}
    for name in ("decode_request", "decode_response", "decode_request_for_signing"):
        results[name] = agree(
            outcome(getattr(COMPILED, name), msg, family),
            outcome(getattr(PURE, name), msg, family),
            name,
        )
        if results[name][0] == "error" and results[name][1] is not DecodeError:
            raise AssertionError(f"{name} raised {results[name][1].__name__}, not DecodeError")
    kind, req = results["decode_request"]
    if kind != "ok":
        return
    fused_req, sign_bytes, ext = results["decode_request_for_signing"][1]
    if fused_req != req:
        raise AssertionError("decode_request_for_signing decoded another request")
    for pb in (COMPILED, PURE):
        if isinstance(req, SignVoteRequest):
            if sign_bytes != pb.vote_sign_bytes(req.chain_id, req.vote):
                raise AssertionError("fused vote sign bytes differ from vote_sign_bytes")
            if ext is not None and ext != pb.vote_extension_sign_bytes(req.chain_id, req.vote):
                raise AssertionError("fused extension sign bytes differ")
            if pb.canonical_vote_without_timestamp(sign_bytes, False)[1] != req.vote.timestamp:
                raise AssertionError("canonical split lost the vote timestamp")
        elif isinstance(req, SignProposalRequest):
            if sign_bytes != pb.proposal_sign_bytes(req.chain_id, req.proposal):
                raise AssertionError("fused proposal sign bytes differ")
        elif sign_bytes is not None or ext is not None:
            raise AssertionError("sign bytes for a request that signs nothing")
        if pb.decode_request(pb.encode_request(req, family), family) != req:
            raise AssertionError("decoded request does not survive re-encoding")


def feed(reader: Any, stream: bytes, chunk: int) -> tuple[list[bytes], Any]:
    delivered: list[bytes] = []
    for i in range(0, len(stream), chunk):
        kind, result = outcome(reader.feed, stream[i : i + chunk])
        if kind == "error":
            if result is not FrameError:
                raise AssertionError(f"DelimitedReader raised {result.__name__}")
            if outcome(reader.feed, b"")[1] is not FrameError:
                raise AssertionError("a failed DelimitedReader accepted more data")
            return delivered, result
        delivered += result
        if reader.buffered() > reader.max_size + 10:
            raise AssertionError("DelimitedReader buffers more than max_size")
    return delivered, None


def check_stream(payload: bytes, max_size: int) -> None:
    chunk = 1 + (payload[0] if payload else 0)
    stream = payload[1:]
    whole = agree(
        feed(COMPILED.DelimitedReader(max_size), stream, max(len(stream), 1)),
        feed(PURE.DelimitedReader(max_size), stream, max(len(stream), 1)),
        "DelimitedReader (whole)",
    )
    pieces = agree(
        feed(COMPILED.DelimitedReader(max_size), stream, chunk),
        feed(PURE.DelimitedReader(max_size), stream, chunk),
        "DelimitedReader (chunked)",
    )
    if (whole[1] is None) != (pieces[1] is None):
        raise AssertionError("chunking changed whether the stream fails")
    if whole[1] is None and whole[0] != pieces[0]:
        raise AssertionError("chunking changed the messages")
    if pieces[0] != whole[0][: len(pieces[0])] and whole[1] is None:
        raise AssertionError("chunked reader delivered other messages")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    sel, payload = data[0], data[1:]
    family = FAMILIES[sel % 3]
    target = sel // 3 % 4
    variant = sel // 12 % 3
    if target == 0:
        check_messages(payload, family)
    elif target == 1:
        proposal = (None, False, True)[variant]
        agree(
            outcome(COMPILED.canonical_vote_without_timestamp, payload, proposal),
            outcome(PURE.canonical_vote_without_timestamp, payload, proposal),
            "canonical_vote_without_timestamp",
        )
    elif target == 2:
        check_stream(payload, MAX_SIZES[variant])
    else:
        pos = payload[0] % 12 if payload else 0
        agree(
            outcome(COMPILED.decode_uvarint, payload[1:], pos),
            outcome(PURE.decode_uvarint, payload[1:], pos),
            "decode_uvarint",
        )


def seeds() -> list[bytes]:
    messages = [h(v["message_hex"]) for v in load("privval_messages")["vectors"]]
    wire = b"".join(h(v["wire_hex"]) for v in load("privval_messages")["vectors"])
    sign_bytes = [h(v["sign_bytes_hex"]) for v in load("sign_bytes")["vectors"]]
    out = [bytes([fam]) + m for m in messages for fam in range(3)]
    out += [bytes([3 + 12 * variant]) + s for s in sign_bytes for variant in range(3)]
    out += [bytes([6 + 12 * variant, n]) + wire for variant in range(3) for n in (0, 6, 255)]
    out += [bytes([9, 0]) + s[:12] for s in sign_bytes]
    return out


if __name__ == "__main__":
    run("privval", test_one_input, seeds())
    sys.exit(0)
