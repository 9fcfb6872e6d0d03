# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""privval protobuf codec and canonical sign bytes, compiled twin of ``pb_py.py``.

``pb_py`` is the specification (its docstring lists the decoding and encoding rules);
this module must give identical results for every input.  Votes and proposals go
through C structs: decoding fills a struct with pointers into the input buffer, encoding
reads the dataclass once into a struct, computes every length first and writes straight
into the result ``bytes`` (one allocation, no intermediate buffers).  The rarer messages
(public keys, errors, sign-bytes) use the same primitives with Python objects.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

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

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline void neb_pb_store64_le(unsigned char *p, uint64_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        memcpy(p, &v, 8);
    }
    """
    void store64_le "neb_pb_store64_le" (unsigned char *p, uint64_t v) nogil


# ---- constants ------------------------------------------------------------------------------

cdef enum:
    VARINT = 0
    I64 = 1
    LEN = 2
    SGROUP = 3
    EGROUP = 4
    I32 = 5

cdef enum:
    FAM_V0_34 = 0
    FAM_V0_38 = 1
    FAM_V1_0 = 2

cdef enum:
    PROPOSAL_TYPE = 32

cdef uint64_t MAX_FIELD_NUMBER = (1 << 29) - 1
cdef int64_t TS_MIN_SECONDS = -62135596800
cdef int64_t TS_MAX_SECONDS = 253402300800
cdef int64_t GO_ZERO_SECONDS = -62135596800

cdef object _V0_34 = WireFamily.V0_34
cdef object _V0_38 = WireFamily.V0_38
cdef object _V1_0 = WireFamily.V1_0

cdef object _DecodeError = DecodeError
cdef object _FrameError = FrameError
cdef object _Vote = Vote
cdef object _Proposal = Proposal
cdef object _BlockID = BlockID
cdef object _PartSetHeader = PartSetHeader
cdef object _Timestamp = Timestamp
cdef object _RemoteSignerError = RemoteSignerError
cdef object _PubKeyRequest = PubKeyRequest
cdef object _PubKeyResponse = PubKeyResponse
cdef object _SignVoteRequest = SignVoteRequest
cdef object _extension_signature_required = extension_signature_required
cdef object _SignedVoteResponse = SignedVoteResponse
cdef object _SignProposalRequest = SignProposalRequest
cdef object _SignedProposalResponse = SignedProposalResponse
cdef object _PingRequest = PingRequest
cdef object _PingResponse = PingResponse
cdef object _SignBytesRequest = SignBytesRequest
cdef object _SignBytesResponse = SignBytesResponse

cdef tuple _MESSAGE_NAMES = (
    "", "PubKeyRequest", "PubKeyResponse", "SignVoteRequest", "SignedVoteResponse",
    "SignProposalRequest", "SignedProposalResponse", "PingRequest", "PingResponse",
    "SignBytesRequest", "SignBytesResponse",
)

# PublicKey oneof variants: index = field number (protocol.md §2.4).
cdef tuple _PUBKEY_NAMES = ("", "ed25519", "secp256k1", "bls12381")
cdef dict _PUBKEY_FIELDS_V0_34 = {"ed25519": 1, "secp256k1": 2}
cdef dict _PUBKEY_FIELDS_V0_38 = {"ed25519": 1, "secp256k1": 2, "bls12381": 3}
cdef dict _V1_KEY_TYPES = {"ed25519": "ed25519", "secp256k1": "secp256k1", "bls12381": "bls12_381"}
cdef dict _V1_KEY_NAMES = {"ed25519": "ed25519", "secp256k1": "secp256k1", "bls12_381": "bls12381"}


cdef inline int fam_code(object family) except -1:
    if family is _V0_34:
        return FAM_V0_34
    if family is _V0_38:
        return FAM_V0_38
    if family is _V1_0:
        return FAM_V1_0
    raise TypeError(f"family must be a WireFamily, not {family!r}")


cdef inline str fam_name(int fam):
    return ("V0_34", "V0_38", "V1_0")[fam]


# ---- structs ----------------------------------------------------------------------------------

cdef struct Span:
    const uint8_t* p
    Py_ssize_t n

cdef struct BidC:
    Span hash
    uint32_t total
    Span psh_hash

cdef struct TsC:
    int64_t seconds
    int32_t nanos

cdef struct VoteC:
    int32_t type
    int64_t height
    int32_t round
    BidC bid
    TsC ts
    Span address
    int32_t index
    Span signature
    Span extension
    Span ext_signature

cdef struct ProposalC:
    int32_t type
    int64_t height
    int32_t round
    int32_t pol_round
    BidC bid
    TsC ts
    Span signature

cdef struct Rd:
    const uint8_t* p
    Py_ssize_t pos
    Py_ssize_t end
    const char* what


cdef inline void vote_init(VoteC* v) noexcept nogil:
    """An absent Vote: zeros, and Go's zero time for the timestamp."""
    cdef Span empty
    empty.p = NULL
    empty.n = 0
    v.type = 0
    v.height = 0
    v.round = 0
    v.bid.hash = empty
    v.bid.total = 0
    v.bid.psh_hash = empty
    v.ts.seconds = GO_ZERO_SECONDS
    v.ts.nanos = 0
    v.address = empty
    v.index = 0
    v.signature = empty
    v.extension = empty
    v.ext_signature = empty


cdef inline void proposal_init(ProposalC* v) noexcept nogil:
    cdef Span empty
    empty.p = NULL
    empty.n = 0
    v.type = 0
    v.height = 0
    v.round = 0
    v.pol_round = 0
    v.bid.hash = empty
    v.bid.total = 0
    v.bid.psh_hash = empty
    v.ts.seconds = GO_ZERO_SECONDS
    v.ts.nanos = 0
    v.signature = empty


# ==== reading ======================================================================================

cdef int rd_fail(Rd* r, str problem) except -1:
    raise _DecodeError(f"malformed {(<bytes>r.what).decode()}: {problem}")


cdef inline void rd_init(Rd* r, const uint8_t* p, Py_ssize_t n, const char* what) noexcept nogil:
    r.p = p
    r.pos = 0
    r.end = n
    r.what = what


cdef int rd_uvarint_slow(Rd* r, uint64_t* out) except -1:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef Py_ssize_t pos = r.pos
    cdef uint8_t b
    while True:
        if pos >= r.end:
            rd_fail(r, f"truncated varint at offset {r.pos}")
        b = r.p[pos]
        pos += 1
        if shift == 63 and b > 1:
            rd_fail(r, f"varint at offset {r.pos} overflows 64 bits")
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            r.pos = pos
            out[0] = result
            return 0
        shift += 7


