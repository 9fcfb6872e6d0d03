"""privval protobuf codec and canonical sign bytes (pure-Python twin of ``_pb.pyx``).

This module is the executable specification of the wire format in protocol.md §2-§4 and §8;
the compiled kernel ``nebula._fast._pb`` must produce identical results for every input
(tests/unit/test_proto.py checks both against the vectors and against each other).

Decoding rules (both twins):

* proto3: absent scalars are zero/empty; unknown fields are skipped by wire type (groups
  included); a known field with the wrong wire type, a truncated field, a varint longer
  than 10 bytes or overflowing 64 bits, field number 0, invalid UTF-8 in a string, or a
  Timestamp outside Go's range (0001-01-01 .. 9999-12-31, nanos 0..999999999) raise
  :class:`~nebula.errors.DecodeError`.  Nothing else escapes.
* Integers are read like Go: int32/enum fields keep the low 32 bits (two's complement),
  int64 fields the 64 bits, uint32 the low 32 bits unsigned.
* Repeated scalars: the last one wins.  Repeated sub-messages merge (gogo ``Unmarshal``
  into the existing value), except a Timestamp, which is replaced (gogo ``StdTimeUnmarshal``).
* The ``Message`` oneof: the last occurrence wins; earlier occurrences are only
  length-checked.  An absent Timestamp decodes as Go's zero time (``types.Timestamp()``).
* Family-specific fields that do not exist in a family are unknown there and skipped
  (e.g. Vote.extension in V0_34, SignVoteRequest.skip_extension_signing outside V1_0).

Encoding rules: proto3 omission of zero scalars; the non-nullable sub-messages Go always
writes (Vote.block_id, Vote.timestamp, BlockID.part_set_header, Proposal.block_id,
Proposal.timestamp, SignedVoteResponse.vote, SignedProposalResponse.proposal,
PubKeyResponse.pub_key before v1.0) are always written; fields that do not exist in the
requested family are not written.  Integers outside their protobuf type raise
``OverflowError``, non-``bytes`` byte fields ``TypeError``, values a family cannot carry
(a BLS key in V0_34, SignBytes outside V1_0, an unknown key type) ``ValueError``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from nebula.errors import DecodeError, FrameError
from nebula.types import (
    BlockID,
    PartSetHeader,
    PingRequest,
    PingResponse,
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
    Timestamp,
    Vote,
    WireFamily,
    extension_signature_required,
)

__all__ = [
    "DelimitedReader",
    "canonical_vote_without_timestamp",
    "decode_request",
    "decode_request_for_signing",
    "decode_response",
    "decode_uvarint",
    "encode_delimited",
    "encode_request",
    "encode_response",
    "encode_uvarint",
    "proposal_sign_bytes",
    "vote_extension_sign_bytes",
    "vote_sign_bytes",
]

V0_34 = WireFamily.V0_34
V0_38 = WireFamily.V0_38
V1_0 = WireFamily.V1_0

# ---- wire types and limits ----------------------------------------------------------------

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

MASK32 = (1 << 32) - 1
MASK64 = (1 << 64) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_FIELD_NUMBER = (1 << 29) - 1

# Go's valid time.Time range for a google.protobuf.Timestamp (gogo validateTimestamp).
TS_MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z
TS_MAX_SECONDS = 253402300800  # 10000-01-01T00:00:00Z, exclusive

# ---- Message oneof (protocol.md §2.2) ------------------------------------------------------

PUB_KEY_REQUEST = 1
PUB_KEY_RESPONSE = 2
SIGN_VOTE_REQUEST = 3
SIGNED_VOTE_RESPONSE = 4
SIGN_PROPOSAL_REQUEST = 5
SIGNED_PROPOSAL_RESPONSE = 6
PING_REQUEST = 7
PING_RESPONSE = 8
SIGN_BYTES_REQUEST = 9  # v1.0 only
SIGN_BYTES_RESPONSE = 10  # v1.0 only

_REQUEST_TAGS = frozenset({1, 3, 5, 7, 9})
_MESSAGE_NAMES = {
    1: "PubKeyRequest",
    2: "PubKeyResponse",
    3: "SignVoteRequest",
    4: "SignedVoteResponse",
    5: "SignProposalRequest",
    6: "SignedProposalResponse",
    7: "PingRequest",
    8: "PingResponse",
    9: "SignBytesRequest",
    10: "SignBytesResponse",
}

PROPOSAL_TYPE = 32

# PublicKey oneof variants per family (protocol.md §2.4) and v1.0 pub_key_type strings.
_PUBKEY_FIELDS = {
    V0_34: {"ed25519": 1, "secp256k1": 2},
    V0_38: {"ed25519": 1, "secp256k1": 2, "bls12381": 3},
}
_PUBKEY_NAMES = {fam: {v: k for k, v in table.items()} for fam, table in _PUBKEY_FIELDS.items()}
_V1_KEY_TYPES = {"ed25519": "ed25519", "secp256k1": "secp256k1", "bls12381": "bls12_381"}
_V1_KEY_NAMES = {v: k for k, v in _V1_KEY_TYPES.items()}


def _check_family(family: WireFamily) -> WireFamily:
    if family is not V0_34 and family is not V0_38 and family is not V1_0:
        raise TypeError(f"family must be a WireFamily, not {family!r}")
    return family


# ==== writing ===============================================================================


def _put_uvarint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_key(out: bytearray, field: int, wire_type: int) -> None:
    _put_uvarint(out, field << 3 | wire_type)


def _int32(value: int, what: str) -> int:
    if not INT32_MIN <= value <= INT32_MAX:
        raise OverflowError(f"{what} = {value} does not fit int32")
    return value


def _int64(value: int, what: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise OverflowError(f"{what} = {value} does not fit int64")
    return value


def _uint32(value: int, what: str) -> int:
    if not 0 <= value <= MASK32:
        raise OverflowError(f"{what} = {value} does not fit uint32")
    return value


def _put_varint(out: bytearray, field: int, value: int) -> None:
    """int32/int64/uint32/enum/bool field; omitted when zero; negatives take 10 bytes."""
    if value:
        _put_key(out, field, VARINT)
        _put_uvarint(out, value & MASK64)


def _put_sfixed64(out: bytearray, field: int, value: int) -> None:
    if value:
        _put_key(out, field, I64)
        out += struct.pack("<q", value)


def _put_message(out: bytearray, field: int, body: bytes | bytearray) -> None:
    """A length-delimited field that is always written (sub-message or oneof member)."""
    _put_key(out, field, LEN)
    _put_uvarint(out, len(body))
    out += body


def _check_bytes(value: bytes, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return value


def _put_bytes(out: bytearray, field: int, value: bytes, what: str) -> None:
    if _check_bytes(value, what):
        _put_message(out, field, value)


def _put_string(out: bytearray, field: int, value: str, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if value:
        _put_message(out, field, value.encode())


def encode_uvarint(n: int) -> bytes:
    """Unsigned LEB128 (protobuf varint) encoding of ``0 <= n < 2**64``."""
    if not 0 <= n <= MASK64:
        raise OverflowError(f"{n} does not fit an unsigned 64-bit varint")
    out = bytearray()
    _put_uvarint(out, n)
    return bytes(out)


def encode_delimited(msg: bytes) -> bytes:
    """``uvarint(len(msg)) || msg`` (protobuf delimited form, protocol.md §2.1)."""
    data = _as_bytes(msg)
    return encode_uvarint(len(data)) + data


# ---- types (protocol.md §3) -----------------------------------------------------------------


def _timestamp_body(ts: Timestamp) -> bytearray:
    out = bytearray()
    _put_varint(out, 1, _int64(ts.seconds, "Timestamp.seconds"))
    _put_varint(out, 2, _int32(ts.nanos, "Timestamp.nanos"))
    return out


def _block_id_body(block_id: BlockID) -> bytearray:
    """BlockID, also CanonicalBlockID: part_set_header is always written."""
    psh = block_id.part_set_header
    psh_body = bytearray()
    _put_varint(psh_body, 1, _uint32(psh.total, "PartSetHeader.total"))
    _put_bytes(psh_body, 2, psh.hash, "PartSetHeader.hash")
    out = bytearray()
    _put_bytes(out, 1, block_id.hash, "BlockID.hash")
    _put_message(out, 2, psh_body)
    return out


def _block_id_is_zero(block_id: BlockID) -> bool:
    """protocol.md §4.3: empty hash, total 0 and empty part-set hash."""
    psh = block_id.part_set_header
    return not block_id.hash and psh.total == 0 and not psh.hash


def _vote_body(vote: Vote, family: WireFamily) -> bytearray:
    out = bytearray()
    _put_varint(out, 1, _int32(vote.type, "Vote.type"))
    _put_varint(out, 2, _int64(vote.height, "Vote.height"))
    _put_varint(out, 3, _int32(vote.round, "Vote.round"))
    _put_message(out, 4, _block_id_body(vote.block_id))
    _put_message(out, 5, _timestamp_body(vote.timestamp))
    _put_bytes(out, 6, vote.validator_address, "Vote.validator_address")
    _put_varint(out, 7, _int32(vote.validator_index, "Vote.validator_index"))
    _put_bytes(out, 8, vote.signature, "Vote.signature")
    if family is not V0_34:  # vote extensions exist from v0.38 on
        _put_bytes(out, 9, vote.extension, "Vote.extension")
        _put_bytes(out, 10, vote.extension_signature, "Vote.extension_signature")
    return out


def _proposal_body(proposal: Proposal) -> bytearray:
    out = bytearray()
    _put_varint(out, 1, _int32(proposal.type, "Proposal.type"))
    _put_varint(out, 2, _int64(proposal.height, "Proposal.height"))
    _put_varint(out, 3, _int32(proposal.round, "Proposal.round"))
    _put_varint(out, 4, _int32(proposal.pol_round, "Proposal.pol_round"))
    _put_message(out, 5, _block_id_body(proposal.block_id))
    _put_message(out, 6, _timestamp_body(proposal.timestamp))
    _put_bytes(out, 7, proposal.signature, "Proposal.signature")
    return out


def _error_body(error: RemoteSignerError) -> bytearray:
    out = bytearray()
    _put_varint(out, 1, _int32(error.code, "RemoteSignerError.code"))
    _put_string(out, 2, error.description, "RemoteSignerError.description")
    return out


def _put_error(out: bytearray, field: int, error: RemoteSignerError | None) -> None:
    if error is not None:
        _put_message(out, field, _error_body(error))


def _pub_key_response_body(resp: PubKeyResponse, family: WireFamily) -> bytearray:
    key = _check_bytes(resp.pub_key, "PubKeyResponse.pub_key")
    if not resp.key_type and key:
        raise ValueError("PubKeyResponse has key bytes but no key_type")
    out = bytearray()
    if family is V1_0:
        # v1.0: 2 error, 3 pub_key_bytes, 4 pub_key_type (field 1 reserved)
        type_name = ""
        if resp.key_type:
            type_name = _V1_KEY_TYPES.get(resp.key_type, "")
            if not type_name:
                raise ValueError(f"key type {resp.key_type!r} has no v1.0 pub_key_type")
        _put_error(out, 2, resp.error)
        _put_bytes(out, 3, key, "PubKeyResponse.pub_key")
        _put_string(out, 4, type_name, "pub_key_type")
        return out
    # v0.34 - v0.40: 1 PublicKey (non-nullable oneof wrapper), 2 error
    public_key = bytearray()
    if resp.key_type:
        variant = _PUBKEY_FIELDS[family].get(resp.key_type)
        if variant is None:
            raise ValueError(f"key type {resp.key_type!r} cannot be sent in family {family.name}")
        _put_message(public_key, variant, key)  # oneof members are written even when empty
    _put_message(out, 1, public_key)
    _put_error(out, 2, resp.error)
    return out


# ---- Message -----------------------------------------------------------------------------


def _message(tag: int, body: bytes | bytearray) -> bytes:
    out = bytearray()
    _put_message(out, tag, body)
    return bytes(out)


def encode_request(req: Request, family: WireFamily) -> bytes:
    """One privval ``Message`` carrying a request (no length prefix)."""
    _check_family(family)
    body = bytearray()
    if isinstance(req, SignVoteRequest):
        _put_message(body, 1, _vote_body(req.vote, family))
        _put_string(body, 2, req.chain_id, "chain_id")
        if family is V1_0:
            _put_varint(body, 3, 1 if req.skip_extension_signing else 0)
        return _message(SIGN_VOTE_REQUEST, body)
    if isinstance(req, SignProposalRequest):
        _put_message(body, 1, _proposal_body(req.proposal))
        _put_string(body, 2, req.chain_id, "chain_id")
        return _message(SIGN_PROPOSAL_REQUEST, body)
    if isinstance(req, PubKeyRequest):
        _put_string(body, 1, req.chain_id, "chain_id")
        return _message(PUB_KEY_REQUEST, body)
    if isinstance(req, PingRequest):
        return _message(PING_REQUEST, body)
    if isinstance(req, SignBytesRequest):
        if family is not V1_0:
            raise ValueError(f"SignBytesRequest does not exist in family {family.name}")
        _put_bytes(body, 1, req.value, "SignBytesRequest.value")
        return _message(SIGN_BYTES_REQUEST, body)
    raise TypeError(f"not a privval request: {type(req).__name__}")


def encode_response(resp: Response, family: WireFamily) -> bytes:
    """One privval ``Message`` carrying a response (no length prefix), as Go writes it."""
    _check_family(family)
    body = bytearray()
    if isinstance(resp, SignedVoteResponse):
        _put_message(body, 1, _vote_body(resp.vote, family))
        _put_error(body, 2, resp.error)
        return _message(SIGNED_VOTE_RESPONSE, body)
    if isinstance(resp, SignedProposalResponse):
        _put_message(body, 1, _proposal_body(resp.proposal))
        _put_error(body, 2, resp.error)
        return _message(SIGNED_PROPOSAL_RESPONSE, body)
    if isinstance(resp, PubKeyResponse):
        return _message(PUB_KEY_RESPONSE, _pub_key_response_body(resp, family))
    if isinstance(resp, PingResponse):
        return _message(PING_RESPONSE, body)
    if isinstance(resp, SignBytesResponse):
        if family is not V1_0:
            raise ValueError(f"SignBytesResponse does not exist in family {family.name}")
        _put_bytes(body, 1, resp.signature, "SignBytesResponse.signature")
        _put_error(body, 2, resp.error)
        return _message(SIGN_BYTES_RESPONSE, body)
    raise TypeError(f"not a privval response: {type(resp).__name__}")


# ---- canonical sign bytes (protocol.md §4) --------------------------------------------------


def vote_sign_bytes(chain_id: str, vote: Vote) -> bytes:
    """Length-prefixed CanonicalVote: what a vote signature covers."""
    out = bytearray()
    _put_varint(out, 1, _int32(vote.type, "Vote.type"))
    _put_sfixed64(out, 2, _int64(vote.height, "Vote.height"))
    _put_sfixed64(out, 3, _int32(vote.round, "Vote.round"))
    if not _block_id_is_zero(vote.block_id):
        _put_message(out, 4, _block_id_body(vote.block_id))
    _put_message(out, 5, _timestamp_body(vote.timestamp))
    _put_string(out, 6, chain_id, "chain_id")
    return encode_delimited(out)


def proposal_sign_bytes(chain_id: str, proposal: Proposal) -> bytes:
    """Length-prefixed CanonicalProposal (type is always 32, pol_round an int64 varint)."""
    out = bytearray()
    _put_varint(out, 1, PROPOSAL_TYPE)  # whatever proposal.type says
    _put_sfixed64(out, 2, _int64(proposal.height, "Proposal.height"))
    _put_sfixed64(out, 3, _int32(proposal.round, "Proposal.round"))
    _put_varint(out, 4, _int32(proposal.pol_round, "Proposal.pol_round"))
    if not _block_id_is_zero(proposal.block_id):
        _put_message(out, 5, _block_id_body(proposal.block_id))
    _put_message(out, 6, _timestamp_body(proposal.timestamp))
    _put_string(out, 7, chain_id, "chain_id")
    return encode_delimited(out)


def vote_extension_sign_bytes(chain_id: str, vote: Vote) -> bytes:
    """Length-prefixed CanonicalVoteExtension (protocol.md §8)."""
    out = bytearray()
    _put_bytes(out, 1, vote.extension, "Vote.extension")
    _put_sfixed64(out, 2, _int64(vote.height, "Vote.height"))
    _put_sfixed64(out, 3, _int32(vote.round, "Vote.round"))
    _put_string(out, 4, chain_id, "chain_id")
    return encode_delimited(out)


# ==== reading ===============================================================================


class _Reader:
    """A cursor over one encoded message; every problem is a DecodeError naming ``what``."""

    __slots__ = ("data", "end", "pos", "what")

    def __init__(self, data: bytes, what: str, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end
        self.what = what

    def error(self, problem: str) -> DecodeError:
        return DecodeError(f"malformed {self.what}: {problem}")

    def more(self) -> bool:
        return self.pos < self.end

    def uvarint(self) -> int:
        result = 0
        shift = 0
        data, pos, end = self.data, self.pos, self.end
        while True:
            if pos >= end:
                raise self.error(f"truncated varint at offset {self.pos}")
            b = data[pos]
            pos += 1
            if shift == 63 and b > 1:
                raise self.error(f"varint at offset {self.pos} overflows 64 bits")
            result |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return result
            shift += 7

    def key(self) -> tuple[int, int]:
        key = self.uvarint()
        field, wire_type = key >> 3, key & 7
        if field == 0 or field > MAX_FIELD_NUMBER:
            raise self.error(f"invalid field number {field}")
        return field, wire_type

    def int32(self) -> int:
        v = self.uvarint() & MASK32
        return v - (1 << 32) if v >> 31 else v

    def int64(self) -> int:
        v = self.uvarint()
        return v - (1 << 64) if v >> 63 else v

    def uint32(self) -> int:
        return self.uvarint() & MASK32

    def advance(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.end - start:
            raise self.error(
                f"truncated {what} at offset {start}: needs {n} bytes, has {self.end - start}"
            )
        self.pos = start + n
        return start

    def chunk(self) -> bytes:
        """The payload of a length-delimited field."""
        n = self.uvarint()
        start = self.advance(n, "length-delimited field")
        return self.data[start : start + n]

    def string(self, what: str) -> str:
        raw = self.chunk()
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def skip(self, wire_type: int) -> None:
        """Skip an unknown field's value (protobuf skipping rules, groups included)."""
        depth = 0
        while True:
            if wire_type == VARINT:
                self.uvarint()
            elif wire_type == I64:
                self.advance(8, "fixed64")
            elif wire_type == LEN:
                self.advance(self.uvarint(), "length-delimited field")
            elif wire_type == I32:
                self.advance(4, "fixed32")
            elif wire_type == SGROUP:
                depth += 1
            elif wire_type == EGROUP:
                if depth == 0:
                    raise self.error("end-group without start-group")
                depth -= 1
            else:
                raise self.error(f"invalid wire type {wire_type}")
            if depth == 0:
                return
            _, wire_type = self.key()

    def check(self, field: int, wire_type: int, expected: int) -> None:
        if wire_type != expected:
            raise self.error(f"field {field} has wire type {wire_type}, expected {expected}")


