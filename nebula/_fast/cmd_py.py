"""Sign-state log commands: the byte codec and the state machine's apply (pure twin).

The format is documented in :mod:`nebula.raft.commands`.  ``apply`` is what every
member runs for every committed SIGN / RAISE / TSIGN entry: decode, then the guard's
check-and-set (:func:`nebula.guard.apply`) against the chain's stored record.  The
compiled twin (``_cmd.pyx``) gives the same results, byte for byte and decision for
decision (tests/fuzz/test_fuzz_cmd.py compares them).
"""

from __future__ import annotations

import struct

from nebula.errors import StateError
from nebula.guard import Decision, SignRecord
from nebula.guard import apply as guard_apply

VERSION = 1
OP_SIGN = 1
OP_RAISE = 2
OP_TSIGN = 3
_OPS = (OP_SIGN, OP_RAISE, OP_TSIGN)

_HEAD = struct.Struct("<BB")
_HRS = struct.Struct("<QIB")
_HRS_LEN = struct.Struct("<QIBI")  # height, round, step, then the sign bytes' length
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def record_bytes(chain: bytes, rec: SignRecord) -> bytes:
    """``chain (u16 length + bytes) | height | round | step | 4 length-prefixed fields``."""
    return _record_bytes(
        chain,
        rec.height,
        rec.round,
        rec.step,
        rec.sign_bytes,
        rec.signature,
        rec.ext_sign_bytes,
        rec.ext_signature,
    )


def _record_bytes(
    chain: bytes,
    height: int,
    round: int,
    step: int,
    sign_bytes: bytes,
    signature: bytes,
    ext_sign_bytes: bytes,
    ext_signature: bytes,
) -> bytes:
    if len(chain) > 0xFFFF:
        raise StateError("chain id too long")
    try:
        parts = [_U16.pack(len(chain)), chain, _HRS.pack(height, round, step)]
        for b in (sign_bytes, signature, ext_sign_bytes, ext_signature):
            parts.append(_U32.pack(len(b)))
            parts.append(b)
    except struct.error as e:
        raise StateError(f"sign record out of range: {e}") from None
    return b"".join(parts)


def read_record(buf: bytes, off: int) -> tuple[bytes, SignRecord, int]:
    """(chain, record, offset after it) of the record at ``off``; StateError when it is
    truncated or its step is out of range."""
    try:
        # Slices of ``buf`` (bytes): a slice past the end comes back short, which is checked.
        (n,) = _U16.unpack_from(buf, off)
        off += 2
        chain = buf[off : off + n]
        if len(chain) != n:
            raise StateError("truncated chain id")
        off += n
        h, r, s, m = _HRS_LEN.unpack_from(buf, off)
        off += _HRS_LEN.size
        if s > 3:
            raise StateError(f"step {s} out of range")
        fields = [buf[off : off + m]]
        off += m
        for _ in range(3):  # signature, extension sign bytes, extension signature
            (m,) = _U32.unpack_from(buf, off)
            off += 4
            fields.append(buf[off : off + m])
            off += m
    except struct.error:
        raise StateError("truncated record") from None
    if off > len(buf):
        raise StateError("truncated field")
    return chain, SignRecord(h, r, s, *fields), off


def encode_command(op: int, chain: bytes, rec: SignRecord) -> bytes:
    if op not in _OPS:
        raise ValueError(f"unknown op {op}")
    return _HEAD.pack(VERSION, op) + record_bytes(chain, rec)


def encode_signed(
    op: int, chain: bytes, rec: SignRecord, signature: bytes, ext_signature: bytes
) -> bytes:
    """:func:`encode_command` of ``rec`` with its signatures replaced by these (the record
    a signing thread's signatures complete, without building it)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op}")
    return _HEAD.pack(VERSION, op) + _record_bytes(
        chain,
        rec.height,
        rec.round,
        rec.step,
        rec.sign_bytes,
        signature,
        rec.ext_sign_bytes,
        ext_signature,
    )


def decode_command(data: bytes) -> tuple[int, bytes, SignRecord]:
    """(op, chain, record); StateError for anything this release cannot read."""
    buf = bytes(data)
    if len(buf) < 2:
        raise StateError("malformed log command: shorter than its header")
    version, op = _HEAD.unpack_from(buf, 0)
    if version != VERSION:
        raise StateError(f"log command version {version} is not known to this release")
    if op not in _OPS:
        raise StateError(f"log command op {op} is not known to this release")
    chain, rec, off = read_record(buf, _HEAD.size)
    if off != len(buf):
        raise StateError("malformed log command: trailing bytes")
    return op, chain, rec


def apply(states: dict[bytes, SignRecord], data: bytes) -> Decision | bool:
    """Apply one committed command to ``states`` (chain -> last record).

    SIGN and TSIGN: the guard's check-and-set (TSIGN: ``deterministic``, the record has
    no signature yet); returns its :class:`~nebula.guard.Decision`.  RAISE (an import):
    only ever raises the mark; returns whether it did.  StateError for a command this
    release cannot read (``states`` unchanged)."""
    op, chain, rec = decode_command(data)
    cur = states.get(chain)
    if op == OP_SIGN or op == OP_TSIGN:
        new, decision = guard_apply(cur, rec, deterministic=op == OP_TSIGN)
        if new is not None and new is not cur:
            states[chain] = new
        return decision
    if cur is None or rec.hrs > cur.hrs:
        states[chain] = rec
        return True
    return False