cdef inline int rd_uvarint(Rd* r, uint64_t* out) except -1:
    cdef Py_ssize_t pos = r.pos
    cdef uint8_t b
    if pos < r.end:
        b = r.p[pos]
        if b < 0x80:
            r.pos = pos + 1
            out[0] = b
            return 0
    return rd_uvarint_slow(r, out)


cdef inline int rd_key(Rd* r, uint64_t* field, int* wt) except -1:
    cdef uint64_t key
    rd_uvarint(r, &key)
    field[0] = key >> 3
    wt[0] = <int>(key & 7)
    if field[0] == 0 or field[0] > MAX_FIELD_NUMBER:
        rd_fail(r, f"invalid field number {field[0]}")
    return 0


cdef inline int rd_check(Rd* r, uint64_t field, int wt, int expected) except -1:
    if wt != expected:
        rd_fail(r, f"field {field} has wire type {wt}, expected {expected}")
    return 0


cdef inline int rd_advance(Rd* r, uint64_t n, const char* what) except -1:
    cdef Py_ssize_t start = r.pos
    if n > <uint64_t>(r.end - start):
        rd_fail(r, f"truncated {(<bytes>what).decode()} at offset {start}: "
                   f"needs {n} bytes, has {r.end - start}")
    r.pos = start + <Py_ssize_t>n
    return 0


cdef inline int rd_span(Rd* r, Span* out) except -1:
    """The payload of a length-delimited field."""
    cdef uint64_t n
    rd_uvarint(r, &n)
    cdef Py_ssize_t start = r.pos
    rd_advance(r, n, b"length-delimited field")
    out.p = r.p + start
    out.n = <Py_ssize_t>n
    return 0


cdef inline int rd_int32(Rd* r, int32_t* out) except -1:
    cdef uint64_t v
    rd_uvarint(r, &v)
    out[0] = <int32_t><uint32_t>v
    return 0


cdef inline int rd_int64(Rd* r, int64_t* out) except -1:
    cdef uint64_t v
    rd_uvarint(r, &v)
    out[0] = <int64_t>v
    return 0


cdef int rd_skip(Rd* r, int wt) except -1:
    """Skip an unknown field's value (protobuf skipping rules, groups included)."""
    cdef int depth = 0
    cdef uint64_t v, field
    while True:
        if wt == VARINT:
            rd_uvarint(r, &v)
        elif wt == I64:
            rd_advance(r, 8, b"fixed64")
        elif wt == LEN:
            rd_uvarint(r, &v)
            rd_advance(r, v, b"length-delimited field")
        elif wt == I32:
            rd_advance(r, 4, b"fixed32")
        elif wt == SGROUP:
            depth += 1
        elif wt == EGROUP:
            if depth == 0:
                rd_fail(r, "end-group without start-group")
            depth -= 1
        else:
            rd_fail(r, f"invalid wire type {wt}")
        if depth == 0:
            return 0
        rd_key(r, &field, &wt)


cdef inline bytes span_bytes(Span s):
    return PyBytes_FromStringAndSize(<const char*>s.p, s.n)


cdef str span_str(Rd* r, Span s, const char* what):
    try:
        return PyUnicode_DecodeUTF8(<const char*>s.p, s.n, NULL)
    except UnicodeDecodeError:
        rd_fail(r, f"{(<bytes>what).decode()} is not valid UTF-8")


cdef inline Rd sub_reader(Span s, const char* what) noexcept nogil:
    cdef Rd r
    r.p = s.p
    r.pos = 0
    r.end = s.n
    r.what = what
    return r


# ---- types -------------------------------------------------------------------------------------

cdef int rd_timestamp(Span s, TsC* ts) except -1:
    """Replace *ts (gogo StdTimeUnmarshal); a present Timestamp starts at the epoch."""
    cdef Rd r = sub_reader(s, b"Timestamp")
    cdef uint64_t field
    cdef int wt
    cdef int64_t seconds = 0
    cdef int32_t nanos = 0
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, VARINT)
            rd_int64(&r, &seconds)
        elif field == 2:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &nanos)
        else:
            rd_skip(&r, wt)
    if seconds < TS_MIN_SECONDS or seconds >= TS_MAX_SECONDS:
        rd_fail(&r, f"seconds {seconds} outside 0001-01-01..9999-12-31")
    if nanos < 0 or nanos > 999999999:
        rd_fail(&r, f"nanos {nanos} outside 0..999999999")
    ts.seconds = seconds
    ts.nanos = nanos
    return 0


cdef int rd_part_set_header(Span s, BidC* bid) except -1:
    cdef Rd r = sub_reader(s, b"PartSetHeader")
    cdef uint64_t field, v
    cdef int wt
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, VARINT)
            rd_uvarint(&r, &v)
            bid.total = <uint32_t>v
        elif field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &bid.psh_hash)
        else:
            rd_skip(&r, wt)
    return 0


cdef int rd_block_id(Span s, BidC* bid) except -1:
    """Merge into *bid (gogo Unmarshal into the non-nullable field)."""
    cdef Rd r = sub_reader(s, b"BlockID")
    cdef uint64_t field
    cdef int wt
    cdef Span sub
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &bid.hash)
        elif field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_part_set_header(sub, bid)
        else:
            rd_skip(&r, wt)
    return 0


cdef int rd_vote(Span s, VoteC* v, int fam) except -1:
    """Merge an encoded Vote into *v."""
    cdef Rd r = sub_reader(s, b"Vote")
    cdef uint64_t field
    cdef int wt
    cdef Span sub
    cdef uint64_t last_field = 8 if fam == FAM_V0_34 else 10
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field > last_field:
            rd_skip(&r, wt)
        elif field == 1:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &v.type)
        elif field == 2:
            rd_check(&r, field, wt, VARINT)
            rd_int64(&r, &v.height)
        elif field == 3:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &v.round)
        elif field == 4:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_block_id(sub, &v.bid)
        elif field == 5:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_timestamp(sub, &v.ts)
        elif field == 6:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &v.address)
        elif field == 7:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &v.index)
        elif field == 8:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &v.signature)
        elif field == 9:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &v.extension)
        else:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &v.ext_signature)
    return 0


