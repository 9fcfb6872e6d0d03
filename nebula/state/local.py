"""Single-node durable state (``persist = "local"``): a double-slot state file.

The state file holds the last sign state of every chain.  Layout (integers
little-endian; every region starts on a 4 KiB boundary)::

    0                   file header, written once when the file is created:
                        magic "NEBSTATE" | format u16 | reserved u16 | slot_size u32
                        | SHA-256 of those 16 bytes
    4096                slot 0 (slot_size bytes, a multiple of 4 KiB; 4 KiB by default)
    4096 + slot_size    slot 1

    slot:  magic "NBSL" | format u16 | reserved u16 | seq u64 | length u32
           | SHA-256 of (those 20 bytes + payload) | payload (length bytes)

The payload is the JSON the state file held before this format, compact:
``{"version":1,"chains":{"<chain_id>": {priv_validator_state fields}}}``.

**Creating** the file (and migrating or growing it, below) writes the whole image
— header, the state in both slots with sequence numbers 1 and 2 — to a temporary
file, fsyncs it, renames it over the state file and fsyncs the directory
(:func:`nebula.durable.write_file_durably`).  A crash leaves either the previous file
or the complete new one.  The file is then opened and kept open for the life of the
store.

**A commit** writes the new state twice, mirrored: first over the slot with the
lower sequence number (next sequence number), ``fdatasync``; then over the other slot
(the number after that), ``fdatasync``.  The file's size and blocks never change
after creation (the zeros were written, not ``fallocate``'d, so no unwritten extent
has to be converted), so ``fdatasync`` flushes those data blocks and the device
cache and has no metadata to commit.  ``commit`` returns the decision only after
both ``fdatasync`` calls returned; the service releases a signature only from that
decision, so every signature that leaves is durable first (S1), and after every
completed commit **both** slots hold the released state.  If ``pwrite`` or
``fdatasync`` fails, ``commit`` raises :class:`StateError`, the in-memory mark does
not move, nothing is released, and the next write re-creates the whole file through
the rename path rather than trusting the descriptor.

**Loading** reads both slots; a slot is valid if its magic, format, length and
SHA-256 check out, and the valid slot with the higher sequence number wins.  Because
every completed commit leaves the released state in both slots, losing either slot
— a write torn by a crash, or a block that rots later — never loses a state whose
signature was released: a crash during the first write leaves the previous
(released) state in the other slot, and the torn decision was never released; a
crash between the writes or during the second leaves the new state in the first
slot.  (A single ping-pong write would be torn-write safe but would silently fall
back one decision if the newest slot rotted after its signature had left.)  Both
slots invalid (or a corrupted header) is a :class:`StateError`: the signer refuses
to start rather than start from zero.  Sequence numbers are 64-bit; reaching the
maximum raises :class:`StateError` instead of wrapping.

A state file in the previous format (plain JSON, rewritten through a temporary
file on every commit) is still read, and converted to this format atomically
(the creation path) on the first write.  A state that does not fit a slot (a
vote extension can be up to 1 MiB, and its sign bytes are kept) makes that write
re-create the file with larger slots, up to :data:`MAX_SLOT_SIZE`; beyond that
the write is refused with :class:`StateError`.  The file is mode 0600.

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

from nebula.durable import ExclusiveLock, pwrite_all, read_all, write_file_durably
from nebula.errors import StateError
from nebula.guard import Decision, SignRecord, Verdict, apply
from nebula.state.base import SingleNodeStore, record_from_json, record_to_json

FORMAT_VERSION = 1
"""Version of the JSON payload (the whole file in the previous format)."""

FILE_MAGIC = b"NEBSTATE"
FILE_FORMAT = 1
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


def file_header(slot_size: int) -> bytes:
    """The header at offset 0 of a state file with slots of ``slot_size`` bytes."""
    head = _FILE_HDR.pack(FILE_MAGIC, FILE_FORMAT, 0, slot_size)
    return head + hashlib.sha256(head).digest()


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
    slotted: bool = False  # False: the previous (plain JSON) format
    slot_size: int = SLOT_SIZE
    seq: int = 0  # sequence number of the newest slot
    cur: int = 0  # index of the newest slot


def _parse(raw: bytes, path: Path) -> _Image:
    """Decode a whole state file (either format); StateError if it cannot be trusted."""
    if raw[: len(FILE_MAGIC)] != FILE_MAGIC:
        # The previous format: plain JSON.  Converted on the first write.
        return _Image(_parse_payload(raw, str(path)))
    if len(raw) < FILE_HEADER_LEN:
        raise StateError(f"{path}: state file is truncated; refusing to start")
    _magic, fmt, _reserved, slot_size = _FILE_HDR.unpack_from(raw)
    if hashlib.sha256(raw[: _FILE_HDR.size]).digest() != raw[_FILE_HDR.size : FILE_HEADER_LEN]:
        raise StateError(
            f"{path}: state file header is corrupted; refusing to start. Restore it "
            "from a backup or import the last known state with `nebula state import`."
        )
    if fmt != FILE_FORMAT:
        raise StateError(
            f"{path}: state file format {fmt} is not supported (this Nebula reads "
            f"format {FILE_FORMAT})"
        )
    if slot_size % BLOCK or not BLOCK <= slot_size <= MAX_SLOT_SIZE:
        raise StateError(f"{path}: invalid slot size {slot_size} in the header")
    if len(raw) != HEADER_SIZE + 2 * slot_size:
        raise StateError(
            f"{path}: state file size is {len(raw)} bytes, expected "
            f"{HEADER_SIZE + 2 * slot_size} (its size never changes); refusing to start"
        )
    view = memoryview(raw)
    valid: list[tuple[int, int, bytes]] = []
    for i in (0, 1):
        off = HEADER_SIZE + i * slot_size
        got = decode_slot(view[off : off + slot_size])
        if got is not None:
            valid.append((got[0], i, got[1]))
    if not valid:
        raise StateError(
            f"{path}: both state slots are corrupted; refusing to start (never from "
            "zero). Restore the file from a backup or import the last known state with "
            "`nebula state import`."
        )
    valid.sort(reverse=True)
    if len(valid) == 2 and valid[0][0] == valid[1][0]:
        raise StateError(
            f"{path}: both state slots have sequence number {valid[0][0]}; "
            "refusing to guess which is newer"
        )
    seq, idx, payload = valid[0]
    states = _parse_payload(payload, f"{path} (slot {idx})")
    return _Image(states, True, slot_size, seq, idx)


def _parse_payload(raw: bytes, where: str) -> dict[str, SignRecord]:
    try:
        obj = json.loads(raw)
    except ValueError as e:
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

    def __init__(self, path: str | Path, initial: dict[str, SignRecord | None] | None = None):
        self.path = Path(path)
        self._dir = self.path.parent
        self._states: dict[str, SignRecord] = {}
        self._fd = -1  # the open slot file; -1: the next write (re-)creates the file
        self._closed = False
        self._slot_size = SLOT_SIZE
        self._seq = 0  # sequence number of the current slot
        self._cur = 0  # index of the slot holding the current state
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
            changed = False
            for chain_id, rec in (initial or {}).items():
                if rec is None:
                    continue
                cur = self._states.get(chain_id)
                if cur is None or rec.hrs > cur.hrs:
                    self._states[chain_id] = rec
                    changed = True
            if changed or not exists:
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
        if image.slotted:
            self._fd = fd
            self._slot_size, self._seq, self._cur = image.slot_size, image.seq, image.cur
        else:
            os.close(fd)  # the previous format: converted on the first write
        return True

    @staticmethod
    def _payload(states: dict[str, SignRecord]) -> bytes:
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "chains": {c: record_to_json(r) for c, r in sorted(states.items())},
            },
            separators=(",", ":"),
        ).encode()

    def _write(self, states: dict[str, SignRecord]) -> None:
        """Make ``states`` durable; raises StateError (then nothing may be released)."""
        if self._closed:
            raise StateError(f"{self.path}: the state store is closed")
        payload = self._payload(states)
        if self._fd < 0 or SLOT_PAYLOAD_OFFSET + len(payload) > self._slot_size:
            self._create(payload)
            return
        seq = self._seq + 1
        if seq + 1 > MAX_SEQ:
            raise StateError(f"{self.path}: slot sequence number exhausted")
        # Mirrored: the new state goes to the older slot first, then over the newer one,
        # each made durable before the next step, so that after every completed commit
        # BOTH slots hold the state that may be released.
        first = 1 - self._cur
        try:
            for i, slot in enumerate((first, self._cur)):
                buf = encode_slot(seq + i, payload, self._slot_size)
                pwrite_all(self._fd, buf, HEADER_SIZE + slot * self._slot_size)
                os.fdatasync(self._fd)
        except OSError as e:
            # What reached the disk is unknown: re-create the file on the next write.
            self._drop_fd()
            raise StateError(f"{self.path}: cannot persist sign state: {e}") from None
        self._seq = seq + 1
        # self._cur (the slot with the highest sequence number) is unchanged.

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
        image = bytearray(HEADER_SIZE + 2 * slot_size)
        image[:FILE_HEADER_LEN] = file_header(slot_size)
        for i in (0, 1):  # both slots hold the state from the start
            slot = encode_slot(1 + i, payload, slot_size)
            off = HEADER_SIZE + i * slot_size
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
        self._cur = 1

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

    async def commit(self, chain_id: str, record: SignRecord) -> Decision:
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
