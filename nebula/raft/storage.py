"""Durable Raft log storage: entries, hard state and snapshots for raft-rs's Ready contract.

What raft-rs needs persisted, and how :class:`RaftLog` provides it:

* ``append(entries, hard_state)`` writes **one record** (no sync) holding a batch of
  entries (an entry whose index is <= the last index replaces that index and everything
  after it) and, optionally, the new hard state.  A record is whole or torn, never half.
* ``sync()`` is **one** ``fdatasync``; afterwards everything appended is durable.  The
  node appends once per Ready and syncs once, before it sends anything that depends on it.
* ``save_snapshot`` (the local state machine's snapshot: compaction) and
  ``apply_snapshot`` (a snapshot from the leader: the whole log replaced) are durable
  before they return.
* On restart :meth:`RaftLog.load` returns the latest snapshot (or None), the hard state and
  the entries after the snapshot index, contiguous.

Nothing here decides *when* to compact: a log only shrinks through ``save_snapshot``; the
caller watches :meth:`RaftLog.stats` (``bytes``, ``entries``) and decides.

On-disk format, version 1
=========================

A directory (created mode 0700) holding::

    raft.log    the record log (mode 0600)
    raft.snap   the latest snapshot, if any (mode 0600)
    raft.lock   an flock held while a RaftLog is open (the holder's pid inside)
    *.tmp       leftovers of an interrupted rewrite; deleted when the log is opened

Integers are little-endian (``struct``), byte strings raw; no pickle, no JSON.  CRC is
CRC-32 (IEEE 802.3, ``zlib.crc32``: in the standard library, and checksummed well below a
microsecond per record).

**raft.log** starts with a 64-byte header::

    0   magic   8s   b"NEBRAFT1"
    8   version u16  1 (FORMAT_VERSION)
    10  flags   u16  0
    12  reserved u32 0
    16  base_index u64   the snapshot index this log continues (0: no snapshot)
    24  base_term  u64   that snapshot's term (0: no snapshot)
    32  28 zero bytes
    60  crc u32      CRC-32 of bytes 0..60

A file whose magic is not ``NEBRAFT1`` or whose version is not 1 is refused with a
message (a newer format is never guessed at); a header whose CRC fails is refused.

Then records, back to back from offset 64::

    len u32 | crc u32 | kind u8 | payload (len bytes)

``crc`` is CRC-32 over ``len`` (its 4 bytes), ``kind`` and the payload.  Kinds:

* ``1`` BATCH, one per :meth:`RaftLog.append` call::

      synced u64 | flags u8 | [term u64 | vote u64 | commit u64 if flags & 1]
      | first_index u64 | count u32
      | count x (term u64 | type u8 | data_len u32 | context_len u32 | data | context)

  Entry ``i`` has index ``first_index + i``.  Replayed in file order: the batch's entries
  replace every entry from ``first_index`` on; the hard state, if present, replaces the
  previous one.

* ``2`` SEAL, ``synced u64``: written (and synced) by :meth:`RaftLog.seal` and
  :meth:`RaftLog.close` once everything before it is durable.

``synced`` is the **synced mark** when the record was written: the end offset of the
file's content that a completed ``fdatasync`` had made durable (64 in a fresh file).
Marks never decrease and a mark never exceeds its record's own offset.

Past the last record the file holds zeros: the log **preallocates** ``segment_prealloc``
bytes ahead by writing zero-filled blocks (written, not ``fallocate``'d: no unwritten
extent to convert), so that an append overwrites allocated blocks and its ``fdatasync``
has no allocation or size change to commit.  Measured on the development machine (ext4
on virtio, 2 shared cores; ``pwrite`` + ``fdatasync`` per record): raw 200-byte records,
p50 ~240 us appending to a growing file against ~170 us overwriting zeroed blocks;
through :class:`RaftLog` (one 150-byte entry and a hard state per Ready), p50 ~170-190 us
with ``segment_prealloc=0`` against ~115-135 us with 1 MiB, and 60-70 against 40-47 us of
CPU per Ready.  The Python part of an append (checks, encoding, CRC) is ~5 us.

**raft.snap**, written through :func:`nebula.durable.write_file_durably` (temporary file,
``fsync``, ``rename``, directory ``fsync``)::

    magic 8s b"NEBRSNP1" | version u16 = 1 | flags u16 | reserved u32 = 0
    | index u64 | term u64 | n_voters u32 | n_learners u32 | data_len u64
    | n_voters x u64 | n_learners x u64 | data | crc u32 (CRC-32 of everything before it)

``flags`` bit 0 = REPLACES_LOG: the snapshot came from the leader (``apply_snapshot``) and
the whole log is dropped; clear for ``save_snapshot``, which keeps the entries after it.

Recovery
========

The log is read from the header on, record by record.  At the first record that is short
or fails its CRC (offset ``o``):

* zeros from ``o`` to the end: the clean end of the log (the preallocated space);
* otherwise the rest of the file is searched for CRC-valid records (every later offset
  whose kind byte is 1 or 2).  If one carries a synced mark **above** ``o``, then a sync
  completed after the record at ``o`` was written: the record was durable and has rotted
  since.  The log refuses to start (:class:`~nebula.errors.StateError` naming the file
  and both offsets).  Otherwise the bytes from ``o`` on were never synced: a **torn
  tail**.  It is discarded with a warning and the file truncated at ``o`` (durably).

A CRC-valid record that cannot be decoded, whose mark is out of order, or whose entries
leave a gap or reach below the log's base is refused the same way: it was written whole,
so something other than a crash is wrong.

**Residual.**  Rot inside the records written after the last synced mark the file
carries (the last batch, or the last few appended before one sync) cannot be told from a
torn write: it is discarded as one.  Synced data is lost silently only if rot hits that
batch while nothing written after its sync has reached the disk yet.  Every record moves
the mark, so the window closes with the next Ready's record; the cheap extra guard is
:meth:`RaftLog.seal` (called by :meth:`RaftLog.close`, and by the node when it goes
idle if it likes): a SEAL record carrying the end of the file, synced, so after a clean
shutdown or an idle seal even the last batch is covered.  Nothing on the hot path closes
the window completely: keeping the mark anywhere else costs a second sync per Ready.  The
same residual covers a device that garbles a whole sector on power loss: the synced tail
of the previous record, sharing that sector with the record being written, then looks
torn (sector-aligned records would cost up to a sector per Ready).

When the log is opened it is ``fsync``'ed, and so is the directory: what a restart read
(possibly still only in the page cache after a process crash) is durable before the node
acts on it, and later marks refer to durable bytes.

**Snapshots and compaction.**  ``save_snapshot(S)``: sync the log, write ``raft.snap``
durably, write the new log (header with base ``S``, one BATCH with the entries after
``S`` and the hard state, zeros) to ``raft.log.tmp``, ``fsync``, rename it over
``raft.log``, ``fsync`` the directory.  ``apply_snapshot`` is the same with no entries
kept and REPLACES_LOG set.  A crash between the two renames leaves a log whose base is
older than the snapshot; opening it completes the step: entries up to ``S`` dropped (all
of them when REPLACES_LOG is set, or when the old log does not reach ``S``; an entry at
``S`` whose term differs from the snapshot's is refused), the log rewritten the same
way.  A log based on a *newer* snapshot than ``raft.snap`` is refused.  The loaded hard
state's commit is at least the snapshot index (a snapshot holds only committed state).

Errors
======

Every I/O error and every corruption is a :class:`~nebula.errors.StateError`.  After an
I/O error while writing (``fdatasync`` returning EIO above all: the kernel may already have
dropped the dirty pages, so a retry can "succeed" without the data) the log refuses every
further call: the node fails closed and is restarted by the operator.  Calls that break
the Raft contract raise ``ValueError`` and write nothing: a gap, replacing a committed or
compacted entry, an older snapshot, a hard state whose term or commit goes back or whose
vote changes within a term (a second vote in one term would let two leaders win it).
One exception: a *local* snapshot (``save_snapshot``) that meets a transient error
(EMFILE, ENFILE, ENOMEM, ENOSPC, EDQUOT, EAGAIN) before the new log is renamed into place
raises :class:`SnapshotNotSaved` and leaves the log usable - nothing that matters changed
on disk, and the caller tries again later.  Directories keep the descriptor of their
first fsync, so the fsync after a rename never needs a new descriptor.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from nebula import durable
from nebula.errors import StateError

__all__ = [
    "FORMAT_VERSION",
    "OS_FS",
    "Entry",
    "FileSystem",
    "HardState",
    "Loaded",
    "OsFileSystem",
    "RaftLog",
    "Snapshot",
]

log = logging.getLogger("nebula.raft.storage")

FORMAT_VERSION = 1
LOG_MAGIC = b"NEBRAFT1"
SNAP_MAGIC = b"NEBRSNP1"
SNAP_VERSION = 1
LOG_NAME = "raft.log"
SNAP_NAME = "raft.snap"
LOCK_NAME = "raft.lock"
HEADER_SIZE = 64
DEFAULT_PREALLOC = 1 << 20
"""Zero-filled bytes kept ahead of the last record (0: the file grows with each append)."""
MAX_RECORD = 1 << 30
"""Largest record (one batch); raft-rs batches are bounded far below this."""

KIND_BATCH = 1
KIND_SEAL = 2
SNAP_REPLACES_LOG = 1
_HS_PRESENT = 1

_HDR = struct.Struct("<8sHHIQQ")  # 32 bytes, then 28 zero bytes, then crc u32 at 60
_U32 = struct.Struct("<I")
_REC = struct.Struct("<IIB")  # len, crc, kind
_REC_SIZE = _REC.size  # 9
_MARK = struct.Struct("<Q")
_BATCH_HEAD = struct.Struct("<QB")  # synced mark, flags
_HS = struct.Struct("<QQQ")
_RANGE = struct.Struct("<QI")  # first_index, count
_ENT = struct.Struct("<QBII")  # term, type, data_len, context_len
_SNAP_HEAD = struct.Struct("<8sHHIQQIIQ")  # 48 bytes
_KIND_BYTE = re.compile(rb"[\x01\x02]")
_NONZERO = re.compile(rb"[^\x00]")
_ZEROS = bytes(1 << 20)


# Errors that say "not now" rather than "this disk is failing": a local snapshot that
# hits one of these is retried later; anything else (EIO above all) fails closed.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.EAGAIN}
)


class SnapshotNotSaved(StateError):
    """A local snapshot could not be written, and nothing changed on disk that matters:
    the log still holds every entry and the previous snapshot stays valid.  The log stays
    usable; the caller may try again later (a transient error such as EMFILE or ENOSPC)."""


class Entry(NamedTuple):
    """A Raft log entry; ``type``: 0 normal, 1 conf change, 2 conf change v2."""

    index: int
    term: int
    type: int
    data: bytes
    context: bytes


class HardState(NamedTuple):
    term: int
    vote: int
    commit: int


class Snapshot(NamedTuple):
    """Snapshot metadata (index, term, conf state) and the state machine's opaque bytes."""

    index: int
    term: int
    voters: tuple[int, ...]
    learners: tuple[int, ...]
    data: bytes