cdef int rd_proposal(Span s, ProposalC* v) except -1:
    cdef Rd r = sub_reader(s, b"Proposal")
    cdef uint64_t field
    cdef int wt
    cdef Span sub
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &v.type)
        elif field == 2:
            rd_check(&r, field, wt, VARINT)
            rd_int64(&r, &v.height)
        elif field == 3:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &v.round)
        elif field == 4:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &v.pol_round)
        elif field == 5:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_block_id(sub, &v.bid)
        elif field == 6:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_timestamp(sub, &v.ts)
        elif field == 7:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &v.signature)
        else:
            rd_skip(&r, wt)
    return 0


cdef object rd_error(Span s, object error):
    """Merge a RemoteSignerError into ``error`` (created when None); returns it."""
    cdef Rd r = sub_reader(s, b"RemoteSignerError")
    cdef uint64_t field
    cdef int wt
    cdef int32_t code
    cdef Span sub
    if error is None:
        error = _RemoteSignerError()
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &code)
            error.code = code
        elif field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            error.description = span_str(&r, sub, b"description")
        else:
            rd_skip(&r, wt)
    return error


cdef int rd_skip_all(Span s, const char* what) except -1:
    cdef Rd r = sub_reader(s, what)
    cdef uint64_t field
    cdef int wt
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        rd_skip(&r, wt)
    return 0


# ---- building Python objects -----------------------------------------------------------------

cdef inline object py_block_id(BidC* b):
    return _BlockID(span_bytes(b.hash), _PartSetHeader(b.total, span_bytes(b.psh_hash)))


cdef object py_vote(VoteC* v):
    return _Vote(
        v.type,
        v.height,
        v.round,
        py_block_id(&v.bid),
        _Timestamp(v.ts.seconds, v.ts.nanos),
        span_bytes(v.address),
        v.index,
        span_bytes(v.signature),
        span_bytes(v.extension),
        span_bytes(v.ext_signature),
    )


cdef object py_proposal(ProposalC* v):
    return _Proposal(
        v.type,
        v.height,
        v.round,
        v.pol_round,
        py_block_id(&v.bid),
        _Timestamp(v.ts.seconds, v.ts.nanos),
        span_bytes(v.signature),
    )


# ==== writing =======================================================================================
# All field numbers written here are < 16, so every key is one byte.

