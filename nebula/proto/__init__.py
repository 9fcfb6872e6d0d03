"""privval wire protocol: messages per wire family, framing, canonical sign bytes.

Sans-I/O: bytes in, dataclasses (nebula.types) out, and back.  The work is done by the
protobuf kernel, compiled ``nebula._fast._pb`` or its pure twin ``nebula._fast.pb_py``
(``NEBULA_PURE=1`` forces the twin); the names below *are* the kernel's functions, so
calling them costs nothing extra.  The rules (proto3 defaults, unknown fields, Go's
emission of non-nullable sub-messages, family differences) are documented in
``nebula/_fast/pb_py.py``; the byte layouts in protocol.md §2-§4 and §8.

API (``family`` is a :class:`~nebula.types.WireFamily`):

* ``decode_request(msg, family) -> Request`` - one ``Message`` without its length
  prefix; an empty/unknown oneof, or a response, raises DecodeError.
* ``encode_response(resp, family) -> bytes`` - without length prefix, byte-identical to
  the Go signer (non-nullable sub-messages always written).
* ``encode_request`` / ``decode_response`` - the validator side (test client, bench).
* ``decode_request_for_signing(msg, family) -> (request, sign_bytes, ext_sign_bytes)`` -
  the hot path in one call.  ``sign_bytes``: vote/proposal sign bytes with the request's
  chain_id (None for other requests).  ``ext_sign_bytes``: set exactly when an extension
  signature is required (protocol.md §8: a non-nil precommit in V0_38, or in V1_0 unless
  ``skip_extension_signing``), else None.
* ``vote_sign_bytes(chain_id, vote)``, ``proposal_sign_bytes(chain_id, proposal)``,
  ``vote_extension_sign_bytes(chain_id, vote)`` - uvarint-prefixed canonical messages.
* ``canonical_vote_without_timestamp(sign_bytes, proposal=None) -> (body, Timestamp)``
  for stored vote or proposal sign bytes: ``body`` is the canonical message without its
  timestamp field, so equal bodies <=> the two differ at most in the timestamp (FilePV,
  protocol.md §5.1).  ``proposal`` says which layout it is; None infers it from the type
  field (32 = proposal), which is right for everything a node sends.
* ``DelimitedReader(max_size).feed(data) -> list[bytes]``, ``encode_delimited(msg)``,
  ``encode_uvarint(n)``, ``decode_uvarint(data, pos=0) -> (value, next_pos)``.
* ``error_response(req, error)`` - the refusal Go's signer sends for ``req``.

Errors: malformed messages raise :class:`~nebula.errors.DecodeError`, broken framing
:class:`~nebula.errors.FrameError` (both ``ProtocolError``: drop the connection).
Encoding our own values raises ``TypeError`` / ``OverflowError`` / ``ValueError`` on
programming errors (wrong types, out-of-range integers, a message or key type the
family cannot carry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nebula import _fast

# A cold path (a sign state checked before an import): the pure codec serves both builds.
from nebula._fast.pb_py import canonical_chain_id
from nebula.types import (
    PingRequest,
    Proposal,
    PubKeyRequest,
    PubKeyResponse,
    RemoteSignerError,
    Request,
    Response,
    SignBytesRequest,
    SignBytesResponse,
    SignedProposalResponse,
    SignedVoteResponse,
    SignProposalRequest,
    SignVoteRequest,
    Vote,
)

__all__ = [
    "KERNEL_COMPILED",
    "MAX_REQUEST_SIZE",
    "MAX_RESPONSE_SIZE",
    "MAX_VOTE_EXTENSION_SIZE",
    "DelimitedReader",
    "canonical_chain_id",
    "canonical_vote_without_timestamp",
    "decode_request",
    "decode_request_for_signing",
    "decode_response",
    "decode_uvarint",
    "encode_delimited",
    "encode_request",
    "encode_response",
    "encode_uvarint",
    "error_response",
    "proposal_sign_bytes",
    "vote_extension_sign_bytes",
    "vote_sign_bytes",
]

MAX_VOTE_EXTENSION_SIZE = 1 << 20
"""CometBFT's MaxVoteExtensionSize (v0.38+)."""

MAX_REQUEST_SIZE = MAX_VOTE_EXTENSION_SIZE + 4096
"""Largest request we accept from a node: a SignVoteRequest carrying a 1 MiB vote
extension plus headroom for the rest of it (protocol.md §1.3)."""

MAX_RESPONSE_SIZE = 10240
"""Largest message a node reads from its signer in every family except v0.40 (~1 MiB):
a SignedVoteResponse echoing a large extension must leave the extension out."""

if TYPE_CHECKING:
    from nebula._fast.pb_py import (
        DelimitedReader,
        canonical_vote_without_timestamp,
        decode_request,
        decode_request_for_signing,
        decode_response,
        decode_uvarint,
        encode_delimited,
        encode_request,
        encode_response,
        encode_uvarint,
        proposal_sign_bytes,
        vote_extension_sign_bytes,
        vote_sign_bytes,
    )
else:
    _pb = _fast.load("pb")
    DelimitedReader = _pb.DelimitedReader
    canonical_vote_without_timestamp = _pb.canonical_vote_without_timestamp
    decode_request = _pb.decode_request
    decode_request_for_signing = _pb.decode_request_for_signing
    decode_response = _pb.decode_response
    decode_uvarint = _pb.decode_uvarint
    encode_delimited = _pb.encode_delimited
    encode_request = _pb.encode_request
    encode_response = _pb.encode_response
    encode_uvarint = _pb.encode_uvarint
    proposal_sign_bytes = _pb.proposal_sign_bytes
    vote_extension_sign_bytes = _pb.vote_extension_sign_bytes
    vote_sign_bytes = _pb.vote_sign_bytes

KERNEL_COMPILED: bool = _fast.COMPILED.get("pb", False)
"""Whether the compiled kernel is in use."""


def error_response(req: Request, error: RemoteSignerError) -> Response:
    """The response Go's signer sends when it refuses ``req`` (protocol.md §2.5).

    Matching type, empty payload, ``error``; the empty vote/proposal are Go zero values
    (proposal type 0, zero time), so ``encode_response`` gives the Go signer's bytes.
    A PingRequest cannot be refused (ValueError).
    """
    if isinstance(req, SignVoteRequest):
        return SignedVoteResponse(Vote(), error)
    if isinstance(req, SignProposalRequest):
        return SignedProposalResponse(Proposal(type=0), error)
    if isinstance(req, PubKeyRequest):
        return PubKeyResponse(error=error)
    if isinstance(req, SignBytesRequest):
        return SignBytesResponse(error=error)
    if isinstance(req, PingRequest):
        raise ValueError("a PingResponse has no error field")
    raise TypeError(f"not a privval request: {type(req).__name__}")
