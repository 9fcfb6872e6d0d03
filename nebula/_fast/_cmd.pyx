# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Sign-state log commands, compiled twin of ``cmd_py.py``.

The byte codec reads and writes the command in C, and builds the SignRecord and
Decision objects without running the frozen dataclasses' ``__init__`` (which sets each
field through ``object.__setattr__``): the instance is made and its slots are filled
directly.  ``apply`` decides the common case itself, a record strictly above the stored
one that carries its sign bytes and signature (TSIGN: sign bytes); every other case goes
to :func:`nebula.guard.apply` exactly as the pure twin does.  Results, errors and bytes
are identical to the pure twin (tests/fuzz/test_fuzz_cmd.py compares them).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.object cimport PyObject
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from nebula.errors import StateError
from nebula.guard import Decision, SignRecord, Verdict
from nebula.guard import apply as guard_apply

cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object o, object name, object value) except -1

VERSION = 1
OP_SIGN = 1
OP_RAISE = 2
OP_TSIGN = 3

cdef object _new = object.__new__
cdef object _ACCEPT = Verdict.ACCEPT
cdef object _Record = SignRecord
cdef object _Decision = Decision
cdef object _guard_apply = guard_apply
cdef object _StateError = StateError

cdef str _H = "height"
cdef str _R = "round"
cdef str _S = "step"
cdef str _SB = "sign_bytes"
cdef str _SIG = "signature"
cdef str _ESB = "ext_sign_bytes"
cdef str _ESIG = "ext_signature"
cdef str _V = "verdict"
cdef str _REC = "record"
cdef str _TS = "timestamp"
cdef str _ERR = "error"


cdef inline object _make_record(object h, object r, object s, bytes sb, bytes sig,
                                bytes esb, bytes esig):
    rec = _new(_Record)
    PyObject_GenericSetAttr(rec, _H, h)
    PyObject_GenericSetAttr(rec, _R, r)
    PyObject_GenericSetAttr(rec, _S, s)
    PyObject_GenericSetAttr(rec, _SB, sb)
    PyObject_GenericSetAttr(rec, _SIG, sig)
    PyObject_GenericSetAttr(rec, _ESB, esb)
    PyObject_GenericSetAttr(rec, _ESIG, esig)
    return rec


cdef inline object _accepted(object rec):
    d = _new(_Decision)
    PyObject_GenericSetAttr(d, _V, _ACCEPT)
    PyObject_GenericSetAttr(d, _REC, rec)
    PyObject_GenericSetAttr(d, _TS, None)
    PyObject_GenericSetAttr(d, _ERR, None)
    return d


cdef inline uint32_t _u32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t _u64(const uint8_t *p) noexcept nogil:
    return <uint64_t>_u32(p) | (<uint64_t>_u32(p + 4) << 32)


cdef inline uint8_t *_put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF
    return p + 4


cdef inline uint8_t *_put_field(uint8_t *p, bytes b):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    p = _put32(p, <uint32_t>n)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef inline bytes _b(object x):
    return x if type(x) is bytes else bytes(x)


cdef bytes _encode(int op, object chain, object height, object round, object step,
                   object sign_bytes, object signature, object ext_sign_bytes,
                   object ext_signature, bint head):
    cdef bytes c = _b(chain)
    cdef bytes sb = _b(sign_bytes)
    cdef bytes sig = _b(signature)
    cdef bytes esb = _b(ext_sign_bytes)
    cdef bytes esig = _b(ext_signature)
    cdef Py_ssize_t nc = PyBytes_GET_SIZE(c)
    if nc > 0xFFFF:
        raise _StateError("chain id too long")
    cdef uint64_t h
    cdef uint32_t r
    cdef uint8_t s
    try:
        h = height
        r = round
        s = step
    except OverflowError as e:
        raise _StateError(f"sign record out of range: {e}") from None
    for f in (sb, sig, esb, esig):
        if PyBytes_GET_SIZE(f) > 0xFFFFFFFF:
            raise _StateError("sign record out of range: field too long")
    cdef Py_ssize_t total = (2 if head else 0) + 2 + nc + 13 + 16 + (
        PyBytes_GET_SIZE(sb) + PyBytes_GET_SIZE(sig) + PyBytes_GET_SIZE(esb)
        + PyBytes_GET_SIZE(esig)
    )
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    if head:
        p[0] = 1
        p[1] = <uint8_t>op
        p += 2
    p[0] = nc & 0xFF
    p[1] = (nc >> 8) & 0xFF
    p += 2
    memcpy(p, PyBytes_AS_STRING(c), nc)
    p += nc
    p = _put32(p, <uint32_t>(h & 0xFFFFFFFF))
    p = _put32(p, <uint32_t>(h >> 32))
    p = _put32(p, r)
    p[0] = s
    p += 1
    p = _put_field(p, sb)
    p = _put_field(p, sig)
    p = _put_field(p, esb)
    p = _put_field(p, esig)
    return out