cdef inline Py_ssize_t vsize(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline uint8_t* w_uvarint(uint8_t* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <uint8_t>(v | 0x80)
        v >>= 7
        p += 1
    p[0] = <uint8_t>v
    return p + 1


cdef inline Py_ssize_t sz_varint(uint64_t v) noexcept nogil:
    return 0 if v == 0 else 1 + vsize(v)


cdef inline uint8_t* w_varint(uint8_t* p, int field, uint64_t v) noexcept nogil:
    if v != 0:
        p[0] = <uint8_t>(field << 3)
        p = w_uvarint(p + 1, v)
    return p


cdef inline Py_ssize_t sz_sfixed64(int64_t v) noexcept nogil:
    return 0 if v == 0 else 9


cdef inline uint8_t* w_sfixed64(uint8_t* p, int field, int64_t v) noexcept nogil:
    if v != 0:
        p[0] = <uint8_t>((field << 3) | I64)
        store64_le(p + 1, <uint64_t>v)
        p += 9
    return p


cdef inline Py_ssize_t sz_msg(Py_ssize_t n) noexcept nogil:
    """A length-delimited field that is always written."""
    return 1 + vsize(<uint64_t>n) + n


cdef inline uint8_t* w_head(uint8_t* p, int field, Py_ssize_t n) noexcept nogil:
    p[0] = <uint8_t>((field << 3) | LEN)
    return w_uvarint(p + 1, <uint64_t>n)


cdef inline Py_ssize_t sz_bytes(Py_ssize_t n) noexcept nogil:
    return 0 if n == 0 else sz_msg(n)


cdef inline uint8_t* w_span(uint8_t* p, int field, Span s) noexcept nogil:
    """An always-written length-delimited field with content s."""
    p = w_head(p, field, s.n)
    if s.n:
        memcpy(p, s.p, s.n)
    return p + s.n


cdef inline uint8_t* w_bytes(uint8_t* p, int field, Span s) noexcept nogil:
    if s.n == 0:
        return p
    return w_span(p, field, s)


cdef inline int span_of_bytes(object o, Span* s, str what) except -1:
    if not PyBytes_Check(o):
        raise TypeError(f"{what} must be bytes, not {type(o).__name__}")
    s.p = <const uint8_t*>PyBytes_AS_STRING(o)
    s.n = PyBytes_GET_SIZE(o)
    return 0


cdef inline int span_of_str(object o, Span* s, str what) except -1:
    cdef Py_ssize_t n
    if not PyUnicode_Check(o):
        raise TypeError(f"{what} must be str, not {type(o).__name__}")
    s.p = <const uint8_t*>PyUnicode_AsUTF8AndSize(o, &n)
    s.n = n
    return 0


cdef inline bytes new_bytes(Py_ssize_t n, uint8_t** p):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    p[0] = <uint8_t*>PyBytes_AS_STRING(out)
    return out


cdef inline int check_end(bytes out, uint8_t* p) except -1:
    if p != <uint8_t*>PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(out):
        raise SystemError("nebula._fast._pb: encoded size mismatch (kernel bug)")
    return 0


# ---- reading dataclasses into structs ---------------------------------------------------------------
# Each returns a tuple holding the objects whose buffers the struct points into, so the
# caller keeps them alive for as long as it uses the struct.

cdef tuple bid_from_py(object block_id, BidC* b):
    cdef object psh = block_id.part_set_header
    cdef object h = block_id.hash
    cdef object ph = psh.hash
    span_of_bytes(h, &b.hash, "BlockID.hash")
    b.total = psh.total
    span_of_bytes(ph, &b.psh_hash, "PartSetHeader.hash")
    return (h, ph)


cdef inline int ts_from_py(object ts, TsC* t) except -1:
    t.seconds = ts.seconds
    t.nanos = ts.nanos
    return 0


cdef tuple vote_from_py(object vote, VoteC* v, bint with_ext):
    cdef object addr = vote.validator_address
    cdef object sig = vote.signature
    cdef object ext = b""
    cdef object ext_sig = b""
    v.type = vote.type
    v.height = vote.height
    v.round = vote.round
    cdef tuple keep_bid = bid_from_py(vote.block_id, &v.bid)
    ts_from_py(vote.timestamp, &v.ts)
    span_of_bytes(addr, &v.address, "Vote.validator_address")
    v.index = vote.validator_index
    span_of_bytes(sig, &v.signature, "Vote.signature")
    if with_ext:
        ext = vote.extension
        ext_sig = vote.extension_signature
    span_of_bytes(ext, &v.extension, "Vote.extension")
    span_of_bytes(ext_sig, &v.ext_signature, "Vote.extension_signature")
    return (keep_bid, addr, sig, ext, ext_sig)


cdef tuple proposal_from_py(object proposal, ProposalC* v):
    cdef object sig = proposal.signature
    v.type = proposal.type
    v.height = proposal.height
    v.round = proposal.round
    v.pol_round = proposal.pol_round
    cdef tuple keep_bid = bid_from_py(proposal.block_id, &v.bid)
    ts_from_py(proposal.timestamp, &v.ts)
    span_of_bytes(sig, &v.signature, "Proposal.signature")
    return (keep_bid, sig)


# ---- sizes and writers of the types --------------------------------------------------------------------

cdef inline Py_ssize_t sz_ts(TsC* t) noexcept nogil:
    return sz_varint(<uint64_t>t.seconds) + sz_varint(<uint64_t><int64_t>t.nanos)


cdef inline uint8_t* w_ts(uint8_t* p, int field, TsC* t) noexcept nogil:
    p = w_head(p, field, sz_ts(t))
    p = w_varint(p, 1, <uint64_t>t.seconds)
    return w_varint(p, 2, <uint64_t><int64_t>t.nanos)


cdef inline Py_ssize_t sz_psh(BidC* b) noexcept nogil:
    return sz_varint(b.total) + sz_bytes(b.psh_hash.n)


cdef inline Py_ssize_t sz_bid(BidC* b) noexcept nogil:
    return sz_bytes(b.hash.n) + sz_msg(sz_psh(b))


cdef inline uint8_t* w_bid(uint8_t* p, int field, BidC* b) noexcept nogil:
    """BlockID / CanonicalBlockID: part_set_header always written."""
    p = w_head(p, field, sz_bid(b))
    p = w_bytes(p, 1, b.hash)
    p = w_head(p, 2, sz_psh(b))
    p = w_varint(p, 1, b.total)
    return w_bytes(p, 2, b.psh_hash)


cdef inline bint bid_is_zero(BidC* b) noexcept nogil:
    return b.hash.n == 0 and b.total == 0 and b.psh_hash.n == 0


cdef inline uint64_t i32(int32_t v) noexcept nogil:
    """int32 as a protobuf varint value (negatives sign-extended to 64 bits)."""
    return <uint64_t><int64_t>v


cdef Py_ssize_t sz_vote(VoteC* v, bint with_ext) noexcept nogil:
    cdef Py_ssize_t n = (
        sz_varint(i32(v.type))
        + sz_varint(<uint64_t>v.height)
        + sz_varint(i32(v.round))
        + sz_msg(sz_bid(&v.bid))
        + sz_msg(sz_ts(&v.ts))
        + sz_bytes(v.address.n)
        + sz_varint(i32(v.index))
        + sz_bytes(v.signature.n)
    )
    if with_ext:
        n += sz_bytes(v.extension.n) + sz_bytes(v.ext_signature.n)
    return n


cdef uint8_t* w_vote(uint8_t* p, int field, VoteC* v, bint with_ext) noexcept nogil:
    p = w_head(p, field, sz_vote(v, with_ext))
    p = w_varint(p, 1, i32(v.type))
    p = w_varint(p, 2, <uint64_t>v.height)
    p = w_varint(p, 3, i32(v.round))
    p = w_bid(p, 4, &v.bid)
    p = w_ts(p, 5, &v.ts)
    p = w_bytes(p, 6, v.address)
    p = w_varint(p, 7, i32(v.index))
    p = w_bytes(p, 8, v.signature)
    if with_ext:
        p = w_bytes(p, 9, v.extension)
        p = w_bytes(p, 10, v.ext_signature)
    return p


cdef Py_ssize_t sz_proposal(ProposalC* v) noexcept nogil:
    return (
        sz_varint(i32(v.type))
        + sz_varint(<uint64_t>v.height)
        + sz_varint(i32(v.round))
        + sz_varint(i32(v.pol_round))
        + sz_msg(sz_bid(&v.bid))
        + sz_msg(sz_ts(&v.ts))
        + sz_bytes(v.signature.n)
    )


cdef uint8_t* w_proposal(uint8_t* p, int field, ProposalC* v) noexcept nogil:
    p = w_head(p, field, sz_proposal(v))
    p = w_varint(p, 1, i32(v.type))
    p = w_varint(p, 2, <uint64_t>v.height)
    p = w_varint(p, 3, i32(v.round))
    p = w_varint(p, 4, i32(v.pol_round))
    p = w_bid(p, 5, &v.bid)
    p = w_ts(p, 6, &v.ts)
    return w_bytes(p, 7, v.signature)


cdef struct ErrC:
    bint present
    int32_t code
    Span description


cdef object err_from_py(object error, ErrC* e):
    """Returns the description str (kept alive by the caller)."""
    e.present = error is not None
    e.code = 0
    e.description.p = NULL
    e.description.n = 0
    if error is None:
        return None
    e.code = error.code
    cdef object desc = error.description
    span_of_str(desc, &e.description, "RemoteSignerError.description")
    return desc


cdef inline Py_ssize_t sz_err_body(ErrC* e) noexcept nogil:
    return sz_varint(i32(e.code)) + sz_bytes(e.description.n)


cdef inline Py_ssize_t sz_err(ErrC* e) noexcept nogil:
    return sz_msg(sz_err_body(e)) if e.present else 0


cdef inline uint8_t* w_err(uint8_t* p, int field, ErrC* e) noexcept nogil:
    if not e.present:
        return p
    p = w_head(p, field, sz_err_body(e))
    p = w_varint(p, 1, i32(e.code))
    return w_bytes(p, 2, e.description)


# ---- canonical sign bytes (protocol.md §4) ------------------------------------------------------------

cdef bytes c_vote_sign_bytes(VoteC* v, Span chain):
    cdef bint has_bid = not bid_is_zero(&v.bid)
    cdef Py_ssize_t body = (
        sz_varint(i32(v.type))
        + sz_sfixed64(v.height)
        + sz_sfixed64(<int64_t>v.round)
        + (sz_msg(sz_bid(&v.bid)) if has_bid else 0)
        + sz_msg(sz_ts(&v.ts))
        + sz_bytes(chain.n)
    )
    cdef uint8_t* p
    cdef bytes out = new_bytes(vsize(body) + body, &p)
    p = w_uvarint(p, body)
    p = w_varint(p, 1, i32(v.type))
    p = w_sfixed64(p, 2, v.height)
    p = w_sfixed64(p, 3, <int64_t>v.round)
    if has_bid:
        p = w_bid(p, 4, &v.bid)
    p = w_ts(p, 5, &v.ts)
    p = w_bytes(p, 6, chain)
    check_end(out, p)
    return out


cdef bytes c_vote_extension_sign_bytes(VoteC* v, Span chain):
    cdef Py_ssize_t body = (
        sz_bytes(v.extension.n)
        + sz_sfixed64(v.height)
        + sz_sfixed64(<int64_t>v.round)
        + sz_bytes(chain.n)
    )
    cdef uint8_t* p
    cdef bytes out = new_bytes(vsize(body) + body, &p)
    p = w_uvarint(p, body)
    p = w_bytes(p, 1, v.extension)
    p = w_sfixed64(p, 2, v.height)
    p = w_sfixed64(p, 3, <int64_t>v.round)
    p = w_bytes(p, 4, chain)
    check_end(out, p)
    return out


cdef bytes c_proposal_sign_bytes(ProposalC* v, Span chain):
    cdef bint has_bid = not bid_is_zero(&v.bid)
    cdef Py_ssize_t body = (
        2  # type: always 32, whatever proposal.type says
        + sz_sfixed64(v.height)
        + sz_sfixed64(<int64_t>v.round)
        + sz_varint(i32(v.pol_round))
        + (sz_msg(sz_bid(&v.bid)) if has_bid else 0)
        + sz_msg(sz_ts(&v.ts))
        + sz_bytes(chain.n)
    )
    cdef uint8_t* p
    cdef bytes out = new_bytes(vsize(body) + body, &p)
    p = w_uvarint(p, body)
    p = w_varint(p, 1, PROPOSAL_TYPE)
    p = w_sfixed64(p, 2, v.height)
    p = w_sfixed64(p, 3, <int64_t>v.round)
    p = w_varint(p, 4, i32(v.pol_round))
    if has_bid:
        p = w_bid(p, 5, &v.bid)
    p = w_ts(p, 6, &v.ts)
    p = w_bytes(p, 7, chain)
    check_end(out, p)
    return out


def vote_sign_bytes(chain_id, vote):
    """Length-prefixed CanonicalVote: what a vote signature covers."""
    cdef VoteC v
    cdef Span chain
    # only the signed fields are read (like pb_py)
    v.type = vote.type
    v.height = vote.height
    v.round = vote.round
    keep = bid_from_py(vote.block_id, &v.bid)
    ts_from_py(vote.timestamp, &v.ts)
    span_of_str(chain_id, &chain, "chain_id")
    return c_vote_sign_bytes(&v, chain)


def vote_extension_sign_bytes(chain_id, vote):
    """Length-prefixed CanonicalVoteExtension (protocol.md §8)."""
    cdef VoteC v
    cdef Span chain
    cdef object ext = vote.extension
    span_of_bytes(ext, &v.extension, "Vote.extension")
    v.height = vote.height
    v.round = vote.round
    span_of_str(chain_id, &chain, "chain_id")
    return c_vote_extension_sign_bytes(&v, chain)


def proposal_sign_bytes(chain_id, proposal):
    """Length-prefixed CanonicalProposal (type is always 32, pol_round an int64 varint)."""
    cdef ProposalC v
    cdef Span chain
    cdef object block_id = proposal.block_id
    v.height = proposal.height
    v.round = proposal.round
    v.pol_round = proposal.pol_round
    keep = bid_from_py(block_id, &v.bid)
    ts_from_py(proposal.timestamp, &v.ts)
    span_of_str(chain_id, &chain, "chain_id")
    return c_proposal_sign_bytes(&v, chain)


# ==== Message ==========================================================================================

cdef bytes wrap_message(int tag, Py_ssize_t body_size, uint8_t** p):
    cdef bytes out = new_bytes(sz_msg(body_size), p)
    p[0] = w_head(p[0], tag, body_size)
    return out


cdef bytes encode_vote_message(int tag, object vote, int fam, Span chain, bint skip, ErrC* err,
                               bint is_request):
    """SignVoteRequest{1 vote, 2 chain_id, 3 skip} or SignedVoteResponse{1 vote, 2 error}."""
    cdef VoteC v
    cdef bint with_ext = fam != FAM_V0_34
    keep = vote_from_py(vote, &v, with_ext)
    cdef Py_ssize_t body = sz_msg(sz_vote(&v, with_ext))
    cdef bint write_skip = is_request and fam == FAM_V1_0 and skip
    if is_request:
        body += sz_bytes(chain.n) + (2 if write_skip else 0)
    else:
        body += sz_err(err)
    cdef uint8_t* p
    cdef bytes out = wrap_message(tag, body, &p)
    p = w_vote(p, 1, &v, with_ext)
    if is_request:
        p = w_bytes(p, 2, chain)
        if write_skip:
            p = w_varint(p, 3, 1)
    else:
        p = w_err(p, 2, err)
    check_end(out, p)
    return out


cdef bytes encode_proposal_message(int tag, object proposal, Span chain, ErrC* err,
                                   bint is_request):
    cdef ProposalC v
    keep = proposal_from_py(proposal, &v)
    cdef Py_ssize_t body = sz_msg(sz_proposal(&v))
    body += sz_bytes(chain.n) if is_request else sz_err(err)
    cdef uint8_t* p
    cdef bytes out = wrap_message(tag, body, &p)
    p = w_proposal(p, 1, &v)
    if is_request:
        p = w_bytes(p, 2, chain)
    else:
        p = w_err(p, 2, err)
    check_end(out, p)
    return out


cdef bytes encode_bytes_message(int tag, Span value, ErrC* err):
    """PubKeyRequest{1 chain_id}, SignBytesRequest{1 value}, SignBytesResponse{1 sig, 2 error},
    PingRequest/PingResponse (empty value, no error)."""
    cdef Py_ssize_t body = sz_bytes(value.n) + sz_err(err)
    cdef uint8_t* p
    cdef bytes out = wrap_message(tag, body, &p)
    p = w_bytes(p, 1, value)
    p = w_err(p, 2, err)
    check_end(out, p)
    return out


cdef bytes encode_pub_key_response(object resp, int fam):
    cdef Span key, type_name
    cdef ErrC err
    cdef object key_obj = resp.pub_key
    cdef object key_type = resp.key_type
    cdef object type_str = ""
    cdef object variant
    cdef Py_ssize_t body, public_key
    cdef uint8_t* p
    cdef bytes out
    span_of_bytes(key_obj, &key, "PubKeyResponse.pub_key")
    if not key_type and key.n:
        raise ValueError("PubKeyResponse has key bytes but no key_type")
    keep_err = err_from_py(resp.error, &err)
    if fam == FAM_V1_0:
        # v1.0: 2 error, 3 pub_key_bytes, 4 pub_key_type (field 1 reserved)
        if key_type:
            type_str = _V1_KEY_TYPES.get(key_type, "")
            if not type_str:
                raise ValueError(f"key type {key_type!r} has no v1.0 pub_key_type")
        span_of_str(type_str, &type_name, "pub_key_type")
        body = sz_err(&err) + sz_bytes(key.n) + sz_bytes(type_name.n)
        out = wrap_message(2, body, &p)
        p = w_err(p, 2, &err)
        p = w_bytes(p, 3, key)
        p = w_bytes(p, 4, type_name)
        check_end(out, p)
        return out
    # v0.34 - v0.40: 1 PublicKey (non-nullable oneof wrapper), 2 error
    variant = 0
    if key_type:
        variant = (_PUBKEY_FIELDS_V0_34 if fam == FAM_V0_34 else _PUBKEY_FIELDS_V0_38).get(key_type)
        if variant is None:
            raise ValueError(f"key type {key_type!r} cannot be sent in family {fam_name(fam)}")
    public_key = sz_msg(key.n) if variant else 0
    body = sz_msg(public_key) + sz_err(&err)
    out = wrap_message(2, body, &p)
    p = w_head(p, 1, public_key)
    if variant:
        p = w_span(p, <int>variant, key)
    p = w_err(p, 2, &err)
    check_end(out, p)
    return out


def encode_request(req, family):
    """One privval ``Message`` carrying a request (no length prefix)."""
    cdef int fam = fam_code(family)
    cdef Span chain, value
    cdef ErrC no_err
    no_err.present = False
    value.p = NULL
    value.n = 0
    cdef object obj
    if isinstance(req, _SignVoteRequest):
        obj = req.chain_id
        span_of_str(obj, &chain, "chain_id")
        return encode_vote_message(3, req.vote, fam, chain, bool(req.skip_extension_signing),
                                   &no_err, True)
    if isinstance(req, _SignProposalRequest):
        obj = req.chain_id
        span_of_str(obj, &chain, "chain_id")
        return encode_proposal_message(5, req.proposal, chain, &no_err, True)
    if isinstance(req, _PubKeyRequest):
        obj = req.chain_id
        span_of_str(obj, &chain, "chain_id")
        return encode_bytes_message(1, chain, &no_err)
    if isinstance(req, _PingRequest):
        return encode_bytes_message(7, value, &no_err)
    if isinstance(req, _SignBytesRequest):
        if fam != FAM_V1_0:
            raise ValueError(f"SignBytesRequest does not exist in family {fam_name(fam)}")
        obj = req.value
        span_of_bytes(obj, &value, "SignBytesRequest.value")
        return encode_bytes_message(9, value, &no_err)
    raise TypeError(f"not a privval request: {type(req).__name__}")


def encode_response(resp, family):
    """One privval ``Message`` carrying a response (no length prefix), as Go writes it."""
    cdef int fam = fam_code(family)
    cdef Span value, no_chain
    cdef ErrC err
    cdef object obj
    value.p = NULL
    value.n = 0
    no_chain = value
    if isinstance(resp, _SignedVoteResponse):
        keep = err_from_py(resp.error, &err)
        return encode_vote_message(4, resp.vote, fam, no_chain, False, &err, False)
    if isinstance(resp, _SignedProposalResponse):
        keep = err_from_py(resp.error, &err)
        return encode_proposal_message(6, resp.proposal, no_chain, &err, False)
    if isinstance(resp, _PubKeyResponse):
        return encode_pub_key_response(resp, fam)
    if isinstance(resp, _PingResponse):
        err.present = False
        return encode_bytes_message(8, value, &err)
    if isinstance(resp, _SignBytesResponse):
        if fam != FAM_V1_0:
            raise ValueError(f"SignBytesResponse does not exist in family {fam_name(fam)}")
        obj = resp.signature
        span_of_bytes(obj, &value, "SignBytesResponse.signature")
        keep = err_from_py(resp.error, &err)
        return encode_bytes_message(10, value, &err)
    raise TypeError(f"not a privval response: {type(resp).__name__}")


# ---- decoding Message ---------------------------------------------------------------------------------

cdef inline bytes as_bytes(object msg):
    if PyBytes_Check(msg):
        return <bytes>msg
    return bytes(memoryview(msg))


cdef int split_message(bytes data, int fam, Span* payload) except -1:
    """The tag of the last oneof member of a Message, its payload in *payload."""
    cdef Rd r
    cdef uint64_t field
    cdef int wt
    cdef int tag = 0
    cdef uint64_t last_tag = 10 if fam == FAM_V1_0 else 8
    rd_init(&r, <const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), b"Message")
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field > last_tag:
            rd_skip(&r, wt)
            continue
        rd_check(&r, field, wt, LEN)
        rd_span(&r, payload)
        tag = <int>field
    if tag == 0:
        raise _DecodeError(f"empty Message: no privval message of family {fam_name(fam)}")
    return tag


cdef object parse_sign_vote_request(Span s, int fam, VoteC* v, Span* chain, bint* skip):
    """Fill *v, *chain, *skip from a SignVoteRequest; returns chain_id as str."""
    cdef Rd r = sub_reader(s, b"SignVoteRequest")
    cdef uint64_t field, b
    cdef int wt
    cdef Span sub
    cdef object chain_id = ""
    vote_init(v)
    chain.p = NULL
    chain.n = 0
    skip[0] = False
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_vote(sub, v, fam)
        elif field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, chain)
            chain_id = span_str(&r, chain[0], b"chain_id")
        elif field == 3 and fam == FAM_V1_0:
            rd_check(&r, field, wt, VARINT)
            rd_uvarint(&r, &b)
            skip[0] = b != 0
        else:
            rd_skip(&r, wt)
    return chain_id