class Loaded(NamedTuple):
    """What a restarting node needs: entries are those after ``snapshot.index``, contiguous."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]


class Lock(Protocol):
    def release(self) -> None: ...


class FileSystem(Protocol):
    """The file operations :class:`RaftLog` needs (``OS_FS`` is the real one;
    ``tests/support/memfs.py`` an in-memory one with crash semantics).

    Descriptors are ints opened read-write.  ``pwrite`` writes everything or raises;
    ``write_file_durably`` replaces a file atomically and durably (temporary file, fsync,
    rename, directory fsync).  Errors are ``OSError``.
    """

    def makedirs(self, path: str, mode: int) -> None:
        """Create ``path`` (and missing parents) with ``mode``, durably; nothing if it exists."""

    def lock(self, path: str, what: str) -> Lock:
        """An exclusive lock for as long as the returned object is not released;
        :class:`StateError` if another holder has it."""

    def exists(self, path: str) -> bool: ...

    def open(self, path: str, create: bool = False) -> int: ...

    def close(self, fd: int) -> None: ...

    def size(self, fd: int) -> int: ...

    def pread(self, fd: int, n: int, offset: int) -> bytes: ...

    def read_all(self, fd: int) -> bytes: ...

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None: ...

    def truncate(self, fd: int, size: int) -> None: ...

    def fdatasync(self, fd: int) -> None: ...

    def fsync(self, fd: int) -> None: ...

    def replace(self, src: str, dst: str) -> None: ...

    def unlink(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...

    def forget_dir(self, path: str) -> None:
        """Release what fsync_dir keeps for ``path`` (the log is closed)."""

    def read_file(self, path: str) -> bytes: ...

    def write_file_durably(self, path: str, data: bytes) -> None: ...


class OsFileSystem:
    """The real file system (the durable-write steps of :mod:`nebula.durable`).

    A directory that was fsync'ed once keeps its descriptor until :meth:`forget_dir`:
    the fsync after a rename then needs no new descriptor, so a descriptor shortage
    (EMFILE under a connection flood) cannot strand a rename half-durable."""

    def __init__(self) -> None:
        self._dir_fds: dict[str, int] = {}

    def makedirs(self, path: str, mode: int) -> None:
        if os.path.isdir(path):
            return
        parent = os.path.dirname(os.path.abspath(path))
        self.makedirs(parent, mode)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return
        durable.fsync_dir(parent)

    def lock(self, path: str, what: str) -> Lock:
        return durable.ExclusiveLock(path, what)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def open(self, path: str, create: bool = False) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return os.open(path, flags, 0o600)

    def close(self, fd: int) -> None:
        os.close(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def read_all(self, fd: int) -> bytes:
        return durable.read_all(fd)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        durable.pwrite_all(fd, data, offset)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        key = os.path.abspath(path)
        fd = self._dir_fds.get(key)
        if fd is None:
            fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._dir_fds[key] = fd
        os.fsync(fd)

    def forget_dir(self, path: str) -> None:
        fd = self._dir_fds.pop(os.path.abspath(path), None)
        if fd is not None:
            os.close(fd)

    def read_file(self, path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return durable.read_all(fd)
        finally:
            os.close(fd)

    def write_file_durably(self, path: str, data: bytes) -> None:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            durable.pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.fsync_dir(os.path.dirname(os.path.abspath(path)))


OS_FS: FileSystem = OsFileSystem()


# -- encoding ------------------------------------------------------------------------------


def log_header(base_index: int, base_term: int) -> bytes:
    """The 64-byte header of a log continuing the snapshot (base_index, base_term)."""
    head = _HDR.pack(LOG_MAGIC, FORMAT_VERSION, 0, 0, base_index, base_term) + bytes(28)
    return head + _U32.pack(zlib.crc32(head))


_KIND_BYTES = {KIND_BATCH: b"\x01", KIND_SEAL: b"\x02"}


def _record(kind: int, parts: list[bytes]) -> bytes:
    # One join and three crc32 calls (a call per part cost ~40 % of a batch's encoding).
    body = b"".join(parts)
    length = len(body)
    if length > MAX_RECORD:
        raise ValueError(f"raft log record of {length} bytes exceeds {MAX_RECORD}")
    crc = zlib.crc32(body, zlib.crc32(_KIND_BYTES[kind], zlib.crc32(_U32.pack(length))))
    return _REC.pack(length, crc, kind) + body


def encode_batch(synced: int, entries: Sequence[Entry], hard_state: HardState | None) -> bytes:
    """One BATCH record (entries must be contiguous)."""
    if hard_state is None:
        parts = [_BATCH_HEAD.pack(synced, 0)]
    else:
        parts = [_BATCH_HEAD.pack(synced, _HS_PRESENT), _HS.pack(*hard_state)]
    parts.append(_RANGE.pack(entries[0].index if entries else 0, len(entries)))
    pack = _ENT.pack
    add = parts.append
    for _index, term, etype, data, context in entries:
        add(pack(term, etype, len(data), len(context)))
        if data:
            add(data)
        if context:
            add(context)
    return _record(KIND_BATCH, parts)


def encode_seal(synced: int) -> bytes:
    return _record(KIND_SEAL, [_MARK.pack(synced)])


def encode_snapshot(snap: Snapshot, flags: int = 0) -> bytes:
    """The bytes of ``raft.snap``."""
    head = _SNAP_HEAD.pack(
        SNAP_MAGIC,
        SNAP_VERSION,
        flags,
        0,
        snap.index,
        snap.term,
        len(snap.voters),
        len(snap.learners),
        len(snap.data),
    )
    ids = struct.pack(f"<{len(snap.voters) + len(snap.learners)}Q", *snap.voters, *snap.learners)
    crc = zlib.crc32(snap.data, zlib.crc32(ids, zlib.crc32(head)))
    return b"".join([head, ids, snap.data, _U32.pack(crc)])


def decode_snapshot(raw: bytes, path: str) -> tuple[Snapshot, int]:
    """``(snapshot, flags)`` from the bytes of ``raft.snap``; StateError if unreadable."""
    if raw[:8] != SNAP_MAGIC:
        raise StateError(f"{path}: not a Nebula Raft snapshot (magic {raw[:8]!r})")
    if len(raw) < _SNAP_HEAD.size + 4:
        raise StateError(f"{path}: truncated snapshot file ({len(raw)} bytes)")
    _m, version, flags, _r, index, term, nv, nl, dl = _SNAP_HEAD.unpack_from(raw)
    if version != SNAP_VERSION:
        raise StateError(
            f"{path}: snapshot format version {version}; this Nebula reads version "
            f"{SNAP_VERSION} (written by a newer release? run that release or restore a backup)"
        )
    end = _SNAP_HEAD.size + 8 * (nv + nl) + dl
    if end + 4 != len(raw):
        raise StateError(f"{path}: snapshot file is {len(raw)} bytes, its header says {end + 4}")
    (crc,) = _U32.unpack_from(raw, end)
    if zlib.crc32(memoryview(raw)[:end]) != crc:
        raise StateError(f"{path}: snapshot checksum mismatch (corrupted)")
    ids = struct.unpack_from(f"<{nv + nl}Q", raw, _SNAP_HEAD.size)
    data = raw[_SNAP_HEAD.size + 8 * (nv + nl) : end]
    return Snapshot(index, term, tuple(ids[:nv]), tuple(ids[nv:]), data), flags


class _Malformed(Exception):
    """A CRC-valid record whose payload does not decode."""


def _parse_record(buf: bytes, pos: int, n: int) -> tuple[int, int, int] | None:
    """``(kind, payload_start, end)`` of a whole, CRC-valid record at ``pos``; else None."""
    if pos + _REC_SIZE > n:
        return None
    length, crc, kind = _REC.unpack_from(buf, pos)
    start = pos + _REC_SIZE
    end = start + length
    if length < 8 or end > n or (kind != KIND_BATCH and kind != KIND_SEAL):
        return None
    mv = memoryview(buf)
    if zlib.crc32(mv[pos + 8 : end], zlib.crc32(mv[pos : pos + 4])) != crc:
        return None
    return kind, start, end


def _decode_batch(
    buf: bytes, start: int, end: int
) -> tuple[int, HardState | None, int, list[Entry]]:
    if start + _BATCH_HEAD.size > end:
        raise _Malformed("short batch")
    synced, flags = _BATCH_HEAD.unpack_from(buf, start)
    p = start + _BATCH_HEAD.size
    if flags & ~_HS_PRESENT:
        raise _Malformed(f"unknown batch flags {flags:#x}")
    hs = None
    if flags & _HS_PRESENT:
        if p + _HS.size > end:
            raise _Malformed("short hard state")
        hs = HardState(*_HS.unpack_from(buf, p))
        p += _HS.size
    if p + _RANGE.size > end:
        raise _Malformed("short entry range")
    first, count = _RANGE.unpack_from(buf, p)
    p += _RANGE.size
    entries = []
    unpack = _ENT.unpack_from
    for i in range(count):
        if p + _ENT.size > end:
            raise _Malformed("short entry header")
        term, typ, dl, cl = unpack(buf, p)
        p += _ENT.size
        q = p + dl
        r = q + cl
        if r > end:
            raise _Malformed("entry longer than its record")
        entries.append(Entry(first + i, term, typ, buf[p:q], buf[q:r]))
        p = r
    if p != end:
        raise _Malformed(f"{end - p} stray bytes after the entries")
    return synced, hs, first, entries


# -- the log -------------------------------------------------------------------------------


class SyncJob:
    """One ``fdatasync`` of a log file, made durable up to ``end`` (see RaftLog.sync_job)."""

    __slots__ = ("end", "error", "fd", "fs", "ok")

    def __init__(self, fs: FileSystem, fd: int, end: int) -> None:
        self.fs, self.fd, self.end = fs, fd, end
        self.ok = False  # set only once fdatasync has returned
        self.error: BaseException | None = None

    def run(self) -> None:
        """The sync itself (any thread); never raises: what it raised is kept for
        :meth:`RaftLog.sync_done`."""
        try:
            self.fs.fdatasync(self.fd)
        except BaseException as e:
            self.error = e
        else:
            self.ok = True

    @property
    def os_fd(self) -> int | None:
        """The descriptor to ``fdatasync`` directly (a native thread may run the sync, then
        :meth:`ran`); None when the log is not on the real file system (a test's or the
        simulation's, whose ``fdatasync`` must be the one called)."""
        return self.fd if type(self.fs) is OsFileSystem else None

    def ran(self, err: int) -> None:
        """Record the outcome of an ``fdatasync(os_fd)`` made elsewhere: 0, or its errno."""
        if err == 0:
            self.ok = True
        else:
            self.error = OSError(err, os.strerror(err))


class RaftLog:
    """The durable Raft log of one node (see the module docstring for the format).

    ``directory`` is created (0700) if missing, otherwise the log in it is opened and
    recovered.  ``fs`` is the file system (``OS_FS``, or ``MemFS`` in tests and the
    simulation); ``segment_prealloc`` the zero-filled bytes kept ahead of the last record.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        fs: FileSystem = OS_FS,
        segment_prealloc: int = DEFAULT_PREALLOC,
    ) -> None:
        if segment_prealloc < 0:
            raise ValueError("segment_prealloc must be >= 0")
        self._fs = fs
        self._dir = str(directory)
        self._path = os.path.join(self._dir, LOG_NAME)
        self._snap_path = os.path.join(self._dir, SNAP_NAME)
        self._prealloc = segment_prealloc
        self._fd = -1
        self._lock: Lock | None = None
        self._failed: str | None = None
        self._closed = False
        self._base_index = 0
        self._base_term = 0
        self._entries: list[Entry] = []
        self._hs = HardState(0, 0, 0)
        self._snap: Snapshot | None = None
        self._end = HEADER_SIZE  # end of the last record
        self._alloc = HEADER_SIZE  # file size: zeros from _end to _alloc
        self._synced = HEADER_SIZE  # the synced mark
        self._unsynced_from = HEADER_SIZE  # on opening: the last record's synced mark
        self._dirty = False
        self._sealed = False
        self._syncs = 0
        self._appends = 0
        self._recovered_torn = 0
        try:
            try:
                fs.makedirs(self._dir, 0o700)
                self._lock = fs.lock(os.path.join(self._dir, LOCK_NAME), f"raft log {self._dir}")
            except OSError as e:
                raise StateError(f"{self._dir}: cannot create or lock the raft log: {e}") from None
            self._open()
        except BaseException:
            self._release()
            raise

    # -- opening and recovery ----------------------------------------------------------

    def _open(self) -> None:
        fs = self._fs
        try:
            for tmp in (self._path + ".tmp", self._snap_path + ".tmp"):
                if fs.exists(tmp):
                    fs.unlink(tmp)
            snap_flags = 0
            if fs.exists(self._snap_path):
                self._snap, snap_flags = decode_snapshot(
                    fs.read_file(self._snap_path), self._snap_path
                )
            if not fs.exists(self._path):
                if self._snap is not None:
                    raise StateError(
                        f"{self._path}: missing while {self._snap_path} exists; the log was "
                        "deleted or moved - refusing to start without it"
                    )
                self._rewrite(0, 0, [], self._hs)
                return
            self._fd = fs.open(self._path)
            raw = fs.read_all(self._fd)
        except OSError as e:
            raise StateError(f"{self._dir}: cannot open the raft log: {e}") from None
        self._replay(raw)
        replayed = self._fd
        self._reconcile(snap_flags)
        try:
            # What a restart reads may still be only in the page cache (a process crash):
            # make it durable before the node acts on it and before marks refer to it.
            # After a failed fdatasync Linux keeps the unwritten pages in the page cache
            # but marks them clean, and an fsync then has nothing to write: the bytes the
            # records wrote past the last synced mark are written again first, so the
            # fsync either puts them on the disk or fails.  (A log _reconcile rewrote is
            # a new file, synced already.)
            unsynced = self._unsynced_from
            if self._fd == replayed and unsynced < self._end:
                fs.pwrite(self._fd, memoryview(raw)[unsynced : self._end], unsynced)
            fs.fsync(self._fd)
            fs.fsync_dir(self._dir)
        except OSError as e:
            raise StateError(f"{self._path}: cannot sync the recovered log: {e}") from None
        self._synced = self._end

    def _corrupt(self, offset: int, what: str) -> StateError:
        return StateError(
            f"{self._path}: {what} at offset {offset}; the raft log is corrupted - refusing "
            "to start (restore this member from a backup, or remove its data directory and "
            "re-add it to the cluster)"
        )

    def _replay(self, raw: bytes) -> None:
        path = self._path
        if raw[:8] != LOG_MAGIC:
            raise StateError(f"{path}: not a Nebula Raft log (magic {raw[:8]!r})")
        if len(raw) < HEADER_SIZE:
            raise StateError(f"{path}: truncated header ({len(raw)} bytes)")
        _m, version, _flags, _r, base_index, base_term = _HDR.unpack_from(raw)
        if version != FORMAT_VERSION:
            raise StateError(
                f"{path}: raft log format version {version}; this Nebula reads version "
                f"{FORMAT_VERSION} (written by a newer release? run that release, or export "
                "the state with it)"
            )
        (crc,) = _U32.unpack_from(raw, HEADER_SIZE - 4)
        if zlib.crc32(memoryview(raw)[: HEADER_SIZE - 4]) != crc:
            raise self._corrupt(0, "header checksum mismatch")
        self._base_index, self._base_term = base_index, base_term
        entries = self._entries
        n = len(raw)
        pos = HEADER_SIZE
        mark = HEADER_SIZE
        while True:
            rec = _parse_record(raw, pos, n)
            if rec is None:
                break
            kind, start, end = rec
            try:
                if kind == KIND_SEAL:
                    if end - start != _MARK.size:
                        raise _Malformed("seal record of the wrong size")
                    (synced,) = _MARK.unpack_from(raw, start)
                    hs, first, batch = None, 0, []
                else:
                    synced, hs, first, batch = _decode_batch(raw, start, end)
            except _Malformed as e:
                raise self._corrupt(pos, f"undecodable record ({e})") from None
            if not mark <= synced <= pos:
                raise self._corrupt(pos, f"record with synced mark {synced} out of order")
            mark = synced
            if batch:
                last = base_index + len(entries)
                if first <= base_index or first > last + 1:
                    raise self._corrupt(
                        pos,
                        f"batch at index {first} outside the log [{base_index + 1}, {last + 1}]",
                    )
                del entries[first - base_index - 1 :]
                entries.extend(batch)
            if hs is not None:
                self._hs = hs
            self._sealed = kind == KIND_SEAL
            pos = end
        self._end = self._alloc = pos
        self._unsynced_from = mark  # what the records wrote from here on may not be durable
        if pos < n:
            self._check_tail(raw, pos)

    def _check_tail(self, raw: bytes, bad: int) -> None:
        """Bytes from ``bad`` on are not a valid record: a clean end, a torn tail, or rot."""
        n = len(raw)
        if _NONZERO.search(raw, bad) is None:
            self._alloc = n  # preallocated zeros: the clean end of the log
            return
        # Any CRC-valid record later in the file whose mark is above ``bad`` proves that
        # the record at ``bad`` had been synced: it has rotted since.
        pos = bad + 1
        while True:
            m = _KIND_BYTE.search(raw, pos + 8)
            if m is None:
                break
            cand = m.start() - 8
            rec = _parse_record(raw, cand, n)
            if rec is None:
                pos = cand + 1
                continue
            while rec is not None:
                _kind, start, end = rec
                (synced,) = _MARK.unpack_from(raw, start)
                if synced > bad:
                    raise self._corrupt(
                        bad,
                        f"unreadable record below the synced mark {synced} (carried by the "
                        f"record at offset {cand})",
                    )
                cand = end
                rec = _parse_record(raw, cand, n)
            pos = cand + 1
        last = max(bad, len(raw.rstrip(b"\x00")))
        log.warning(
            "%s: discarding a torn tail of %d bytes at offset %d (a write that was never "
            "synced, cut by a crash)",
            self._path,
            last - bad,
            bad,
        )
        self._recovered_torn = last - bad
        try:
            self._fs.truncate(self._fd, bad)
        except OSError as e:
            raise StateError(f"{self._path}: cannot truncate the torn tail: {e}") from None
        self._alloc = bad  # the fsync in _open makes the truncation durable

    def _reconcile(self, snap_flags: int) -> None:
        """Match the log's base with ``raft.snap``; finish an interrupted snapshot step."""
        snap = self._snap
        s_index, s_term = (snap.index, snap.term) if snap is not None else (0, 0)
        b_index, b_term = self._base_index, self._base_term
        if b_index == s_index and b_term == s_term:
            pass
        elif snap is not None and b_index < s_index:
            # Crash between the snapshot's rename and the log's: finish the step.
            t = self.term(s_index)
            if snap_flags & SNAP_REPLACES_LOG or t is None:
                keep: list[Entry] = []
            elif t == s_term:
                keep = self._entries[s_index - b_index :]
            else:
                raise self._corrupt(
                    0,
                    f"entry {s_index} has term {t} but the snapshot at that index has term "
                    f"{s_term}",
                )
            log.info(
                "%s: completing an interrupted snapshot step (log based at %d, snapshot at %d)",
                self._path,
                b_index,
                s_index,
            )
            self._install_snapshot_log(snap, keep, bool(snap_flags & SNAP_REPLACES_LOG))
        else:
            raise self._corrupt(
                0,
                f"log continues a snapshot at index {b_index} term {b_term}, but the "
                f"snapshot file holds index {s_index} term {s_term}",
            )
        last = self.last_index
        commit = max(self._hs.commit, s_index)
        if commit > last:
            raise self._corrupt(
                0, f"hard state commits index {self._hs.commit} beyond the last entry {last}"
            )
        self._hs = self._hs._replace(commit=commit)

    # -- writing -----------------------------------------------------------------------

    def _check(self) -> None:
        if self._failed is not None:
            raise StateError(
                f"raft log {self._dir} failed earlier ({self._failed}); it refuses every call "
                "until the node is restarted"
            )
        if self._closed:
            raise StateError(f"raft log {self._dir} is closed")

    def _fail(self, what: str, e: OSError) -> StateError:
        self._failed = f"{what}: {e}"
        log.error("raft log %s: %s failed: %s; failing closed", self._dir, what, e)
        return StateError(f"{self._path}: {what} failed: {e}; the raft log fails closed")

    def _write_at_end(self, rec: bytes) -> None:
        fs, fd = self._fs, self._fd
        end = self._end + len(rec)
        try:
            if end > self._alloc and self._prealloc:
                new_alloc = -(-(end + self._prealloc) // 4096) * 4096
                off = self._alloc
                while off < new_alloc:
                    k = min(len(_ZEROS), new_alloc - off)
                    fs.pwrite(fd, memoryview(_ZEROS)[:k], off)
                    off += k
                self._alloc = new_alloc
            fs.pwrite(fd, rec, self._end)
        except OSError as e:
            raise self._fail("write", e) from e
        self._end = end
        self._alloc = max(self._alloc, end)
        self._dirty = True
        self._sealed = False

    def append(self, entries: Sequence[Entry], hard_state: HardState | None) -> None:
        """Write one record: ``entries`` (contiguous; an index <= the last index replaces
        it and everything after it) and the new ``hard_state`` if not None.  Not synced."""
        self._check()
        if not entries and hard_state is None:
            return
        if entries:
            first = entries[0].index
            for i, e in enumerate(entries):
                if e.index != first + i:
                    raise ValueError(
                        f"raft entries not contiguous: {e.index} after {first + i - 1}"
                    )
            last = self.last_index
            if first <= self._base_index:
                raise ValueError(
                    f"raft entry {first} is at or below the snapshot index {self._base_index}"
                )
            if first > last + 1:
                raise ValueError(f"raft entry {first} leaves a gap after the last index {last}")
            if first <= last and first <= self._hs.commit:
                raise ValueError(
                    f"raft entry {first} would replace a committed entry (commit {self._hs.commit})"
                )
        if hard_state is not None:
            self._check_hard_state(hard_state)
        try:
            rec = encode_batch(self._synced, entries, hard_state)
        except struct.error as e:
            raise ValueError(f"raft entry or hard state out of range: {e}") from None
        self._write_at_end(rec)
        self._appends += 1
        if entries:
            del self._entries[entries[0].index - self._base_index - 1 :]
            self._entries.extend(entries)
        if hard_state is not None:
            self._hs = HardState(*hard_state)

    def _check_hard_state(self, hs: HardState) -> None:
        cur = self._hs
        if hs.term < cur.term or hs.commit < cur.commit:
            raise ValueError(f"raft hard state {tuple(hs)} goes back from {tuple(cur)}")
        if hs.term == cur.term and cur.vote and hs.vote != cur.vote:
            raise ValueError(
                f"raft hard state {tuple(hs)} changes the vote already cast in term {cur.term} "
                f"({cur.vote})"
            )

    def sync(self) -> None:
        """One ``fdatasync``: everything appended so far is durable when it returns."""
        self._check()
        if not self._dirty:
            return
        try:
            self._fs.fdatasync(self._fd)
        except OSError as e:
            raise self._fail("fdatasync", e) from e
        self._syncs += 1
        self._synced = self._end
        self._dirty = False

    def sync_job(self) -> SyncJob | None:
        """The :meth:`sync` of what is appended now, split for a worker thread: the job's
        ``run()`` (only the ``fdatasync``) may run on another thread, then
        :meth:`sync_done` on this one.  None when nothing is unsynced.  Nothing may be
        written to the log while a job runs (the node loop pauses)."""
        self._check()
        if not self._dirty:
            return None
        return SyncJob(self._fs, self._fd, self._end)

    def sync_done(self, job: SyncJob) -> None:
        """Record a finished :meth:`sync_job` (StateError, failing closed, if it failed)."""
        if not job.ok:
            e = job.error
            if isinstance(e, OSError):
                raise self._fail("fdatasync", e) from e
            if e is not None:
                raise e  # not from the file system (a test's crash point): as raised
            raise self._fail("fdatasync", OSError("the sync did not run"))
        self._check()
        if job.fd != self._fd:
            raise StateError(f"{self._path}: the log file changed during a sync")
        self._syncs += 1
        self._synced = max(self._synced, job.end)
        self._dirty = self._end != self._synced

    def seal(self) -> None:
        """Write and sync a SEAL record carrying the end of the file, so that rot in the
        last batch is told from a torn write after a restart.  Nothing if already sealed."""
        self._check()
        self.sync()
        if self._sealed:
            return
        self._write_at_end(encode_seal(self._synced))
        self.sync()
        self._sealed = True

    def save_snapshot(self, snap: Snapshot) -> None:
        """Store the local state machine's snapshot durably and compact the log: entries up
        to ``snap.index`` dropped, the rest rewritten to a new file (crash-safe throughout).
        A snapshot beyond the last entry drops every entry (bootstrap)."""
        self._check()
        snap = _as_snapshot(snap)
        if self._snap is not None and snap.index <= self._snap.index:
            raise ValueError(
                f"snapshot at index {snap.index} is not newer than the stored one at "
                f"{self._snap.index}"
            )
        if snap.index < self._base_index:
            raise ValueError(f"snapshot at index {snap.index} is below the log's base")
        t = self.term(snap.index)
        if t is not None and t != snap.term:
            raise ValueError(
                f"snapshot at index {snap.index} has term {snap.term}, the log's entry there "
                f"term {t}"
            )
        keep = self._entries[snap.index - self._base_index :] if t is not None else []
        self.sync()
        # Until the new log file is renamed into place, a failure leaves the old snapshot
        # and the whole log valid on disk (a newer raft.snap over an older log base is a
        # state the loader accepts): the log stays usable and the snapshot can be retried.
        try:
            self._fs.write_file_durably(self._snap_path, encode_snapshot(snap, 0))
        except OSError as e:
            if e.errno not in _TRANSIENT_ERRNOS:
                raise self._fail("snapshot write", e) from e
            log.warning("raft log %s: snapshot not saved (will retry): %s", self._dir, e)
            raise SnapshotNotSaved(f"{self._snap_path}: snapshot not saved: {e}") from e
        self._snap = snap
        self._install_snapshot_log(snap, keep, False, retryable=True)

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Install a snapshot received from the leader: it replaces the whole log (every
        entry dropped); durable before it returns."""
        self._check()
        snap = _as_snapshot(snap)
        if self._snap is not None and snap.index <= self._snap.index:
            raise ValueError(
                f"snapshot at index {snap.index} is not newer than the stored one at "
                f"{self._snap.index}"
            )
        self.sync()
        self._store_snapshot(snap, SNAP_REPLACES_LOG, [])

    def _store_snapshot(self, snap: Snapshot, flags: int, keep: list[Entry]) -> None:
        try:
            self._fs.write_file_durably(self._snap_path, encode_snapshot(snap, flags))
        except OSError as e:
            raise self._fail("snapshot write", e) from e
        self._snap = snap
        self._install_snapshot_log(snap, keep, bool(flags & SNAP_REPLACES_LOG))

    def _install_snapshot_log(
        self, snap: Snapshot, keep: list[Entry], replaces: bool, retryable: bool = False
    ) -> None:
        # A snapshot holds committed state only; one from the leader replaces everything
        # (raft-rs installs it only beyond its commit index), like raft-rs's MemStorage.
        commit = snap.index if replaces else max(self._hs.commit, snap.index)
        self._rewrite(
            snap.index, snap.term, keep, self._hs._replace(commit=commit), retryable=retryable
        )

    def _rewrite(
        self,
        base_index: int,
        base_term: int,
        keep: list[Entry],
        hs: HardState,
        retryable: bool = False,
    ) -> None:
        """Replace raft.log durably: header, one batch (``keep`` and ``hs``), zeros.

        ``retryable``: a failure before the rename leaves the old log in place and usable
        (SnapshotNotSaved); after the rename nothing but failing closed is safe."""
        fs = self._fs
        tmp = self._path + ".tmp"
        rec = encode_batch(HEADER_SIZE, keep, hs)
        end = HEADER_SIZE + len(rec)
        alloc = -(-(end + self._prealloc) // 4096) * 4096 if self._prealloc else end
        fd = -1
        renamed = False
        try:
            fd = fs.open(tmp, create=True)
            fs.truncate(fd, 0)
            fs.pwrite(fd, log_header(base_index, base_term) + rec, 0)
            off = end
            while off < alloc:
                k = min(len(_ZEROS), alloc - off)
                fs.pwrite(fd, memoryview(_ZEROS)[:k], off)
                off += k
            fs.fsync(fd)
            fs.replace(tmp, self._path)
            renamed = True
            fs.fsync_dir(self._dir)
        except OSError as e:
            if fd >= 0:
                try:
                    fs.close(fd)
                except OSError:
                    pass
            if retryable and not renamed and e.errno in _TRANSIENT_ERRNOS:
                log.warning("raft log %s: compaction not done (will retry): %s", self._dir, e)
                raise SnapshotNotSaved(f"{self._path}: log compaction not done: {e}") from e
            raise self._fail("log rewrite", e) from e
        old, self._fd = self._fd, fd
        if old >= 0:
            try:
                fs.close(old)
            except OSError:
                pass
        self._base_index, self._base_term = base_index, base_term
        self._entries = list(keep)
        self._hs = hs
        self._end = self._synced = end
        self._alloc = alloc
        self._dirty = False
        self._sealed = False

    # -- reading -----------------------------------------------------------------------

    def load(self) -> Loaded:
        """The snapshot (or None), the hard state and the entries after the snapshot."""
        self._check()
        return Loaded(self._hs, self._snap, list(self._entries))

    @property
    def first_index(self) -> int:
        """Index of the first entry held (snapshot index + 1)."""
        return self._base_index + 1

    @property
    def last_index(self) -> int:
        """Index of the last entry (the snapshot index when no entry is held)."""
        return self._base_index + len(self._entries)

    @property
    def hard_state(self) -> HardState:
        return self._hs

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snap

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index`` (the snapshot's at its index); None if not held."""
        if index == self._base_index:
            return self._base_term
        i = index - self._base_index - 1
        if 0 <= i < len(self._entries):
            return self._entries[i].term
        return None

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with ``lo <= index < hi`` (clipped to what is held)."""
        b = self._base_index + 1
        return self._entries[max(lo - b, 0) : max(hi - b, 0)]

    def stats(self) -> dict[str, int]:
        return {
            "bytes": self._end,
            "file_bytes": self._alloc,
            "entries": len(self._entries),
            "first_index": self.first_index,
            "last_index": self.last_index,
            "appends": self._appends,
            "syncs": self._syncs,
            "snapshot_index": self._snap.index if self._snap is not None else 0,
            "snapshot_bytes": len(self._snap.data) if self._snap is not None else 0,
            "torn_bytes_discarded": self._recovered_torn,
        }

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """Seal (if healthy), close the file and release the directory lock."""
        if self._closed:
            return
        err: StateError | None = None
        if self._failed is None and self._fd >= 0:
            try:
                self.seal()
            except StateError as e:
                err = e
        self._closed = True
        self._release()
        if err is not None:
            raise err

    def _release(self) -> None:
        if self._fd >= 0:
            try:
                self._fs.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        forget = getattr(self._fs, "forget_dir", None)
        if forget is not None:
            forget(self._dir)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RaftLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_snapshot(snap: Snapshot) -> Snapshot:
    s = Snapshot(snap.index, snap.term, tuple(snap.voters), tuple(snap.learners), bytes(snap.data))
    if s.index < 0 or s.term < 0:
        raise ValueError(f"snapshot index/term must be >= 0: {s.index}/{s.term}")
    return s