def _as_bytes(msg: bytes) -> bytes:
    if isinstance(msg, bytes):
        return msg
    return bytes(memoryview(msg))


def _decode_timestamp(data: bytes) -> Timestamp:
    r = _Reader(data, "Timestamp")
    seconds = nanos = 0  # a present Timestamp starts at the Unix epoch
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, VARINT)
            seconds = r.int64()
        elif field == 2:
            r.check(field, wt, VARINT)
            nanos = r.int32()
        else:
            r.skip(wt)
    if not TS_MIN_SECONDS <= seconds < TS_MAX_SECONDS:
        raise r.error(f"seconds {seconds} outside 0001-01-01..9999-12-31")
    if not 0 <= nanos <= 999_999_999:
        raise r.error(f"nanos {nanos} outside 0..999999999")
    return Timestamp(seconds, nanos)


def _merge_part_set_header(psh: PartSetHeader, data: bytes) -> None:
    r = _Reader(data, "PartSetHeader")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, VARINT)
            psh.total = r.uint32()
        elif field == 2:
            r.check(field, wt, LEN)
            psh.hash = r.chunk()
        else:
            r.skip(wt)


def _merge_block_id(block_id: BlockID, data: bytes) -> None:
    r = _Reader(data, "BlockID")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            block_id.hash = r.chunk()
        elif field == 2:
            r.check(field, wt, LEN)
            _merge_part_set_header(block_id.part_set_header, r.chunk())
        else:
            r.skip(wt)