cdef object parse_sign_proposal_request(Span s, ProposalC* v, Span* chain):
    cdef Rd r = sub_reader(s, b"SignProposalRequest")
    cdef uint64_t field
    cdef int wt
    cdef Span sub
    cdef object chain_id = ""
    proposal_init(v)
    chain.p = NULL
    chain.n = 0
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_proposal(sub, v)
        elif field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, chain)
            chain_id = span_str(&r, chain[0], b"chain_id")
        else:
            rd_skip(&r, wt)
    return chain_id


cdef object decode_pub_key_request(Span s):
    cdef Rd r = sub_reader(s, b"PubKeyRequest")
    cdef uint64_t field
    cdef int wt
    cdef Span sub
    cdef object chain_id = ""
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            chain_id = span_str(&r, sub, b"chain_id")
        else:
            rd_skip(&r, wt)
    return _PubKeyRequest(chain_id)


cdef object decode_bytes_field_message(Span s, const char* what, object cls, bint has_error):
    """SignBytesRequest{1 value} / SignBytesResponse{1 signature, 2 error}."""
    cdef Rd r = sub_reader(s, what)
    cdef uint64_t field
    cdef int wt
    cdef Span value, sub
    cdef object error = None
    value.p = NULL
    value.n = 0
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &value)
        elif field == 2 and has_error:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            error = rd_error(sub, error)
        else:
            rd_skip(&r, wt)
    if has_error:
        return cls(span_bytes(value), error)
    return cls(span_bytes(value))