def record_bytes(chain, rec):
    return _encode(0, chain, rec.height, rec.round, rec.step, rec.sign_bytes, rec.signature,
                   rec.ext_sign_bytes, rec.ext_signature, False)


def encode_command(int op, chain, rec):
    if op != 1 and op != 2 and op != 3:
        raise ValueError(f"unknown op {op}")
    return _encode(op, chain, rec.height, rec.round, rec.step, rec.sign_bytes, rec.signature,
                   rec.ext_sign_bytes, rec.ext_signature, True)


def encode_signed(int op, chain, rec, signature, ext_signature):
    if op != 1 and op != 2 and op != 3:
        raise ValueError(f"unknown op {op}")
    return _encode(op, chain, rec.height, rec.round, rec.step, rec.sign_bytes, signature,
                   rec.ext_sign_bytes, ext_signature, True)


cdef tuple _read(bytes buf, Py_ssize_t off):
    """(chain, record, offset after it); the pure twin's errors, in its order."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
    cdef const uint8_t *b = <const uint8_t *>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n, m
    cdef Py_ssize_t starts[4]
    cdef Py_ssize_t lens[4]
    cdef int k
    if off < 0 or off + 2 > size:
        raise _StateError("truncated record")
    n = <Py_ssize_t>b[off] | (<Py_ssize_t>b[off + 1] << 8)
    off += 2
    if off + n > size:
        raise _StateError("truncated chain id")
    cdef Py_ssize_t chain_at = off
    off += n
    if off + 17 > size:
        raise _StateError("truncated record")
    cdef uint64_t h = _u64(b + off)
    cdef uint32_t r = _u32(b + off + 8)
    cdef uint8_t s = b[off + 12]
    m = <Py_ssize_t>_u32(b + off + 13)
    off += 17
    if s > 3:
        raise _StateError(f"step {s} out of range")
    starts[0] = off
    lens[0] = m
    off += m
    for k in range(1, 4):
        if off + 4 > size:
            raise _StateError("truncated record")
        m = <Py_ssize_t>_u32(b + off)
        off += 4
        starts[k] = off
        lens[k] = m
        off += m
    if off > size:
        raise _StateError("truncated field")
    cdef const char *cb = <const char *>b
    chain = PyBytes_FromStringAndSize(cb + chain_at, n)
    rec = _make_record(
        h, r, s,
        PyBytes_FromStringAndSize(cb + starts[0], lens[0]),
        PyBytes_FromStringAndSize(cb + starts[1], lens[1]),
        PyBytes_FromStringAndSize(cb + starts[2], lens[2]),
        PyBytes_FromStringAndSize(cb + starts[3], lens[3]),
    )
    return chain, rec, off


def read_record(buf, Py_ssize_t off):
    return _read(_b(buf), off)


cdef tuple _decode(object data):
    cdef bytes buf = data if type(data) is bytes else bytes(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(buf)
    if size < 2:
        raise _StateError("malformed log command: shorter than its header")
    cdef const uint8_t *b = <const uint8_t *>PyBytes_AS_STRING(buf)
    if b[0] != 1:
        raise _StateError(f"log command version {b[0]} is not known to this release")
    cdef int op = b[1]
    if op != 1 and op != 2 and op != 3:
        raise _StateError(f"log command op {op} is not known to this release")
    chain, rec, off = _read(buf, 2)
    if off != size:
        raise _StateError("malformed log command: trailing bytes")
    return op, chain, rec


def decode_command(data):
    return _decode(data)


def apply(dict states, data):
    op, chain, rec = _decode(data)
    cdef PyObject *found = PyDict_GetItem(states, chain)
    cur = <object>found if found is not NULL else None
    cdef bint det
    if op == 1 or op == 3:
        det = op == 3
        if rec.sign_bytes and (det or rec.signature) and (
            cur is None or (rec.height, rec.round, rec.step) > (cur.height, cur.round, cur.step)
        ):
            # Strictly above the stored record and complete: guard.apply's ACCEPT.
            PyDict_SetItem(states, chain, rec)
            return _accepted(rec)
        new, decision = _guard_apply(cur, rec, deterministic=det)
        if new is not None and new is not cur:
            states[chain] = new
        return decision
    if cur is None or (rec.height, rec.round, rec.step) > (cur.height, cur.round, cur.step):
        states[chain] = rec
        return True
    return False