def _merge_vote(vote: Vote, data: bytes, family: WireFamily) -> None:
    r = _Reader(data, "Vote")
    last_field = 8 if family is V0_34 else 10
    while r.more():
        field, wt = r.key()
        if field > last_field:
            r.skip(wt)
        elif field == 1:
            r.check(field, wt, VARINT)
            vote.type = r.int32()
        elif field == 2:
            r.check(field, wt, VARINT)
            vote.height = r.int64()
        elif field == 3:
            r.check(field, wt, VARINT)
            vote.round = r.int32()
        elif field == 4:
            r.check(field, wt, LEN)
            _merge_block_id(vote.block_id, r.chunk())
        elif field == 5:
            r.check(field, wt, LEN)
            vote.timestamp = _decode_timestamp(r.chunk())
        elif field == 6:
            r.check(field, wt, LEN)
            vote.validator_address = r.chunk()
        elif field == 7:
            r.check(field, wt, VARINT)
            vote.validator_index = r.int32()
        elif field == 8:
            r.check(field, wt, LEN)
            vote.signature = r.chunk()
        elif field == 9:
            r.check(field, wt, LEN)
            vote.extension = r.chunk()
        else:  # 10
            r.check(field, wt, LEN)
            vote.extension_signature = r.chunk()


def _merge_proposal(proposal: Proposal, data: bytes) -> None:
    r = _Reader(data, "Proposal")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, VARINT)
            proposal.type = r.int32()
        elif field == 2:
            r.check(field, wt, VARINT)
            proposal.height = r.int64()
        elif field == 3:
            r.check(field, wt, VARINT)
            proposal.round = r.int32()
        elif field == 4:
            r.check(field, wt, VARINT)
            proposal.pol_round = r.int32()
        elif field == 5:
            r.check(field, wt, LEN)
            _merge_block_id(proposal.block_id, r.chunk())
        elif field == 6:
            r.check(field, wt, LEN)
            proposal.timestamp = _decode_timestamp(r.chunk())
        elif field == 7:
            r.check(field, wt, LEN)
            proposal.signature = r.chunk()
        else:
            r.skip(wt)