cdef object decode_request_payload(int tag, Span s, int fam):
    cdef VoteC v
    cdef ProposalC pr
    cdef Span chain
    cdef bint skip
    if tag == 3:
        chain_id = parse_sign_vote_request(s, fam, &v, &chain, &skip)
        return _SignVoteRequest(py_vote(&v), chain_id, skip)
    if tag == 5:
        chain_id = parse_sign_proposal_request(s, &pr, &chain)
        return _SignProposalRequest(py_proposal(&pr), chain_id)
    if tag == 1:
        return decode_pub_key_request(s)
    if tag == 7:
        rd_skip_all(s, b"PingRequest")
        return _PingRequest()
    if tag == 9:
        return decode_bytes_field_message(s, b"SignBytesRequest", _SignBytesRequest, False)
    raise _DecodeError(f"expected a request, got a {_MESSAGE_NAMES[tag]}")


def decode_request(msg, family):
    """Decode one ``Message`` (without its length prefix) that must carry a request."""
    cdef int fam = fam_code(family)
    cdef bytes data = as_bytes(msg)
    cdef Span payload
    cdef int tag = split_message(data, fam, &payload)
    return decode_request_payload(tag, payload, fam)


def decode_request_for_signing(msg, family):
    """The hot path: ``(request, sign_bytes, extension_sign_bytes)`` in one call (see pb_py)."""
    cdef int fam = fam_code(family)
    cdef bytes data = as_bytes(msg)
    cdef Span payload, chain
    cdef VoteC v
    cdef ProposalC pr
    cdef bint skip
    cdef object ext = None
    cdef int tag = split_message(data, fam, &payload)
    if tag == 3:
        chain_id = parse_sign_vote_request(payload, fam, &v, &chain, &skip)
        sign_bytes = c_vote_sign_bytes(&v, chain)
        req = _SignVoteRequest(py_vote(&v), chain_id, skip)
        if _extension_signature_required(family, req):
            ext = c_vote_extension_sign_bytes(&v, chain)
        return req, sign_bytes, ext
    if tag == 5:
        chain_id = parse_sign_proposal_request(payload, &pr, &chain)
        sign_bytes = c_proposal_sign_bytes(&pr, chain)
        return _SignProposalRequest(py_proposal(&pr), chain_id), sign_bytes, None
    return decode_request_payload(tag, payload, fam), None, None


