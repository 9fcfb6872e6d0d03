"""Single-node durable state (``persist = "local"``): a state file written once per decision.

The state file holds the last sign state of every chain.  Layout of format 2 (integers
little-endian; every region starts on a 4 KiB boundary; ``S`` = slot_size, a multiple of
4 KiB, 4 KiB by default; ``D`` = max(1 MiB, 2 S), the distance between the two copies)::

    0                   file header, written once when the file is created:
                        magic "NEBSTATE" | format u16 = 2 | pairs u16 = 2 | slot_size u32
                        | SHA-256 of those 16 bytes
    4096                copy A of pair 0 (S bytes), then copy A of pair 1
    4096 + D            copy B of pair 0, then copy B of pair 1

    slot:  magic "NBSL" | format u16 | reserved u16 | seq u64 | length u32
           | SHA-256 of (those 20 bytes + payload) | payload (length bytes)

The payload is the JSON the state file held before the slotted formats, compact:
``{"version":1,"chains":{"<chain_id>": {priv_validator_state fields}}}``.

**A commit** makes the next sequence number ``n`` and writes the whole state, as one slot
with that number, to **both copies of pair ``n mod 2``** (two ``pwrite`` calls, a region
apart), then calls ``fdatasync`` **once**.  The other pair keeps the previous state (the
last one released) untouched.  ``commit`` returns the decision only after ``fdatasync``
returned; the service releases a signature only from that decision, so every signature
that leaves is durable first (S1).  The file's size and blocks never change after
creation (the zeros were written, not ``fallocate``'d), so ``fdatasync`` flushes those
data blocks and the device cache and has no metadata to commit.  If ``pwrite`` or
``fdatasync`` fails, ``commit`` raises :class:`StateError`, the in-memory mark does not
move, nothing is released, and the next write re-creates the whole file through the
rename path rather than trusting the descriptor.

**Loading** reads the four slots; a slot is valid if its magic, format, length and
SHA-256 check out and its sequence number's parity is its pair; the highest valid
sequence number wins (when both copies of it are valid they must hold the same payload).

* **A torn write** (a crash before ``fdatasync`` returned) can damage only pair ``n mod
  2``: the other pair still holds the previous state, which is the last one that may have
  been released (the torn decision was not).  Parts of the new slot that did reach the
  disk are either a valid copy of the new state (a mark that is higher than released:
  safe) or invalid.
* **A block that rots later** (after the commit returned and its signature left) damages
  one copy; the other copy, 1 MiB away, holds the same state.  Only losing both copies
  of the newest pair would fall back one decision; the copies are placed a region apart
  so that one failing sector, page or erase unit cannot take both.
* A store that opens a file writes its newest state again, whole (a new sequence
  number, both copies, one ``fdatasync``), before it answers anything: a retry could
  release that state without a write, and it may not be durable.  A torn write can leave
  it in one valid copy only (never released); and after a failed ``fdatasync`` Linux
  keeps the unwritten pages in the page cache but marks them clean, so a process
  restarted without a reboot reads a slot that never reached the disk.
* Every slot invalid (or a corrupted header) is a :class:`StateError`: the signer
  refuses to start rather than start from zero.  Sequence numbers are 64-bit; reaching
  the maximum raises :class:`StateError` instead of wrapping.

One ``fdatasync`` per decision: format 1 (below) wrote the state twice, each write
synced, and cost two.

**Older files.**  Format 1 (two mirrored slots at 4096 and 4096 + S, each commit wrote the
older slot, synced, then the newer one, synced) and the plain JSON of the first release
are still read, and converted to format 2 atomically when a store opens them.  **Creating** the
file (and migrating or growing it) writes the whole image — header, the state in all four
slots (sequence numbers 1 in pair 1 and 2 in pair 0) — to a temporary file, fsyncs it,
renames it over the state file and fsyncs the directory
(:func:`nebula.durable.write_file_durably`); a crash leaves either the previous file or
the complete new one.  A state that does not fit a slot (a vote extension can be up to
1 MiB, and its sign bytes are kept) makes that write re-create the file with larger
slots, up to :data:`MAX_SLOT_SIZE`; beyond that the write is refused with
:class:`StateError`.  The file is mode 0600.

**One process per state file.**  Two stores on one file would each keep their own
mark and could both accept conflicting decisions.  A store holds an exclusive lock on
``<state file>.lock`` (:class:`nebula.durable.ExclusiveLock`) from before it reads
the file until it is closed or its process ends; a second store, in this process or
another, is refused with a :class:`StateError` naming the state file and the pid of
the holder.  :func:`read_states` reads a file without the lock (inspection only: it
never writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from nebula.durable import ExclusiveLock, pwrite_all, read_all, write_file_durably
from nebula.errors import StateError
from nebula.guard import Decision, SignRecord, Verdict, apply
from nebula.state.base import SignLater, SingleNodeStore, record_from_json, record_json_bytes

FORMAT_VERSION = 1
"""Version of the JSON payload (the whole file in the previous format)."""

FILE_MAGIC = b"NEBSTATE"
FILE_FORMAT = 2
"""The format this release writes (format 1 is still read, and converted on a write)."""
FILE_FORMAT_MIRRORED = 1
PAIRS = 2
COPY_DISTANCE = 1 << 20
"""Least distance between the two copies of a slot (a region apart)."""
SLOT_MAGIC = b"NBSL"
SLOT_FORMAT = 1
BLOCK = 4096
HEADER_SIZE = BLOCK
SLOT_SIZE = 4096
"""Slot size of a newly created file."""
MAX_SLOT_SIZE = 16 << 20
"""Largest slot the store grows to (a 1 MiB vote extension's sign bytes fit, in hex)."""
MAX_SEQ = (1 << 64) - 1

_FILE_HDR = struct.Struct("<8sHHI")
_SLOT_HDR = struct.Struct("<4sHHQI")
_DIGEST = 32
FILE_HEADER_LEN = _FILE_HDR.size + _DIGEST
SLOT_PAYLOAD_OFFSET = _SLOT_HDR.size + _DIGEST


def file_header(slot_size: int, fmt: int = FILE_FORMAT) -> bytes:
    """The header at offset 0 of a state file with slots of ``slot_size`` bytes."""
    head = _FILE_HDR.pack(FILE_MAGIC, fmt, PAIRS if fmt == FILE_FORMAT else 0, slot_size)
    return head + hashlib.sha256(head).digest()


def copy_distance(slot_size: int) -> int:
    """Offset of copy B's region from copy A's (format 2)."""
    return max(COPY_DISTANCE, PAIRS * slot_size)


def file_size(slot_size: int, fmt: int = FILE_FORMAT) -> int:
    """The size of a state file (it never changes after creation)."""
    if fmt == FILE_FORMAT_MIRRORED:
        return HEADER_SIZE + 2 * slot_size
    return HEADER_SIZE + copy_distance(slot_size) + PAIRS * slot_size


def slot_offsets(slot_size: int, pair: int) -> tuple[int, int]:
    """File offsets of copy A and copy B of ``pair`` (format 2)."""
    a = HEADER_SIZE + pair * slot_size
    return a, a + copy_distance(slot_size)


def encode_slot(seq: int, payload: bytes, slot_size: int) -> bytearray:
    """A slot's bytes, zero-padded to whole 4 KiB blocks (at most ``slot_size``)."""
    end = SLOT_PAYLOAD_OFFSET + len(payload)
    if end > slot_size:
        raise StateError(f"state of {len(payload)} bytes does not fit a {slot_size}-byte slot")
    if not 0 <= seq <= MAX_SEQ:
        raise StateError(f"slot sequence number {seq} out of range")
    head = _SLOT_HDR.pack(SLOT_MAGIC, SLOT_FORMAT, 0, seq, len(payload))
    h = hashlib.sha256(head)
    h.update(payload)
    buf = bytearray(-(-end // BLOCK) * BLOCK)
    buf[: _SLOT_HDR.size] = head
    buf[_SLOT_HDR.size : SLOT_PAYLOAD_OFFSET] = h.digest()
    buf[SLOT_PAYLOAD_OFFSET:end] = payload
    return buf


def decode_slot(raw: bytes | memoryview) -> tuple[int, bytes] | None:
    """``(seq, payload)`` of a valid slot; None if it is empty, torn or corrupted."""
    if len(raw) < SLOT_PAYLOAD_OFFSET:
        return None
    magic, fmt, _reserved, seq, n = _SLOT_HDR.unpack_from(raw)
    if magic != SLOT_MAGIC or fmt != SLOT_FORMAT or n > len(raw) - SLOT_PAYLOAD_OFFSET:
        return None
    payload = bytes(raw[SLOT_PAYLOAD_OFFSET : SLOT_PAYLOAD_OFFSET + n])
    h = hashlib.sha256(raw[: _SLOT_HDR.size])
    h.update(payload)
    if h.digest() != bytes(raw[_SLOT_HDR.size : SLOT_PAYLOAD_OFFSET]):
        return None
    return seq, payload


@dataclass(slots=True)
class _Image:
    """What a state file holds: the states, and where the newest slot is."""

    states: dict[str, SignRecord] = field(default_factory=dict)
    fmt: int = 0  # 0: the first release's plain JSON; 1: mirrored slots; 2: pairs
    slot_size: int = SLOT_SIZE
    seq: int = 0  # sequence number of the newest slot


def _parse(raw: bytes, path: Path) -> _Image:
    """Decode a whole state file (any format); StateError if it cannot be trusted."""
    if raw[: len(FILE_MAGIC)] != FILE_MAGIC:
        # The first release's format: plain JSON.  Converted on the first write.
        return _Image(_parse_payload(raw, str(path)))
    if len(raw) < FILE_HEADER_LEN:
        raise StateError(f"{path}: state file is truncated; refusing to start")
    _magic, fmt, pairs, slot_size = _FILE_HDR.unpack_from(raw)
    if hashlib.sha256(raw[: _FILE_HDR.size]).digest() != raw[_FILE_HDR.size : FILE_HEADER_LEN]:
        raise StateError(
            f"{path}: state file header is corrupted; refusing to start. Restore it "
            "from a backup or import the last known state with `nebula state import`."
        )
    if fmt not in (FILE_FORMAT_MIRRORED, FILE_FORMAT):
        raise StateError(
            f"{path}: state file format {fmt} is not supported (this Nebula reads "
            f"formats {FILE_FORMAT_MIRRORED} and {FILE_FORMAT})"
        )
    if fmt == FILE_FORMAT and pairs != PAIRS:
        raise StateError(f"{path}: state file header says {pairs} pairs, expected {PAIRS}")
    if slot_size % BLOCK or not BLOCK <= slot_size <= MAX_SLOT_SIZE:
        raise StateError(f"{path}: invalid slot size {slot_size} in the header")
    if len(raw) != file_size(slot_size, fmt):
        raise StateError(
            f"{path}: state file size is {len(raw)} bytes, expected "
            f"{file_size(slot_size, fmt)} (its size never changes); refusing to start"
        )
    view = memoryview(raw)
    # (seq, where, payload) of every valid slot
    valid: list[tuple[int, str, bytes]] = []
    if fmt == FILE_FORMAT_MIRRORED:
        for i in (0, 1):
            off = HEADER_SIZE + i * slot_size
            got = decode_slot(view[off : off + slot_size])
            if got is not None:
                valid.append((got[0], f"slot {i}", got[1]))
    else:
        for pair in range(PAIRS):
            for copy, off in zip("AB", slot_offsets(slot_size, pair), strict=True):
                got = decode_slot(view[off : off + slot_size])
                if got is None:
                    continue
                if got[0] % PAIRS != pair:
                    raise StateError(
                        f"{path}: pair {pair} copy {copy} holds sequence number {got[0]}, "
                        "which belongs to the other pair; refusing to start"
                    )
                valid.append((got[0], f"pair {pair} copy {copy}", got[1]))
    if not valid:
        raise StateError(
            f"{path}: every state slot is corrupted (both state slots are corrupted); "
            "refusing to start (never from zero). Restore the file from a backup or import "
            "the last known state with `nebula state import`."
        )
    valid.sort(key=lambda v: v[0], reverse=True)
    seq, where, payload = valid[0]
    same = [v for v in valid if v[0] == seq]
    if fmt == FILE_FORMAT_MIRRORED and len(same) == 2:
        raise StateError(
            f"{path}: both state slots have sequence number {seq}; refusing to guess which is newer"
        )
    if any(v[2] != payload for v in same):
        raise StateError(
            f"{path}: the two copies of sequence number {seq} differ; refusing to guess"
        )
    states = _parse_payload(payload, f"{path} ({where})")
    return _Image(states, fmt, slot_size, seq)


def _parse_payload(raw: bytes, where: str) -> dict[str, SignRecord]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise StateError(
            f"{where}: state file is corrupted ({e}); refusing to start. Restore it "
            "from a backup or import the last known state with `nebula state import`."
        ) from None
    if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
        raise StateError(f"{where}: not a Nebula state file (version {FORMAT_VERSION})")
    chains = obj.get("chains")
    if not isinstance(chains, dict):
        raise StateError(f"{where}: 'chains' must be an object")
    states: dict[str, SignRecord] = {}
    for chain_id, st in chains.items():
        rec = record_from_json(st, f"{where} chain {chain_id!r}")
        if rec is not None:
            states[chain_id] = rec
    return states


def _open_existing(path: Path, flags: int) -> int | None:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path}: cannot open state file: {e}") from None


def read_states(path: str | Path) -> dict[str, SignRecord]:
    """The sign states in the state file at ``path`` ({} if there is none).

    Reads without taking the store's lock and never writes (``nebula state export`` of a
    stopped node, tests).  A store writing meanwhile cannot make it read a mix: every
    slot is checksummed, and the newest valid one wins.
    """
    p = Path(path)
    fd = _open_existing(p, os.O_RDONLY)
    if fd is None:
        return {}
    try:
        return _parse(read_all(fd), p).states
    except OSError as e:
        raise StateError(f"{p}: cannot read state file: {e}") from None
    finally:
        os.close(fd)


class LocalStore(SingleNodeStore):
    """The ``persist = "local"`` store (see the module docstring)."""

    inline: ClassVar[bool] = True

    def __init__(self, path: str | Path, initial: dict[str, SignRecord | None] | None = None):
        self.path = Path(path)
        self._dir = self.path.parent
        self._states: dict[str, SignRecord] = {}
        self._fd = -1  # the open slot file; -1: the next write (re-)creates the file
        self._closed = False
        self._slot_size = SLOT_SIZE
        self._seq = 0  # sequence number of the newest slot
        # chain -> (its JSON key, the record last encoded, the encoded "key:record")
        self._frags: dict[str, tuple[bytes, SignRecord, bytes]] = {}
        # Group commit: decisions of other chains that arrive after a write in the same
        # loop pass wait for the pass's flush and share one write.
        self._batch: list[tuple[str, SignRecord, asyncio.Future[Decision]]] = []
        self._batch_armed = False
        #: True if this store created the state file (a first start)
        self.created = False
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StateError(f"{self.path}: cannot create the state directory: {e}") from None
        # Before anything is read: one process per state file.
        self._lock: ExclusiveLock | None = ExclusiveLock(
            self.path.with_name(self.path.name + ".lock"), f"state file {self.path}"
        )
        try:
            exists = self._load()
            # An imported initial state only ever raises the high-water mark (S4).
            for chain_id, rec in (initial or {}).items():
                if rec is None:
                    continue
                cur = self._states.get(chain_id)
                if cur is None or rec.hrs > cur.hrs:
                    self._states[chain_id] = rec
            # Written again, whole and synced, before anything is answered, whatever was
            # read: a retry may release the newest state without a new write, and that
            # state may not be durable.  A write torn by a crash can leave it in one copy
            # only; and after a failed fdatasync Linux keeps the unwritten pages in the
            # page cache but marks them clean, so a process restarted without a reboot
            # reads a state that never reached the disk, and a sync alone would have
            # nothing to write.  (An older format is converted on the way.)
            self._write(self._states)
            self.created = not exists
        except BaseException:
            self._release()
            raise

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> bool:
        """Read the state file; False if there is none."""
        fd = _open_existing(self.path, os.O_RDWR)
        if fd is None:
            return False
        try:
            image = _parse(read_all(fd), self.path)
        except OSError as e:
            os.close(fd)
            raise StateError(f"{self.path}: cannot read state file: {e}") from None
        except BaseException:
            os.close(fd)
            raise
        self._states = image.states
        if image.fmt == FILE_FORMAT:
            self._fd = fd
            self._slot_size, self._seq = image.slot_size, image.seq
        else:
            # An older format: converted (through the rename path) on the first write.
            self._slot_size = max(image.slot_size, SLOT_SIZE)
            os.close(fd)
        return True

    def _payload(self, states: dict[str, SignRecord]) -> bytes:
        """``{"version":1,"chains":{<chain>:<record>,...}}`` (chains sorted), compact.

        Each chain's encoded record is kept until that chain's record changes: a
        decision re-encodes only its own chain."""
        frags = self._frags
        items = []
        for chain in sorted(states):
            rec = states[chain]
            cached = frags.get(chain)
            if cached is None or cached[1] is not rec:
                key = json.dumps(chain).encode() if cached is None else cached[0]
                cached = frags[chain] = (key, rec, key + b":" + record_json_bytes(rec))
            items.append(cached[2])
        if len(frags) > len(states):
            for chain in [c for c in frags if c not in states]:
                del frags[chain]
        return b'{"version":%d,"chains":{%s}}' % (FORMAT_VERSION, b",".join(items))

    def _write(self, states: dict[str, SignRecord]) -> None:
        """Make ``states`` durable; raises StateError (then nothing may be released)."""
        if self._closed:
            raise StateError(f"{self.path}: the state store is closed")
        payload = self._payload(states)
        if self._fd < 0 or SLOT_PAYLOAD_OFFSET + len(payload) > self._slot_size:
            self._create(payload)
            return
        seq = self._seq + 1
        if seq > MAX_SEQ:
            raise StateError(f"{self.path}: slot sequence number exhausted")
        # Both copies of pair seq mod 2 (the pair holding the older state), one sync: the
        # other pair keeps the previous state until this one is durable.
        buf = encode_slot(seq, payload, self._slot_size)
        a, b = slot_offsets(self._slot_size, seq % PAIRS)
        try:
            pwrite_all(self._fd, buf, a)
            pwrite_all(self._fd, buf, b)
            os.fdatasync(self._fd)
        except OSError as e:
            # What reached the disk is unknown: re-create the file on the next write.
            self._drop_fd()
            raise StateError(f"{self.path}: cannot persist sign state: {e}") from None
        self._seq = seq

    def _create(self, payload: bytes) -> None:
        """Write a new state file holding ``payload`` and rename it over the old one."""
        slot_size = max(self._slot_size, SLOT_SIZE)
        while SLOT_PAYLOAD_OFFSET + len(payload) > slot_size:
            slot_size *= 2
        if slot_size > MAX_SLOT_SIZE:
            raise StateError(
                f"{self.path}: sign state of {len(payload)} bytes is larger than the "
                f"{MAX_SLOT_SIZE}-byte slot limit; refusing to sign"
            )
        image = bytearray(file_size(slot_size))
        image[:FILE_HEADER_LEN] = file_header(slot_size)
        for seq in (1, 2):  # every slot holds the state from the start
            slot = encode_slot(seq, payload, slot_size)
            for off in slot_offsets(slot_size, seq % PAIRS):
                image[off : off + len(slot)] = slot
        self._drop_fd()
        try:
            write_file_durably(self.path, image, 0o600)
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            # The rename may have happened without being durable: keep no descriptor,
            # so the next write goes through this whole path again.
            raise StateError(f"{self.path}: cannot persist sign state: {e}") from None
        self._fd = fd
        self._slot_size = slot_size
        self._seq = 2

    def _drop_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _release(self) -> None:
        self._drop_fd()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release()

    # -- SignStore ---------------------------------------------------------------------

    def last(self, chain_id: str) -> SignRecord | None:
        return self._states.get(chain_id)

    def all(self) -> dict[str, SignRecord]:
        return dict(self._states)

    async def commit(
        self, chain_id: str, record: SignRecord, sign_later: SignLater | None = None
    ) -> Decision:
        if sign_later is not None:  # (the daemon gives a worker to Raft stores only)
            raise StateError("the local store decides signed records only")
        if not self._batch_armed:
            # The first decision of this loop pass is written at once; the ones that
            # arrive later in the same pass (other chains) share the flush's one write.
            decision = self.commit_sync(chain_id, record)
            loop = asyncio._get_running_loop()
            if loop is not None:  # (a coroutine driven by hand has no loop: no batching)
                self._batch_armed = True
                loop.call_soon(self._flush)
            return decision
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._batch.append((chain_id, record, fut))
        return await fut

    def _flush(self) -> None:
        """Decide every waiting commit in arrival order and make them durable together."""
        self._batch_armed = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        states = dict(self._states)
        decisions: list[Decision] = []
        changed = False
        for chain_id, record, _fut in batch:
            new, decision = apply(states.get(chain_id), record)
            if decision.verdict == Verdict.ACCEPT and new is not None:
                states[chain_id] = new
                changed = True
            decisions.append(decision)
        try:
            if changed:
                self._write(states)  # raises StateError: nothing of the batch is released
        except StateError as e:
            for _c, _r, fut in batch:
                if not fut.done():
                    fut.set_exception(StateError(str(e)))
            return
        self._states = states
        for (_c, _r, fut), decision in zip(batch, decisions, strict=True):
            if not fut.done():  # a cancelled waiter: its decision stands, nothing released
                fut.set_result(decision)

    def commit_sync(self, chain_id: str, record: SignRecord) -> Decision:
        cur = self._states.get(chain_id)
        new, decision = apply(cur, record)
        if decision.verdict == Verdict.ACCEPT and new is not None:
            states = dict(self._states)
            states[chain_id] = new
            self._write(states)  # raises StateError: nothing is released
            self._states = states
        return decision

    async def raise_to(self, chain_id: str, record: SignRecord) -> bool:
        return self.force_import(chain_id, record)

    def force_import(self, chain_id: str, rec: SignRecord | None) -> bool:
        """Raise the high-water mark to ``rec`` (never lowers it); True if it moved."""
        if rec is None:
            return False
        cur = self._states.get(chain_id)
        if cur is not None and rec.hrs <= cur.hrs:
            return False
        states = dict(self._states)
        states[chain_id] = rec
        self._write(states)
        self._states = states
        return True

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:
        """Close the file and release the lock (the store refuses every write after)."""
        self._closed = True
        batch, self._batch = self._batch, []
        for _c, _r, fut in batch:
            if not fut.done():
                fut.set_exception(StateError(f"{self.path}: the state store is closed"))
        self._release()