def _merge_error(error: RemoteSignerError, data: bytes) -> None:
    r = _Reader(data, "RemoteSignerError")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, VARINT)
            error.code = r.int32()
        elif field == 2:
            r.check(field, wt, LEN)
            error.description = r.string("description")
        else:
            r.skip(wt)


# ---- requests -----------------------------------------------------------------------------


def _decode_pub_key_request(data: bytes, family: WireFamily) -> PubKeyRequest:
    req = PubKeyRequest()
    r = _Reader(data, "PubKeyRequest")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            req.chain_id = r.string("chain_id")
        else:
            r.skip(wt)
    return req


def _decode_sign_vote_request(data: bytes, family: WireFamily) -> SignVoteRequest:
    req = SignVoteRequest()
    r = _Reader(data, "SignVoteRequest")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            _merge_vote(req.vote, r.chunk(), family)
        elif field == 2:
            r.check(field, wt, LEN)
            req.chain_id = r.string("chain_id")
        elif field == 3 and family is V1_0:
            r.check(field, wt, VARINT)
            req.skip_extension_signing = r.uvarint() != 0
        else:
            r.skip(wt)
    return req


def _decode_sign_proposal_request(data: bytes, family: WireFamily) -> SignProposalRequest:
    req = SignProposalRequest(Proposal(type=0))  # proto3: an absent type is 0
    r = _Reader(data, "SignProposalRequest")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            _merge_proposal(req.proposal, r.chunk())
        elif field == 2:
            r.check(field, wt, LEN)
            req.chain_id = r.string("chain_id")
        else:
            r.skip(wt)
    return req