cdef object decode_pub_key_response(Span s, int fam):
    cdef Rd r = sub_reader(s, b"PubKeyResponse")
    cdef Rd kr
    cdef uint64_t field, kfield
    cdef int wt, kwt
    cdef Span sub, key
    cdef object resp = _PubKeyResponse()
    cdef uint64_t max_variant = 2 if fam == FAM_V0_34 else 3
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            resp.error = rd_error(sub, resp.error)
        elif field == 1 and fam != FAM_V1_0:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            kr = sub_reader(sub, b"PublicKey")
            while kr.pos < kr.end:
                rd_key(&kr, &kfield, &kwt)
                if kfield > max_variant:
                    rd_skip(&kr, kwt)
                    continue
                rd_check(&kr, kfield, kwt, LEN)
                rd_span(&kr, &key)
                resp.key_type = _PUBKEY_NAMES[kfield]
                resp.pub_key = span_bytes(key)
        elif field == 3 and fam == FAM_V1_0:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            resp.pub_key = span_bytes(sub)
        elif field == 4 and fam == FAM_V1_0:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            type_name = span_str(&r, sub, b"pub_key_type")
            if type_name and type_name not in _V1_KEY_NAMES:
                rd_fail(&r, f"unknown pub_key_type {type_name!r}")
            resp.key_type = _V1_KEY_NAMES.get(type_name, "")
        else:
            rd_skip(&r, wt)
    return resp


cdef object decode_signed_vote_response(Span s, int fam):
    cdef Rd r = sub_reader(s, b"SignedVoteResponse")
    cdef uint64_t field
    cdef int wt
    cdef Span sub
    cdef VoteC v
    cdef object error = None
    vote_init(&v)
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_vote(sub, &v, fam)
        elif field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            error = rd_error(sub, error)
        else:
            rd_skip(&r, wt)
    return _SignedVoteResponse(py_vote(&v), error)


cdef object decode_signed_proposal_response(Span s):
    cdef Rd r = sub_reader(s, b"SignedProposalResponse")
    cdef uint64_t field
    cdef int wt
    cdef Span sub
    cdef ProposalC v
    cdef object error = None
    proposal_init(&v)
    while r.pos < r.end:
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            rd_proposal(sub, &v)
        elif field == 2:
            rd_check(&r, field, wt, LEN)
            rd_span(&r, &sub)
            error = rd_error(sub, error)
        else:
            rd_skip(&r, wt)
    return _SignedProposalResponse(py_proposal(&v), error)


