"""Versioned log commands and snapshot data of the sign state machine (no pickle).

A log command (the data of a normal Raft entry)::

    version u8 = 1 | op u8 | chain (u16 length + bytes) | height u64 | round u32 | step u8
    | sign_bytes, signature, ext_sign_bytes, ext_signature (each u32 length + bytes)

``op`` 1 = SIGN (check-and-set through the guard), 2 = RAISE (an import: only ever raises
the mark), 3 = TSIGN (threshold BLS: the guard's check-and-set on the sign bytes, the
record carries no signature: it is combined from the members' shares after the commit;
see nebula/state/threshold.py).  Only a threshold-BLS chain writes op 3, and only a
release that has it can be configured for one, so every member reads it.  Snapshot data::

    b"NBSM" | version u8 = 1 | count u32 | count x (chain, height, round, step, 4 byte strings)
    | members u32 | members x (node id u64, address u16 length + bytes)

(the members section: the Raft addresses of members added with ``nebula cluster add``,
so a restarted member can reach them without editing its config).

Compatibility rule (rolling upgrades, also in the README's "Rolling upgrades and
formats"): a release decodes every version it ever wrote.  A release that adds a command
version or op (a) still *writes* the old version while any member may run the previous
release, and (b) switches only when the operator raises the written version (a ``[raft]``
key that release adds; version 1 is the only one so far) after every member runs it.  A
committed entry a member cannot decode stops that member (fail closed) rather than
letting its state diverge.  Transport frames carry their own version in the handshake.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from nebula import _fast
from nebula.errors import StateError
from nebula.guard import SignRecord

# The byte codec and the state machine's apply: a compiled kernel with a pure twin
# (nebula/_fast/cmd_py.py is the specification).
_k = _fast.load("cmd")
VERSION: int = _k.VERSION
OP_SIGN: int = _k.OP_SIGN
OP_RAISE: int = _k.OP_RAISE
OP_TSIGN: int = _k.OP_TSIGN

#: (op, chain, record)
Command = tuple[int, bytes, SignRecord]

encode_command = _k.encode_command
#: ``encode_command(op, chain, rec)`` with the record's signatures replaced.
encode_signed = _k.encode_signed
#: (op, chain, record); StateError for anything this release cannot read.
decode_command = _k.decode_command
#: Apply one committed command to ``states`` (chain -> record): a Decision, or for
#: RAISE whether it raised the mark; StateError (``states`` unchanged) if unreadable.
apply_command = _k.apply
_record_bytes = _k.record_bytes
_read_record = _k.read_record

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SNAP_MAGIC = b"NBSM"

_U64 = struct.Struct("<Q")


def encode_states(
    states: Mapping[bytes, SignRecord], members: Mapping[int, str] | None = None
) -> bytes:
    parts = [_SNAP_MAGIC, bytes([VERSION]), _U32.pack(len(states))]
    for chain in sorted(states):
        parts.append(_record_bytes(chain, states[chain]))
    members = members or {}
    parts.append(_U32.pack(len(members)))
    for nid in sorted(members):
        addr = members[nid].encode()
        parts += [_U64.pack(nid), _U16.pack(len(addr)), addr]
    return b"".join(parts)


def decode_states(data: bytes) -> tuple[dict[bytes, SignRecord], dict[int, str]]:
    """(states per chain, member addresses) of snapshot data."""
    buf = bytes(data)
    if buf[:4] != _SNAP_MAGIC:
        raise StateError("snapshot data: bad magic")
    if len(buf) < 9 or buf[4] != VERSION:
        raise StateError(f"snapshot data version {buf[4] if len(buf) > 4 else '?'} unknown")
    try:
        (count,) = _U32.unpack_from(buf, 5)
        off = 9
        out: dict[bytes, SignRecord] = {}
        for _ in range(count):
            chain, rec, off = _read_record(buf, off)
            if chain in out:
                raise StateError("snapshot data: duplicate chain")
            out[chain] = rec
        members: dict[int, str] = {}
        (count,) = _U32.unpack_from(buf, off)
        off += 4
        for _ in range(count):
            (nid,) = _U64.unpack_from(buf, off)
            (n,) = _U16.unpack_from(buf, off + 8)
            off += 10
            addr = buf[off : off + n]
            if len(addr) != n:
                raise StateError("snapshot data: truncated member address")
            off += n
            members[nid] = addr.decode()
    except (struct.error, UnicodeDecodeError) as e:
        raise StateError(f"malformed snapshot data: {e}") from None
    if off != len(buf):
        raise StateError("malformed snapshot data: trailing bytes")
    return out, members