def _decode_ping_request(data: bytes, family: WireFamily) -> PingRequest:
    _skip_all(data, "PingRequest")
    return PingRequest()


def _decode_sign_bytes_request(data: bytes, family: WireFamily) -> SignBytesRequest:
    req = SignBytesRequest()
    r = _Reader(data, "SignBytesRequest")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            req.value = r.chunk()
        else:
            r.skip(wt)
    return req


# ---- responses ----------------------------------------------------------------------------


def _merge_public_key(resp: PubKeyResponse, data: bytes, family: WireFamily) -> None:
    """PublicKey oneof into resp.key_type/pub_key; variants the family lacks are unknown."""
    names = _PUBKEY_NAMES[family]
    r = _Reader(data, "PublicKey")
    while r.more():
        field, wt = r.key()
        name = names.get(field)
        if name is None:
            r.skip(wt)
            continue
        r.check(field, wt, LEN)
        resp.key_type, resp.pub_key = name, r.chunk()


def _decode_pub_key_response(data: bytes, family: WireFamily) -> PubKeyResponse:
    resp = PubKeyResponse()
    r = _Reader(data, "PubKeyResponse")
    while r.more():
        field, wt = r.key()
        if field == 2:
            r.check(field, wt, LEN)
            if resp.error is None:
                resp.error = RemoteSignerError()
            _merge_error(resp.error, r.chunk())
        elif field == 1 and family is not V1_0:
            r.check(field, wt, LEN)
            _merge_public_key(resp, r.chunk(), family)
        elif field == 3 and family is V1_0:
            r.check(field, wt, LEN)
            resp.pub_key = r.chunk()
        elif field == 4 and family is V1_0:
            r.check(field, wt, LEN)
            type_name = r.string("pub_key_type")
            if type_name and type_name not in _V1_KEY_NAMES:
                raise r.error(f"unknown pub_key_type {type_name!r}")
            resp.key_type = _V1_KEY_NAMES.get(type_name, "")
        else:
            r.skip(wt)
    return resp