def decode_response(msg, family):
    """Decode one ``Message`` (without its length prefix) that must carry a response."""
    cdef int fam = fam_code(family)
    cdef bytes data = as_bytes(msg)
    cdef Span payload
    cdef int tag = split_message(data, fam, &payload)
    if tag == 4:
        return decode_signed_vote_response(payload, fam)
    if tag == 6:
        return decode_signed_proposal_response(payload)
    if tag == 2:
        return decode_pub_key_response(payload, fam)
    if tag == 8:
        rd_skip_all(payload, b"PingResponse")
        return _PingResponse()
    if tag == 10:
        return decode_bytes_field_message(payload, b"SignBytesResponse", _SignBytesResponse, True)
    raise _DecodeError(f"expected a response, got a {_MESSAGE_NAMES[tag]}")


# ---- small public helpers ------------------------------------------------------------------------------

def encode_uvarint(n):
    """Unsigned LEB128 (protobuf varint) encoding of ``0 <= n < 2**64``."""
    if n < 0 or n > 0xFFFFFFFFFFFFFFFF:
        raise OverflowError(f"{n} does not fit an unsigned 64-bit varint")
    cdef uint64_t v = n
    cdef uint8_t* p
    cdef bytes out = new_bytes(vsize(v), &p)
    w_uvarint(p, v)
    return out


def encode_delimited(msg):
    """``uvarint(len(msg)) || msg`` (protobuf delimited form, protocol.md §2.1)."""
    cdef bytes data = as_bytes(msg)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef uint8_t* p
    cdef bytes out = new_bytes(vsize(n) + n, &p)
    p = w_uvarint(p, n)
    memcpy(p, PyBytes_AS_STRING(data), n)
    return out


def decode_uvarint(data, Py_ssize_t pos=0):
    """Read one unsigned varint at ``pos``: ``(value, position after it)``."""
    cdef bytes buf = as_bytes(data)
    cdef Rd r
    cdef uint64_t v
    if pos < 0 or pos > PyBytes_GET_SIZE(buf):
        raise _DecodeError(f"varint offset {pos} outside the {PyBytes_GET_SIZE(buf)}-byte input")
    rd_init(&r, <const uint8_t*>PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf), b"varint")
    r.pos = pos
    rd_uvarint(&r, &v)
    return v, r.pos


def canonical_vote_without_timestamp(sign_bytes, proposal=None):
    """Split stored sign bytes into (canonical body without its timestamp, timestamp)."""
    cdef bytes data = as_bytes(sign_bytes)
    cdef Rd r
    cdef uint64_t length, field
    cdef int wt
    cdef int32_t msg_type = 0
    cdef Py_ssize_t start, end
    cdef Span sub
    cdef TsC ts
    cdef list spans = []
    rd_init(&r, <const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
            b"canonical sign bytes")
    rd_uvarint(&r, &length)
    if length != <uint64_t>(r.end - r.pos):
        rd_fail(&r, f"length prefix {length} but {r.end - r.pos} bytes follow")
    while r.pos < r.end:
        start = r.pos
        rd_key(&r, &field, &wt)
        if field == 1:
            rd_check(&r, field, wt, VARINT)
            rd_int32(&r, &msg_type)
        else:
            rd_skip(&r, wt)
        spans.append((field, start, r.pos))
    if proposal is None:
        proposal = msg_type == PROPOSAL_TYPE
    cdef uint64_t ts_field = 6 if proposal else 5
    cdef bytearray body = bytearray()
    ts.seconds = GO_ZERO_SECONDS
    ts.nanos = 0
    cdef Rd fr
    cdef uint64_t ffield
    for span in spans:
        field, start, end = span
        if field != ts_field:
            body += data[start:end]
            continue
        rd_init(&fr, <const uint8_t*>PyBytes_AS_STRING(data), end, b"canonical sign bytes")
        fr.pos = start
        rd_key(&fr, &ffield, &wt)
        rd_check(&fr, ffield, wt, LEN)
        rd_span(&fr, &sub)
        rd_timestamp(sub, &ts)
    return bytes(body), _Timestamp(ts.seconds, ts.nanos)


# ==== framing (protocol.md §2.1) ========================================================================

cdef class DelimitedReader:
    """Split a byte stream into uvarint length-delimited messages (see pb_py.DelimitedReader)."""

    cdef bytearray _buf
    cdef readonly Py_ssize_t max_size
    cdef object _failed

    def __init__(self, Py_ssize_t max_size):
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self._buf = bytearray()
        self._failed = None

    def buffered(self):
        """Bytes held back waiting for the rest of a message."""
        return PyByteArray_GET_SIZE(self._buf)

    cdef object _fail(self, str problem):
        self._failed = problem
        del self._buf[:]
        return _FrameError(problem)

    cdef Py_ssize_t _scan(self, const uint8_t* p, Py_ssize_t n, list messages) except -1:
        """Append every complete message in p[0:n]; return how many bytes were consumed."""
        cdef Py_ssize_t pos = 0, i, start
        cdef uint64_t length
        cdef uint64_t limit = <uint64_t>self.max_size
        cdef uint8_t b
        while pos < n:
            length = 0
            start = -1
            for i in range(10):
                if pos + i >= n:
                    break
                b = p[pos + i]
                if i == 9 and b > 1:
                    raise self._fail("malformed length prefix: varint overflows 64 bits")
                length |= (<uint64_t>(b & 0x7F)) << (7 * i)
                if length > limit:
                    raise self._fail(
                        f"message length {length}+ exceeds the limit of {self.max_size} bytes")
                if b < 0x80:
                    start = pos + i + 1
                    break
            else:
                raise self._fail("malformed length prefix: varint longer than 10 bytes")
            if start < 0 or <uint64_t>(n - start) < length:
                break  # prefix or body incomplete
            messages.append(PyBytes_FromStringAndSize(<const char*>p + start, <Py_ssize_t>length))
            pos = start + <Py_ssize_t>length
        return pos

    def feed(self, data):
        if self._failed is not None:
            raise _FrameError(f"stream already failed: {self._failed}")
        cdef list messages = []
        cdef Py_ssize_t used
        cdef bytes chunk
        if PyByteArray_GET_SIZE(self._buf) == 0:
            # Nothing pending: split straight out of the caller's buffer.
            chunk = as_bytes(data)
            used = self._scan(<const uint8_t*>PyBytes_AS_STRING(chunk), PyBytes_GET_SIZE(chunk),
                              messages)
            if used < PyBytes_GET_SIZE(chunk):
                self._buf += chunk[used:]
            return messages
        self._buf += data
        used = self._scan(<const uint8_t*>PyByteArray_AS_STRING(self._buf),
                          PyByteArray_GET_SIZE(self._buf), messages)
        if used:
            del self._buf[:used]
        return messages