def _decode_signed_vote_response(data: bytes, family: WireFamily) -> SignedVoteResponse:
    resp = SignedVoteResponse()
    r = _Reader(data, "SignedVoteResponse")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            _merge_vote(resp.vote, r.chunk(), family)
        elif field == 2:
            r.check(field, wt, LEN)
            if resp.error is None:
                resp.error = RemoteSignerError()
            _merge_error(resp.error, r.chunk())
        else:
            r.skip(wt)
    return resp


def _decode_signed_proposal_response(data: bytes, family: WireFamily) -> SignedProposalResponse:
    resp = SignedProposalResponse(Proposal(type=0))
    r = _Reader(data, "SignedProposalResponse")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            _merge_proposal(resp.proposal, r.chunk())
        elif field == 2:
            r.check(field, wt, LEN)
            if resp.error is None:
                resp.error = RemoteSignerError()
            _merge_error(resp.error, r.chunk())
        else:
            r.skip(wt)
    return resp


def _decode_ping_response(data: bytes, family: WireFamily) -> PingResponse:
    _skip_all(data, "PingResponse")
    return PingResponse()


def _decode_sign_bytes_response(data: bytes, family: WireFamily) -> SignBytesResponse:
    resp = SignBytesResponse()
    r = _Reader(data, "SignBytesResponse")
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, LEN)
            resp.signature = r.chunk()
        elif field == 2:
            r.check(field, wt, LEN)
            if resp.error is None:
                resp.error = RemoteSignerError()
            _merge_error(resp.error, r.chunk())
        else:
            r.skip(wt)
    return resp


def _skip_all(data: bytes, what: str) -> None:
    r = _Reader(data, what)
    while r.more():
        r.skip(r.key()[1])


_DECODERS: dict[int, Callable[[bytes, WireFamily], Request | Response]] = {
    PUB_KEY_REQUEST: _decode_pub_key_request,
    PUB_KEY_RESPONSE: _decode_pub_key_response,
    SIGN_VOTE_REQUEST: _decode_sign_vote_request,
    SIGNED_VOTE_RESPONSE: _decode_signed_vote_response,
    SIGN_PROPOSAL_REQUEST: _decode_sign_proposal_request,
    SIGNED_PROPOSAL_RESPONSE: _decode_signed_proposal_response,
    PING_REQUEST: _decode_ping_request,
    PING_RESPONSE: _decode_ping_response,
    SIGN_BYTES_REQUEST: _decode_sign_bytes_request,
    SIGN_BYTES_RESPONSE: _decode_sign_bytes_response,
}


def _split_message(msg: bytes, family: WireFamily) -> tuple[int, bytes]:
    """The (tag, payload) of the last oneof member in a ``Message``."""
    _check_family(family)
    data = _as_bytes(msg)
    last_tag = 10 if family is V1_0 else 8
    found: tuple[int, bytes] | None = None
    r = _Reader(data, "Message")
    while r.more():
        field, wt = r.key()
        if field > last_tag:
            r.skip(wt)
            continue
        r.check(field, wt, LEN)
        found = (field, r.chunk())
    if found is None:
        raise DecodeError(f"empty Message: no privval message of family {family.name}")
    return found


def decode_request(msg: bytes, family: WireFamily) -> Request:
    """Decode one ``Message`` (without its length prefix) that must carry a request."""
    tag, payload = _split_message(msg, family)
    if tag not in _REQUEST_TAGS:
        raise DecodeError(f"expected a request, got a {_MESSAGE_NAMES[tag]}")
    return _DECODERS[tag](payload, family)


def decode_response(msg: bytes, family: WireFamily) -> Response:
    """Decode one ``Message`` (without its length prefix) that must carry a response."""
    tag, payload = _split_message(msg, family)
    if tag in _REQUEST_TAGS:
        raise DecodeError(f"expected a response, got a {_MESSAGE_NAMES[tag]}")
    return _DECODERS[tag](payload, family)


def decode_request_for_signing(
    msg: bytes, family: WireFamily
) -> tuple[Request, bytes | None, bytes | None]:
    """The hot path: ``(request, sign_bytes, extension_sign_bytes)`` in one call.

    ``sign_bytes`` is the canonical vote/proposal sign bytes for a SignVoteRequest /
    SignProposalRequest (with the request's chain_id), else None.  ``extension_sign_bytes``
    is set exactly when :func:`nebula.types.extension_signature_required` says so.
    """
    req = decode_request(msg, family)
    if isinstance(req, SignVoteRequest):
        ext = None
        if extension_signature_required(family, req):
            ext = vote_extension_sign_bytes(req.chain_id, req.vote)
        return req, vote_sign_bytes(req.chain_id, req.vote), ext
    if isinstance(req, SignProposalRequest):
        return req, proposal_sign_bytes(req.chain_id, req.proposal), None
    return req, None, None


def decode_uvarint(data: bytes, pos: int = 0) -> tuple[int, int]:
    """Read one unsigned varint at ``pos``: ``(value, position after it)``."""
    data = _as_bytes(data)
    if not 0 <= pos <= len(data):
        raise DecodeError(f"varint offset {pos} outside the {len(data)}-byte input")
    r = _Reader(data, "varint", pos)
    value = r.uvarint()
    return value, r.pos


def canonical_chain_id(sign_bytes: bytes) -> str:
    """The chain id inside stored sign bytes: field 6 of a CanonicalVote, 7 of a
    CanonicalProposal (type 32).  A cold path (checking a sign state before it is
    imported), so the pure codec only.  Raises DecodeError for bytes that are not one."""
    data = _as_bytes(sign_bytes)
    r = _Reader(data, "canonical sign bytes")
    length = r.uvarint()
    if length != r.end - r.pos:
        raise r.error(f"length prefix {length} but {r.end - r.pos} bytes follow")
    msg_type = 0  # field 1 comes first in canonical encoding
    chain_id = ""
    while r.more():
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, VARINT)
            msg_type = r.int32()
        elif field == (7 if msg_type == PROPOSAL_TYPE else 6):
            r.check(field, wt, LEN)
            chain_id = r.string("chain_id")
        else:
            r.skip(wt)
    return chain_id


def canonical_vote_without_timestamp(
    sign_bytes: bytes, proposal: bool | None = None
) -> tuple[bytes, Timestamp]:
    """Split stored sign bytes into (canonical body without its timestamp, timestamp).

    CanonicalVote keeps its timestamp in field 5, CanonicalProposal in field 6.  Say which
    one ``sign_bytes`` is with ``proposal``; when None, type 32 (PROPOSAL) means a proposal.
    Two sign bytes that differ only in their timestamp give equal first elements
    (FilePV's "only the timestamp differs" rule, protocol.md §5.1).  An absent timestamp
    is Go's zero time.
    """
    data = _as_bytes(sign_bytes)
    r = _Reader(data, "canonical sign bytes")
    length = r.uvarint()
    if length != r.end - r.pos:
        raise r.error(f"length prefix {length} but {r.end - r.pos} bytes follow")
    spans: list[tuple[int, int, int]] = []  # (field, start, end) of every field
    msg_type = 0
    while r.more():
        start = r.pos
        field, wt = r.key()
        if field == 1:
            r.check(field, wt, VARINT)
            msg_type = r.int32()
        else:
            r.skip(wt)
        spans.append((field, start, r.pos))
    if proposal is None:
        proposal = msg_type == PROPOSAL_TYPE
    ts_field = 6 if proposal else 5
    body = bytearray()
    timestamp = Timestamp()  # absent: Go's zero time, as a Go decoder would see it
    for field, start, end in spans:
        if field != ts_field:
            body += data[start:end]
            continue
        field_reader = _Reader(data, "canonical sign bytes", start, end)
        field_reader.check(field, field_reader.key()[1], LEN)
        timestamp = _decode_timestamp(field_reader.chunk())
    return bytes(body), timestamp


# ==== framing (protocol.md §2.1) =========================================================


class DelimitedReader:
    """Split a byte stream into uvarint length-delimited messages.

    ``feed`` returns the complete messages (without prefixes) found so far; a partial
    message waits for more data.  A length above ``max_size`` or a malformed varint
    (more than 10 bytes, or above 64 bits) raises :class:`~nebula.errors.FrameError`
    as soon as the prefix shows it, before any of the body is buffered; the reader is
    then unusable (every later ``feed`` raises again).
    """

    __slots__ = ("_buf", "_failed", "max_size")

    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self._buf = bytearray()
        self._failed: str | None = None

    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a message."""
        return len(self._buf)

    def _fail(self, problem: str) -> FrameError:
        self._failed = problem
        self._buf.clear()
        return FrameError(problem)

    def _prefix(self, pos: int) -> tuple[int, int] | None:
        """Parse the length prefix at ``pos``: (length, body start), or None if incomplete."""
        buf = self._buf
        length = 0
        for i in range(10):
            if pos + i >= len(buf):
                return None
            b = buf[pos + i]
            if i == 9 and b > 1:
                raise self._fail("malformed length prefix: varint overflows 64 bits")
            length |= (b & 0x7F) << (7 * i)
            if length > self.max_size:
                raise self._fail(
                    f"message length {length}+ exceeds the limit of {self.max_size} bytes"
                )
            if b < 0x80:
                return length, pos + i + 1
        raise self._fail("malformed length prefix: varint longer than 10 bytes")

    def feed(self, data: bytes) -> list[bytes]:
        if self._failed is not None:
            raise FrameError(f"stream already failed: {self._failed}")
        buf = self._buf
        buf += data
        messages: list[bytes] = []
        pos = 0
        while pos < len(buf):
            prefix = self._prefix(pos)
            if prefix is None:
                break
            length, start = prefix
            if start + length > len(buf):
                break
            messages.append(bytes(buf[start : start + length]))
            pos = start + length
        del buf[:pos]
        return messages
