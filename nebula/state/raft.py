"""Raft-replicated sign state (``persist = "raft"``) on pysyncobj 0.3.17.

This is the only module of Nebula that imports pysyncobj.  It turns a pysyncobj
``SyncObj`` into a :class:`~nebula.state.base.SignStore` whose state machine is
:func:`nebula.guard.apply`, and closes the gaps that pysyncobj leaves open
(design.md §4, dependencies.md §1):

Durability (S1).  pysyncobj never fsyncs.

* :class:`DurableJournal` replaces pysyncobj's ``FileJournal``.  ``add()`` only writes;
  the log is made durable with ``fdatasync`` (i) before this node sends any message
  other than an AppendEntries - so a follower's acknowledgement, a vote or a
  forwarded-command reply never leaves before the entries it vouches for are on disk
  (:meth:`_DurableTransport.send`), and (ii) at the end of every tick and before
  every tick - so the leader's own copy is durable before the commit index is
  computed from its match index (the leader's fdatasync overlaps the round trip to
  the followers).  currentTerm/votedFor go to a checksummed file with fsync + rename
  + directory fsync before any message reflecting them.  Records carry a CRC; the
  header records how far the journal is known to be synced, so corruption below that
  mark refuses to start (S3) while a torn tail from a crash is discarded.
  pysyncobj followers delete and re-append entries they already acknowledged on
  every overlapping AppendEntries; the journal keeps identical entries in place (no
  I/O, no window in which an acknowledged entry is missing) and truncates, durably,
  only on a real conflict - which fails the store closed if it would remove an
  applied entry.  An I/O error takes the node out of the cluster (S3).
* The full dump (snapshot) uses pysyncobj's ``serializer``/``deserializer`` hooks:
  Nebula's own checksummed JSON, fsync'ed before pysyncobj renames it, and fsync'ed
  again (with its directory) before a snapshot received from the leader replaces the
  journal.  It carries only ints and bytes - no pickled objects.  A corrupted
  snapshot refuses to start.

The one monkeypatch.  ``pysyncobj.syncobj.createJournal``, ``getEncryptor`` and, for
the loop driver, ``createPoller`` and ``PipeNotifier`` are rebound *only while a
SyncObj is being constructed*, under a lock (:func:`_patched`); pysyncobj looks them
up nowhere else.  They bring in the durable journal, the event-loop poller and
:class:`_TransportCipher` - ChaCha20-Poly1305 keyed from the cluster secret in
place of Fernet (same interface, ~10x cheaper per message, 35 % lower commit
latency measured).  Everything else goes through pysyncobj's public parameters
(``transportClass``, ``serializer``, ``SyncObjConf``), except the transport's
connections: they are :class:`_BoundedConnection`, which overrides pysyncobj's
send and its private read/parse steps.  It drops a peer announcing a negative frame
length or one above 64 KiB before its first message authenticated (16 MiB after)
instead of buffering it - pysyncobj would buffer up to 2 GiB from anyone who
reaches the Raft port - and frames messages without pysyncobj's zlib (token magic
``NB2``; nodes of different formats refuse each other).  The version is pinned and
checked at import.

Identity.  pysyncobj identifies a member by its address string.  Nebula members are
identified by their node id (``nebula-node-<id>``) and dial whatever address is
configured for a peer, so a member may be reached through a proxy or a NAT.

Driving (dependencies.md §1d).  ``driver="loop"`` (default, "pattern B") runs
pysyncobj on the asyncio/uvloop event loop: its sockets are registered on the loop,
``doTick`` runs whenever a socket or a proposal needs it and on a 20 ms timer
(heartbeats, elections) - except after a message that was only an acknowledgement
of an entry already committed (the slower follower's), which leaves a tick nothing
to do - and the state machine and callbacks run on the loop
thread without locks.  ``driver="thread"`` ("pattern A") keeps pysyncobj's tick
thread and hands results to the loop with ``call_soon_threadsafe``; on a busy 2-core
machine it measured somewhat lower latency, because the waiting coroutine resumes
while the tick thread is still sending the commit index to the followers.  With
either driver the transport skips the entry-less AppendEntries pysyncobj sends to a
follower right after every commit when that follower got one less than a heartbeat
interval ago (half the messages per commit); followers learn the commit index from
the next AppendEntries or heartbeat, so their applied state may trail the leader's
by about a heartbeat interval - authority stays with the leader's barrier.  The
transport also keeps pysyncobj from moving a follower's next index back when an
acknowledgement of an older AppendEntries arrives after newer entries went out on
the same connection, so every entry is sent to every follower once (it used to go
to the slower follower 1-3 times); a follower that really misses entries rejects
the next AppendEntries and pysyncobj's reset takes over.

Safety (S2, S3).  The leader answers with the Decision returned by the state
machine for the committed entry.  Timeouts, lost quorum and any failure reason raise
:class:`~nebula.errors.ReplicationError` / :class:`~nebula.errors.NotLeader`; a
proposal whose ``commit()`` timed out resolves nothing even if it commits later.
A leader is authoritative (and announced through :meth:`RaftStore.on_role_change`)
only once a barrier entry of its term is applied - its state then includes every
committed decision - and while it has heard from a majority recently.

The high-water mark (S4) lives in the state machine, is carried by snapshots and
re-built by replay on restart; imports (``initial``, :meth:`RaftStore.raise_to`) go
through the log and only ever raise it.

Replicated command ids follow pysyncobj's rule (sorted method names): adding a
``@replicated`` method changes the ids, so every member must run the same version.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle as _pickle
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from nebula.errors import ConfigError, NotLeader, ReplicationError, StateError
from nebula.guard import Decision, SignRecord, Verdict
from nebula.guard import apply as guard_apply
from nebula.state.base import SignStore, record_to_json

PYSYNCOBJ_VERSION = "0.3.17"


def _check_pysyncobj_version() -> None:
    try:
        dist = importlib.metadata.version("pysyncobj")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"persist = raft needs pysyncobj=={PYSYNCOBJ_VERSION}, which is not installed"
        ) from None
    if dist != PYSYNCOBJ_VERSION:
        raise ConfigError(
            f"pysyncobj {dist} is installed but Nebula's Raft store is pinned to "
            f"pysyncobj=={PYSYNCOBJ_VERSION} (it depends on that version's journal, poller "
            f"and transport internals); install pysyncobj=={PYSYNCOBJ_VERSION}"
        )


_check_pysyncobj_version()

import pysyncobj.syncobj as _ps  # noqa: E402
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjException, replicated  # noqa: E402
from pysyncobj.journal import Journal  # noqa: E402
from pysyncobj.node import Node, TCPNode  # noqa: E402
from pysyncobj.poller import POLL_EVENT_TYPE, Poller  # noqa: E402
from pysyncobj.tcp_connection import TcpConnection  # noqa: E402
from pysyncobj.transport import TCPTransport  # noqa: E402
from pysyncobj.version import VERSION as _PS_MODULE_VERSION  # noqa: E402

if _PS_MODULE_VERSION != PYSYNCOBJ_VERSION or not all(
    hasattr(_ps, name) for name in ("createJournal", "createPoller", "PipeNotifier", "getEncryptor")
):
    raise ConfigError(
        f"the imported pysyncobj reports version {_PS_MODULE_VERSION}; Nebula's Raft store "
        f"is pinned to pysyncobj=={PYSYNCOBJ_VERSION}"
    )

logger = logging.getLogger("nebula.raft")

__all__ = ["PYSYNCOBJ_VERSION", "DurableJournal", "RaftStore"]


class _QuietReappend(logging.Filter):
    """pysyncobj logs CRITICAL on every overlapping AppendEntries, where it deletes and
    re-appends entries it already holds.  :class:`DurableJournal` keeps identical
    entries and reports a real conflict itself, so this message is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("truncating already-applied log entries")


_quiet = _QuietReappend()
logging.getLogger("pysyncobj.syncobj").addFilter(_quiet)

_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}
_NOT_LEADER_REASONS = frozenset(
    {FAIL_REASON.NOT_LEADER, FAIL_REASON.LEADER_CHANGED, FAIL_REASON.MISSING_LEADER}
)
_ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}


# ---- small helpers ---------------------------------------------------------------------


def _ident(node_id: int) -> str:
    return f"nebula-node-{node_id}"


def _node_id_of(ident: str) -> int | None:
    prefix = "nebula-node-"
    if ident.startswith(prefix):
        try:
            return int(ident[len(prefix) :])
        except ValueError:
            return None
    return None


def _parse_addr(addr: str, what: str) -> tuple[str, int]:
    if not isinstance(addr, str) or ":" not in addr:
        raise ConfigError(f"{what}: expected 'host:port', got {addr!r}")
    host, _, port_s = addr.rpartition(":")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{what}: bad port in {addr!r}") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"{what}: bad address {addr!r}")
    return host, port


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _checked_dumps(obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n"


def _checked_loads(raw: bytes, where: str) -> Any:
    body, sep, rest = raw.rstrip(b"\n").rpartition(b"\n")
    if not sep or hashlib.sha256(body).hexdigest().encode() != rest:
        raise StateError(f"{where}: checksum mismatch (file truncated or corrupted)")
    try:
        return json.loads(body)
    except ValueError as e:
        raise StateError(f"{where}: malformed content: {e}") from None


def _write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: tmp file, fsync, rename, fsync dir."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---- the journal -----------------------------------------------------------------------

_J_MAGIC = b"NEBRAFTJ"
_J_VERSION = 1
_J_HEADER = struct.Struct("<8sIIQQ")  # magic, version, flags, synced_end, commit_index
_J_HEADER_SIZE = 64  # crc32 of the packed fields at offset _J_HEADER.size
_J_REC = struct.Struct("<IIQQ")  # length of command, crc32, idx, term
_J_LEN = struct.Struct("<I")
_J_IDX_TERM = struct.Struct("<QQ")
_J_MAX_COMMAND = 1 << 20
_J_PREALLOC = 1 << 20


class DurableJournal(Journal):
    """pysyncobj's journal interface, durable and checksummed.

    File layout: a 64-byte header (magic, version, ``synced_end``, an advisory
    commit index, crc32), then records ``len|crc32|idx|term|command``, then zeros
    (the file is pre-allocated in 1 MiB steps so that an fdatasync does not have to
    commit a size change).  Everything before ``synced_end`` is known to have been
    fdatasync'ed and must parse, or the node refuses to start; records after it are
    kept while they verify and the rest is discarded as a torn tail.

    ``add`` only writes.  :meth:`sync` makes everything written durable; the Raft
    node calls it before any acknowledgement leaves and before the leader counts
    its own copy (see the module docstring).

    Truncation is lazy.  A pysyncobj follower deletes every entry after an
    AppendEntries' ``prevLogIdx`` and appends the message's entries again - even
    when they are the entries it already has and acknowledged (this happens all the
    time when acknowledgements race pipelined AppendEntries).  Done eagerly, a crash
    between the delete and the re-append loses acknowledged entries.  Here a
    deletion only moves the entries to an on-disk ``tail``: re-appending an identical
    entry reuses its record without I/O, and only a conflicting entry truncates the
    file, durably, before anything new is written.  Records left in the tail are
    entries this node already held after the same prefix, so finding them again
    after a restart is the state before that AppendEntries arrived.
    """

    def __init__(
        self, path: str | Path, *, snapshot_head: tuple[tuple, tuple] | None = None
    ) -> None:
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta")
        self._entries: list[tuple[bytes, int, int]] = []
        self._offsets: list[int] = []
        self._tail: collections.deque[tuple[tuple[bytes, int, int], int]] = collections.deque()
        self._fd = -1
        self._end = _J_HEADER_SIZE  # end of the last record of the log
        self._disk_end = _J_HEADER_SIZE  # end of the last record in the file (tail incl.)
        self._alloc = 0  # file size
        self._synced_end = _J_HEADER_SIZE
        self._header_synced_end = _J_HEADER_SIZE
        self._dirty = False
        self._commit = 1
        self._header_commit = 1
        self._failed: str | None = None
        #: called with the first index a conflicting AppendEntries removes from the file
        self.on_conflict: Callable[[int], None] | None = None
        #: called once, with a description, when the journal can no longer be written
        self.on_failure: Callable[[str], None] | None = None
        #: number of fdatasync calls that made log entries durable
        self.sync_count = 0
        #: entries re-appended by pysyncobj that were already on disk (no I/O)
        self.reused = 0
        self._open()
        self._term, self._voted_for = self._load_meta()
        if snapshot_head is not None:
            self._trim_to(snapshot_head)

    # -- file handling -----------------------------------------------------------------

    def _pack_header(self, synced_end: int, commit: int) -> bytes:
        fields = _J_HEADER.pack(_J_MAGIC, _J_VERSION, 0, synced_end, commit)
        raw = fields + _J_LEN.pack(zlib.crc32(fields))
        return raw + bytes(_J_HEADER_SIZE - len(raw))

    @staticmethod
    def _encode(command: bytes, idx: int, term: int) -> bytes:
        body = _J_IDX_TERM.pack(idx, term) + command
        length = _J_LEN.pack(len(command))
        return length + _J_LEN.pack(zlib.crc32(body, zlib.crc32(length))) + body

    def _create(self, path: Path, entries: list[tuple[bytes, int, int]], commit: int) -> int:
        """Write a complete journal file to ``path`` durably; returns its fd."""
        records = b"".join(self._encode(c, i, t) for c, i, t in entries)
        end = _J_HEADER_SIZE + len(records)
        size = max(_J_PREALLOC, -(-end // _J_PREALLOC) * _J_PREALLOC)
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _pwrite_all(fd, self._pack_header(end, commit) + records, 0)
            _pwrite_all(fd, bytes(size - end), end)
            os.fdatasync(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            raise
        self._offsets = []
        pos = _J_HEADER_SIZE
        for c, _, _ in entries:
            self._offsets.append(pos)
            pos += _J_REC.size + len(c)
        self._entries = list(entries)
        self._tail.clear()
        self._end = self._disk_end = self._synced_end = self._header_synced_end = end
        self._alloc = size
        self._commit = self._header_commit = commit
        self._dirty = False
        return fd

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            self._fd = self._create(self.path, [], 1)
            return
        self._fd = fd
        size = os.fstat(fd).st_size
        buf = os.pread(fd, size, 0)
        where = str(self.path)
        if size < _J_HEADER_SIZE or buf[:8] != _J_MAGIC:
            raise StateError(f"{where}: not a Nebula Raft journal; refusing to start")
        fields = buf[: _J_HEADER.size]
        (crc,) = _J_LEN.unpack_from(buf, _J_HEADER.size)
        if zlib.crc32(fields) != crc:
            raise StateError(f"{where}: journal header checksum mismatch; refusing to start")
        _, version, _, synced_end, commit = _J_HEADER.unpack(fields)
        if version != _J_VERSION:
            raise StateError(f"{where}: journal format {version}, expected {_J_VERSION}")
        view = memoryview(buf)
        pos = _J_HEADER_SIZE
        while pos + _J_REC.size <= size:
            length, rcrc, idx, term = _J_REC.unpack_from(buf, pos)
            end = pos + _J_REC.size + length
            if length == 0 or length > _J_MAX_COMMAND or end > size:
                break
            if zlib.crc32(view[pos + 8 : end], zlib.crc32(view[pos : pos + 4])) != rcrc:
                break
            self._entries.append((bytes(view[pos + _J_REC.size : end]), idx, term))
            self._offsets.append(pos)
            pos = end
        if pos < synced_end:
            raise StateError(
                f"{where}: journal corrupted at byte {pos} (synced up to {synced_end}); "
                "refusing to start. Move this node's raft data away so that it re-syncs "
                "from the cluster, or restore it from a backup."
            )
        tail = len(view[pos:].tobytes().rstrip(b"\0"))
        if tail:
            logger.warning(
                "%s: discarding %d bytes after the last complete journal record "
                "(a write interrupted by a crash; it was never acknowledged)",
                where,
                tail,
            )
            _pwrite_all(fd, bytes(tail), pos)
            os.fdatasync(fd)
        for i in range(1, len(self._entries)):
            if self._entries[i][1] != self._entries[i - 1][1] + 1:
                logger.warning("%s: journal indexes are not contiguous at %d", where, i)
                break
        self._end = self._disk_end = self._synced_end = pos
        self._header_synced_end = synced_end
        self._alloc = size
        self._commit = self._header_commit = commit

    def _load_meta(self) -> tuple[int, str | None]:
        try:
            raw = self.meta_path.read_bytes()
        except FileNotFoundError:
            if any(term > 0 for _, _, term in self._entries):
                raise StateError(
                    f"{self.meta_path}: missing while the journal holds entries of later "
                    "terms (the vote record is lost); refusing to start"
                ) from None
            return 0, None
        obj = _checked_loads(raw, str(self.meta_path))
        term, voted = obj.get("term"), obj.get("voted_for")
        if type(term) is not int or term < 0 or not (voted is None or isinstance(voted, str)):
            raise StateError(f"{self.meta_path}: malformed term/vote record")
        return term, voted

    def _trim_to(self, head: tuple[tuple, tuple]) -> None:
        """Finish a compaction interrupted after the snapshot was written.

        pysyncobj keeps the journal only if its first two entries are the two the
        snapshot ends with; otherwise it clears the journal, dropping entries after
        the snapshot.  Dropping the prefix here keeps those entries.
        """
        prev, last = head
        for pos in range(len(self._entries) - 1):
            if self._entries[pos] == prev and self._entries[pos + 1] == last:
                if pos > 0:
                    self.deleteEntriesTo(pos)
                return

    def _check(self) -> None:
        if self._failed is not None:
            raise StateError(f"{self.path}: journal unusable after an I/O error: {self._failed}")

    def _fail(self, e: OSError) -> StateError:
        first = self._failed is None
        self._failed = str(e)
        msg = f"{self.path}: journal I/O error: {e}"
        if first:
            logger.critical("%s; this node acknowledges nothing any more", msg)
            if self.on_failure is not None:
                self.on_failure(msg)
        return StateError(msg)

    # -- durability --------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def durable_index(self) -> int:
        """Index of the last log entry known to be on stable storage (0 if none)."""
        i = bisect.bisect_left(self._offsets, self._synced_end) - 1
        if i >= 0 and self._offsets[i] + _J_REC.size + len(self._entries[i][0]) > self._synced_end:
            i -= 1
        return self._entries[i][1] if i >= 0 else 0

    def _last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    def sync(self) -> None:
        """Make every written entry durable (one fdatasync when anything is pending)."""
        if not self._dirty:
            return
        self._check()
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise self._fail(e) from None
        self._dirty = False
        self.sync_count += 1
        self._synced_end = self._disk_end

    def _write_header(self, synced_end: int, commit: int) -> None:
        try:
            _pwrite_all(self._fd, self._pack_header(synced_end, commit), 0)
            os.fdatasync(self._fd)
        except OSError as e:
            raise self._fail(e) from None
        self._header_synced_end = synced_end
        self._header_commit = commit
        if not self._dirty:
            self._synced_end = self._disk_end

    def _truncate_file(self) -> None:
        """Durably drop every record after the log (the tail)."""
        cut = self._end
        if self._header_synced_end > cut:
            # Lower the "known good" mark before the data below it changes.
            self._write_header(cut, self._commit)
        try:
            if self._disk_end > cut:
                _pwrite_all(self._fd, bytes(self._disk_end - cut), cut)
            os.fdatasync(self._fd)
        except OSError as e:
            raise self._fail(e) from None
        self._tail.clear()
        self._disk_end = self._synced_end = cut
        self._dirty = False

    # -- pysyncobj Journal interface ---------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._check()
        if not isinstance(command, bytes):
            command = bytes(command, "utf-8") if isinstance(command, str) else bytes(command)
        entry = (command, idx, term)
        if self._tail:
            old, off = self._tail[0]
            if old == entry:  # pysyncobj re-appending an entry we hold: keep it
                self._tail.popleft()
                self._entries.append(old)
                self._offsets.append(off)
                self._end = off + _J_REC.size + len(command)
                self.reused += 1
                return
            if self.on_conflict is not None:
                self.on_conflict(old[1])
            self._truncate_file()  # a real conflict
        if not command or len(command) > _J_MAX_COMMAND:
            raise StateError(f"refusing to journal a command of {len(command)} bytes")
        rec = self._encode(command, idx, term)
        end = self._end + len(rec)
        try:
            if end > self._alloc:
                new = -(-end // _J_PREALLOC) * _J_PREALLOC
                _pwrite_all(self._fd, bytes(new - self._alloc), self._alloc)
                self._alloc = new
            _pwrite_all(self._fd, rec, self._end)
        except OSError as e:
            raise self._fail(e) from None
        self._entries.append(entry)
        self._offsets.append(self._end)
        self._end = self._disk_end = end
        self._dirty = True

    def clear(self) -> None:
        self.deleteEntriesFrom(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        self._check()
        if entryFrom >= len(self._entries):
            return
        moved = list(zip(self._entries[entryFrom:], self._offsets[entryFrom:], strict=True))
        self._tail.extendleft(reversed(moved))
        self._end = self._offsets[entryFrom]
        del self._entries[entryFrom:]
        del self._offsets[entryFrom:]

    def deleteEntriesTo(self, entryTo: int) -> None:
        self._check()
        keep = self._entries[entryTo:]
        old = self._fd
        try:
            self._fd = self._create(self.path, keep, self._commit)
        except OSError as e:
            raise self._fail(e) from None
        os.close(old)

    def __getitem__(self, item: int | slice) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(StateError):
            self.sync()
            self._write_header(self._synced_end, self._commit)
        os.close(self._fd)
        self._fd = -1

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        self._commit = raftCommitIndex

    def getRaftCommitIndex(self) -> int:
        # Advisory (it lets a restarted node re-apply before it hears from a leader);
        # never beyond what this journal holds.
        return max(1, min(self._commit, self._last_index() or 1))

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        # Raft: durable before any message reflecting it is sent.
        try:
            _write_file_durably(
                self.meta_path, _checked_dumps({"term": term, "voted_for": votedForNodeId})
            )
        except OSError as e:
            raise self._fail(e) from None
        self._term, self._voted_for = term, votedForNodeId

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> str | None:
        return self._voted_for

    def onOneSecondTimer(self) -> None:
        if self._failed is not None:
            return
        if self._synced_end != self._header_synced_end or self._commit != self._header_commit:
            with contextlib.suppress(StateError):
                self._write_header(self._synced_end, self._commit)

    # -- introspection -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "first_index": self._entries[0][1] if self._entries else 0,
            "last_index": self._last_index(),
            "durable_index": self.durable_index,
            "syncs": self.sync_count,
            "reused": self.reused,
            "tail": len(self._tail),
        }


# ---- snapshot codec --------------------------------------------------------------------

_SNAPSHOT_FORMAT = "nebula-raft-snapshot"
_SNAPSHOT_VERSION = 1


def _entry_to_json(entry: tuple) -> list:
    cmd, idx, term = entry
    return [bytes(cmd).hex(), int(idx), int(term)]


def _entry_from_json(obj: Any, where: str) -> tuple[bytes, int, int]:
    if not (isinstance(obj, list) and len(obj) == 3):
        raise StateError(f"{where}: malformed log entry")
    cmd, idx, term = obj
    if not (isinstance(cmd, str) and type(idx) is int and type(term) is int):
        raise StateError(f"{where}: malformed log entry")
    return bytes.fromhex(cmd), idx, term


def _states_to_json(states: Mapping[bytes, SignRecord]) -> list:
    return [
        [
            chain.hex(),
            r.height,
            r.round,
            r.step,
            r.sign_bytes.hex(),
            r.signature.hex(),
            r.ext_sign_bytes.hex(),
            r.ext_signature.hex(),
        ]
        for chain, r in sorted(states.items())
    ]


def _states_from_json(obj: Any, where: str) -> dict[bytes, SignRecord]:
    out: dict[bytes, SignRecord] = {}
    if not isinstance(obj, list):
        raise StateError(f"{where}: malformed chain states")
    for row in obj:
        try:
            chain_h, h, r, s, sb, sig, esb, esig = row
            rec = _record_from_args(
                h,
                r,
                s,
                bytes.fromhex(sb),
                bytes.fromhex(sig),
                bytes.fromhex(esb),
                bytes.fromhex(esig),
            )
            chain = bytes.fromhex(chain_h)
        except (TypeError, ValueError):
            rec = None
        if rec is None:
            raise StateError(f"{where}: malformed chain state {row!r}")
        out[chain] = rec
    return out


def encode_snapshot(
    states: Mapping[bytes, SignRecord], last: tuple, prev: tuple, cluster: list[list]
) -> bytes:
    return _checked_dumps(
        {
            "format": _SNAPSHOT_FORMAT,
            "version": _SNAPSHOT_VERSION,
            "last": _entry_to_json(last),
            "prev": _entry_to_json(prev),
            "cluster": cluster,
            "chains": _states_to_json(states),
        }
    )


def decode_snapshot(
    raw: bytes, where: str
) -> tuple[dict[bytes, SignRecord], tuple, tuple, list[tuple[str, str]]]:
    obj = _checked_loads(raw, where)
    if not isinstance(obj, dict) or obj.get("format") != _SNAPSHOT_FORMAT:
        raise StateError(f"{where}: not a Nebula Raft snapshot")
    if obj.get("version") != _SNAPSHOT_VERSION:
        raise StateError(f"{where}: snapshot version {obj.get('version')}, expected 1")
    cluster = obj.get("cluster")
    if not isinstance(cluster, list) or not all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in cluster
    ):
        raise StateError(f"{where}: malformed cluster list")
    return (
        _states_from_json(obj.get("chains"), where),
        _entry_from_json(obj.get("last"), where),
        _entry_from_json(obj.get("prev"), where),
        [(a, b) for a, b in cluster],
    )


# ---- the state machine -----------------------------------------------------------------


def _record_from_args(
    h: Any, r: Any, s: Any, sb: Any, sig: Any, esb: Any, esig: Any
) -> SignRecord | None:
    """A SignRecord from replicated arguments, or None if they are not exactly ints/bytes."""
    if not (type(h) is int and type(r) is int and type(s) is int):
        return None
    if h < 0 or r < 0 or not 0 <= s <= 3:
        return None
    if not all(type(x) is bytes for x in (sb, sig, esb, esig)):
        return None
    return SignRecord(h, r, s, sb, sig, esb, esig)


class _SignStateMachine:
    """The replicated state: last sign record per chain.  Deterministic, no I/O."""

    def __init__(self) -> None:
        self.states: dict[bytes, SignRecord] = {}

    def sign(self, chain: Any, *fields: Any) -> Decision:
        try:
            rec = _record_from_args(*fields) if len(fields) == 7 else None
            if rec is None or type(chain) is not bytes:
                return Decision(
                    Verdict.REFUSE, error=StateError("malformed replicated sign command")
                )
            cur = self.states.get(chain)
            new, decision = guard_apply(cur, rec)
            if new is not None and new is not cur:
                self.states[chain] = new
            return decision
        except Exception as e:  # never raise inside pysyncobj's apply loop
            logger.error("state machine refused a command it could not evaluate: %r", e)
            return Decision(Verdict.REFUSE, error=StateError(f"state machine error: {e!r}"))

    def raise_to(self, chain: Any, *fields: Any) -> bool:
        rec = _record_from_args(*fields) if len(fields) == 7 else None
        if rec is None or type(chain) is not bytes:
            return False
        cur = self.states.get(chain)
        if cur is None or rec.hrs > cur.hrs:
            self.states[chain] = rec
            return True
        return False

    def merge(self, states: Mapping[bytes, SignRecord]) -> None:
        """Install a snapshot: per chain, the higher of the two records (S4)."""
        for chain, rec in states.items():
            cur = self.states.get(chain)
            if cur is None or rec.hrs > cur.hrs:
                self.states[chain] = rec


def _fields(rec: SignRecord) -> tuple[int, int, int, bytes, bytes, bytes, bytes]:
    """Only ints and bytes go into the replicated log (no enums, no memoryviews)."""
    return (
        int(rec.height),
        int(rec.round),
        int(rec.step),
        bytes(rec.sign_bytes),
        bytes(rec.signature),
        bytes(rec.ext_sign_bytes),
        bytes(rec.ext_signature),
    )


# ---- pysyncobj adaptation --------------------------------------------------------------


class _PeerNode(TCPNode):
    """A member identified by its Nebula node id; ``host:port`` is only where to dial."""

    def __init__(self, node_id: int, address: str) -> None:
        super().__init__(address)
        self._id = _ident(node_id)
        self._nb_hash = hash(self._id)

    def __hash__(self) -> int:
        # pysyncobj keys its per-node dicts and sets by Node and hashes a node ~70 times
        # per commit on the leader; Node.__hash__ is hash(self.id) through a property
        # (~9 % of the leader's CPU).  Same value, computed once; equality is still
        # Node.__eq__ (same id).
        return self._nb_hash

    # Membership-change log entries carry pickled nodes.  str hashes differ between
    # processes (hash randomisation), so the cached hash never travels with a node.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_nb_hash", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__["_nb_hash"] = hash(self._id)

    @property
    def address(self) -> str:
        # pysyncobj sends ``address`` in its handshake and compares it to decide who
        # dials whom, so it must be the same on every member: the identity.
        return self._id

    @property
    def dial(self) -> str:
        return f"{self.host}:{self.port}"


class _LoopPoller(Poller):
    """pysyncobj's poller interface backed by an asyncio event loop ("pattern B")."""

    _R = POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR
    _W = POLL_EVENT_TYPE.WRITE

    def __init__(self, loop: asyncio.AbstractEventLoop, kick: Callable[[], None]) -> None:
        self._loop = loop
        self._kick = kick
        self.delivered = [0, 0]
        self._cbs: dict[int, Callable[[int, int], None]] = {}
        self._masks: dict[int, int] = {}

    def subscribe(self, descr: int, callback: Callable[[int, int], None], eventMask: int) -> None:
        old = self._masks.get(descr, 0)
        self._cbs[descr] = callback
        want_r, want_w = bool(eventMask & self._R), bool(eventMask & self._W)
        had_r, had_w = bool(old & self._R), bool(old & self._W)
        if want_r and not had_r:
            self._loop.add_reader(descr, self._dispatch, descr, POLL_EVENT_TYPE.READ)
        elif had_r and not want_r:
            self._loop.remove_reader(descr)
        if want_w and not had_w:
            self._loop.add_writer(descr, self._dispatch, descr, POLL_EVENT_TYPE.WRITE)
        elif had_w and not want_w:
            self._loop.remove_writer(descr)
        self._masks[descr] = (self._R if want_r else 0) | (self._W if want_w else 0)

    def unsubscribe(self, descr: int) -> None:
        self._cbs.pop(descr, None)
        mask = self._masks.pop(descr, 0)
        if mask & self._R:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(descr)
        if mask & self._W:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(descr)

    def _dispatch(self, descr: int, event: int) -> None:
        cb = self._cbs.get(descr)
        delivered = self.delivered  # counted by _DurableTransport: [received, quiet]
        delivered[0] = delivered[1] = 0
        if cb is not None:
            try:
                cb(descr, event)
            except Exception:
                logger.exception("raft transport callback failed")
        received, quiet = delivered
        if received == 0 or quiet < received:
            self._kick()
        # else: only acknowledgements that cannot move the commit index (the slower
        # follower's ack of an entry already committed) - a tick would find nothing to
        # do; the next proposal, message or the 20 ms timer tick runs one.

    def poll(self, timeout: float) -> None:
        """The event loop does the waiting."""

    def close(self) -> None:
        for descr in list(self._masks):
            self.unsubscribe(descr)


class _LoopNotifier:
    """Replaces pysyncobj's PipeNotifier: a new proposal schedules a tick on the loop."""

    def __init__(self, poller: _LoopPoller, callback: Any = None) -> None:
        self._poller = poller

    def notify(self) -> None:
        self._poller._kick()


#: pysyncobj frames every message as a native int32 length + that many bytes.
_FRAME_LEN = struct.Struct("i")
#: Largest frame accepted before the peer has proven it holds the cluster secret (the
#: handshake messages are a 32-byte key and a node id, under 200 bytes on the wire).
MAX_FRAME_UNAUTHENTICATED = 1 << 16
#: Largest frame accepted from an authenticated peer.  The largest legitimate one is
#: an AppendEntries batch: pysyncobj fills it until the commands reach 64 KiB
#: (``appendEntriesBatchSizeBytes``), so its last command may add up to the journal's
#: 1 MiB limit, plus pickle/zlib/AEAD overhead: ~1.2 MiB.  A single larger entry and
#: snapshots are sent in 64 KiB chunks.
MAX_FRAME = 1 << 24


class _BoundedConnection(TcpConnection):
    """pysyncobj's TcpConnection with bounded frames and without zlib.

    Bounds.  pysyncobj reads a frame's int32 length and then buffers that many bytes
    before it decrypts (authenticates) anything, so a peer without the secret could
    make a node buffer up to 2 GiB per connection.  This class checks the length of
    the frame at the head of the read buffer after every ``recv``: a negative one,
    one above :data:`MAX_FRAME_UNAUTHENTICATED` before the peer's first message
    decrypted, or above :data:`MAX_FRAME` after, drops the connection.  It also
    stops reading as soon as a complete frame is buffered (the event loop is
    level-triggered, the rest is read after that frame is parsed), so the frame at
    the head is always the next one to parse and at most one frame plus one ``recv``
    is ever buffered.

    Format.  pysyncobj zlib-compresses every message (level 3: ~30 us for an
    AppendEntries, ~15 us for an acknowledgement, plus decompression - more than the
    pickling and the encryption together, for ~15 % smaller messages).  Here a frame
    is ``int32 length | _TransportCipher token of pickle(message)``; the cipher's
    ``NB2`` magic marks the format, so a node of an older version (``NB1``: zlib
    inside) and this one refuse each other's messages and never talk.  Checks kept:
    AEAD, the non-decreasing sender timestamp and the per-connection random key.

    Installed on every connection of :class:`_DurableTransport` (outgoing ones in
    ``addNode``, accepted ones in ``_onNewIncomingConnection``, before any byte is
    read or written) by setting ``__class__``: it adds no state, only overrides the
    send and the private read/parse steps of the pinned pysyncobj version.
    """

    def send(self, message: Any) -> None:
        enc = self.encryptor
        if enc is None:  # Nebula always encrypts; never send in the clear
            self.disconnect()
            return
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        token = enc.encrypt_at_time(_pickle.dumps(message, 5), int(time.monotonic()))
        self._TcpConnection__writeBuffer += _FRAME_LEN.pack(len(token)) + token  # type: ignore[has-type]
        self._TcpConnection__trySendBuffer()  # type: ignore[attr-defined]

    def _TcpConnection__processRead(self) -> bool:
        if not super()._TcpConnection__processRead():  # type: ignore[misc]
            return False
        buf = self._TcpConnection__readBuffer  # type: ignore[attr-defined]
        if len(buf) < 4:
            return True
        (length,) = _FRAME_LEN.unpack_from(buf)
        limit = MAX_FRAME if self.sendRandKey else MAX_FRAME_UNAUTHENTICATED
        if not 0 <= length <= limit:
            logger.warning(
                "raft transport: dropping a connection that announced a %d-byte frame (limit %d%s)",
                length,
                limit,
                "" if self.sendRandKey else " before authentication",
            )
            self.disconnect()
            return False
        return len(buf) - 4 < length

    def _TcpConnection__processParseMessage(self) -> Any:
        buf = self._TcpConnection__readBuffer  # type: ignore[attr-defined]
        if len(buf) < 4:
            return None
        (length,) = _FRAME_LEN.unpack_from(buf)
        if length < 0:
            self.disconnect()
            return None
        end = 4 + length
        if len(buf) < end:
            return None
        token = buf[4:end]
        enc = self.encryptor
        try:
            if enc is None:
                raise ValueError("raft transport: no cipher")
            ts = enc.extract_timestamp(token)
            if ts < self.recvLastTimestamp:
                raise ValueError("raft transport: timestamp went backwards")
            self.recvLastTimestamp = ts
            message = _pickle.loads(enc.decrypt(token))
            if self.recvRandKey:
                key, message = message
                if key != self.recvRandKey:
                    raise ValueError("raft transport: message of another connection")
        except Exception:
            self.disconnect()
            return None
        self._TcpConnection__readBuffer = buf[end:]
        return message


def _bound(conn: Any) -> None:
    if type(conn) is TcpConnection:
        conn.__class__ = _BoundedConnection


class _DurableTransport(TCPTransport):
    """pysyncobj's TCP transport with the journal flushed before acknowledgements and
    frame lengths bounded (:class:`_BoundedConnection`)."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self.heard: dict[Node, float] = {}
        self._ae_sent: dict[Node, float] = {}
        super().__init__(syncObj, selfNode, otherNodes)

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None:
            _bound(conn)

    def _onNewIncomingConnection(self, conn: Any) -> None:
        _bound(conn)
        super()._onNewIncomingConnection(conn)

    def send(self, node: Any, message: Any) -> bool:
        if type(message) is not dict or message.get("type") != "append_entries":
            # next_node_idx (AppendEntries ack), votes, forwarded-command replies:
            # nothing that vouches for our log may leave before the log is durable.
            self._syncObj._nb_sync()
        elif message.get("entries") == []:
            # An AppendEntries without entries only carries the commit index (and
            # serves as heartbeat).  pysyncobj sends one to every follower right after
            # each commit, which doubles the messages per commit; skip it when this
            # follower got an AppendEntries less than a heartbeat interval ago.  The
            # next entry or heartbeat carries the commit index, and a follower still
            # hears from the leader at least every ~2 heartbeat intervals (elections
            # need more than 3).
            now = time.monotonic()
            if now - self._ae_sent.get(node, -1e9) < self._syncObj.conf.appendEntriesPeriod:
                return True
            self._ae_sent[node] = now
        else:
            self._ae_sent[node] = time.monotonic()
        return super().send(node, message)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        self.heard[node] = time.monotonic()
        obj = self._syncObj
        ack = (
            type(message) is dict
            and message.get("type") == "next_node_idx"
            and message.get("success")
            and not message.get("reset")
        )
        delivered = getattr(obj._nb_poller, "delivered", None)
        if delivered is not None:  # the loop driver's poller counts what it delivered
            delivered[0] += 1
            acked = message.get("next_node_idx") if ack else None
            if type(acked) is int and acked - 1 <= obj._SyncObj__raftCommitIndex:
                delivered[1] += 1  # acknowledges an entry already committed: no tick
        if not ack:
            super()._onMessageReceived(node, message)
            return
        # An acknowledgement of an older AppendEntries: pysyncobj would set the
        # follower's next index back to just after it - behind entries already sent on
        # the same connection - and send those entries again on the next tick.  With
        # one commit in flight this resent every entry to the slower follower 1-3 times
        # (extra messages, acks and CPU on both sides).  Keep the next index where it
        # was; it is only a hint: a follower missing entries rejects the next
        # AppendEntries and its reset moves it back.
        next_index = obj._SyncObj__raftNextIndex
        before = next_index.get(node)
        super()._onMessageReceived(node, message)
        if before is not None and next_index.get(node, before) < before:
            next_index[node] = before


class _SignSyncObj(SyncObj):
    """The pysyncobj object; its replicated methods carry only ints and bytes."""

    def __init__(
        self,
        sm: _SignStateMachine,
        sync: Callable[[], None],
        self_node: _PeerNode,
        others: list[_PeerNode],
        conf: Any,
        poller: _LoopPoller | None = None,
    ) -> None:
        # Set before SyncObj.__init__, which creates the transport.
        self._nb_sm = sm
        self._nb_sync = sync
        self._nb_poller = poller  # the loop driver's poller (None: pysyncobj's own)
        super().__init__(self_node, others, conf, transportClass=_DurableTransport)

    @replicated
    def nb_sign(self, chain, h, r, s, sb, sig, esb, esig):  # type: ignore[no-untyped-def]
        return self._nb_sm.sign(chain, h, r, s, sb, sig, esb, esig)

    @replicated
    def nb_raise(self, chain, h, r, s, sb, sig, esb, esig):  # type: ignore[no-untyped-def]
        return self._nb_sm.raise_to(chain, h, r, s, sb, sig, esb, esig)

    @replicated
    def nb_barrier(self, term):  # type: ignore[no-untyped-def]
        return term

    def nb_transport(self) -> _DurableTransport:
        return self._SyncObj__transport  # type: ignore[attr-defined]


class _TransportCipher:
    """The cluster-secret encryption of the Raft transport: ChaCha20-Poly1305.

    pysyncobj calls ``encrypt_at_time(data, t)``, ``extract_timestamp(token)`` and
    ``decrypt(token)`` - Fernet's interface, whose AES-CBC + HMAC + base64 costs
    about 50 us per message each way here.  This AEAD keeps the interface and its
    guarantees (authenticated, timestamp checked as pysyncobj does) at a few us.

    Keys: ``master = PBKDF2-HMAC-SHA256(secret, 200k iterations, Nebula salt)``; each
    instance draws a random 16-byte sender id and encrypts with
    ``HKDF(master, salt=sender id)`` and a 64-bit message counter as nonce, so a
    nonce never repeats under a key.  Token: ``"NB2" | sender id | timestamp |
    counter | ciphertext+tag``, the header being authenticated data.  pysyncobj puts
    a per-connection random key inside every message, which binds messages to their
    connection (replay across connections fails), as with Fernet.
    """

    _MAGIC = b"NB2"  # NB1: zlib inside (pysyncobj's own framing)
    _HEAD = struct.Struct(">3s16sQQ")
    _NONCE = struct.Struct(">4xQ")

    def __init__(self, secret: bytes) -> None:
        self._master = PBKDF2HMAC(
            algorithm=hashes.SHA256(),
            length=32,
            salt=b"nebula/raft-transport/v1",
            iterations=200_000,
        ).derive(secret)
        self._sender = os.urandom(16)
        self._send = ChaCha20Poly1305(self._subkey(self._sender))
        self._counter = 0
        self._recv: collections.OrderedDict[bytes, ChaCha20Poly1305] = collections.OrderedDict()
        self._last: tuple[bytes, int, bytes] | None = None

    def _subkey(self, sender: bytes) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=sender, info=b"nebula raft chacha20poly1305"
        ).derive(self._master)

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        self._counter += 1
        head = self._HEAD.pack(self._MAGIC, self._sender, current_time, self._counter)
        return head + self._send.encrypt(self._NONCE.pack(self._counter), data, head)

    def _open(self, token: bytes) -> tuple[int, bytes]:
        last = self._last
        if last is not None and last[0] is token:
            return last[1], last[2]
        if len(token) < self._HEAD.size + 16:
            raise ValueError("raft transport: short token")
        magic, sender, ts, counter = self._HEAD.unpack_from(token)
        if magic != self._MAGIC:
            raise ValueError("raft transport: not a Nebula token (mixed versions?)")
        aead = self._recv.get(sender)
        if aead is None:
            aead = self._recv[sender] = ChaCha20Poly1305(self._subkey(sender))
            if len(self._recv) > 64:
                self._recv.popitem(last=False)
        head = token[: self._HEAD.size]
        try:
            plain = aead.decrypt(self._NONCE.pack(counter), token[self._HEAD.size :], head)
        except InvalidTag:
            raise ValueError("raft transport: authentication failed (wrong secret?)") from None
        self._last = (token, ts, plain)
        return ts, plain

    def extract_timestamp(self, token: bytes) -> int:
        return self._open(token)[0]

    def decrypt(self, token: bytes) -> bytes:
        return self._open(token)[1]


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _patched(
    journal_factory: Callable[[str], Journal],
    poller_factory: Callable[[str], Poller] | None,
) -> Iterator[None]:
    """Swap pysyncobj's journal, cipher (and poller/notifier) factories while one
    SyncObj is being constructed; they are looked up only in SyncObj.__init__."""
    with _PATCH_LOCK:
        saved = (_ps.createJournal, _ps.createPoller, _ps.PipeNotifier, _ps.getEncryptor)
        _ps.createJournal = journal_factory
        _ps.getEncryptor = _TransportCipher
        if poller_factory is not None:
            _ps.createPoller = poller_factory
            _ps.PipeNotifier = _LoopNotifier
        try:
            yield
        finally:
            _ps.createJournal, _ps.createPoller, _ps.PipeNotifier, _ps.getEncryptor = saved


# ---- the store -------------------------------------------------------------------------


def _expire(fut: asyncio.Future, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(
            ReplicationError(
                f"raft commit not confirmed within {timeout:g}s: outcome unknown, nothing released"
            )
        )


class RaftStore(SignStore):
    """A :class:`SignStore` replicated by Raft among ``peers`` (see module docstring).

    * ``peers``: every member's node id, including this one, to the ``host:port``
      this node dials it at; ``bind_addr``: where this node listens.
    * ``data_path``: journal, term/vote record and snapshot (one process per
      directory, enforced with a lock file).
    * ``secret``: the cluster secret (>= 16 bytes; required).  Keys the transport
      encryption and authentication; without it pysyncobj would unpickle anything.
    * ``initial``: imported priv_validator_state per chain; replicated through the
      log and only ever raises the high-water mark.  Give it to every node.
    * ``commit_timeout``: how long :meth:`commit` waits for the majority (unknown
      outcome after that - nothing is released).
    * ``election_timeout_min/max``, ``heartbeat_interval``: Raft timing (failover is
      roughly election_timeout + one round trip).  ``leader_fallback_timeout``: an
      isolated leader steps down after this long without a majority.
    * ``log_compaction_entries/seconds``: snapshot + journal compaction triggers.
    * ``dynamic_membership``: allow :meth:`add_member` / :meth:`remove_member` (must
      be the same on every node; the membership then comes from the log/snapshot).
    * ``driver``: ``"loop"`` (pysyncobj on ``loop``) or ``"thread"`` (its own thread).
    * ``loop``: the event loop that will use the store (default: the running loop).

    Constructing it binds the Raft port, loads the snapshot and journal, and replays
    committed entries.  Raises :class:`ConfigError` for unusable parameters and
    :class:`StateError` for unreadable or corrupted state.
    """

    def __init__(
        self,
        node_id: int,
        bind_addr: str,
        peers: Mapping[int, str],
        data_path: str | Path,
        secret: bytes,
        *,
        initial: Mapping[str, SignRecord | None] | None = None,
        commit_timeout: float = 1.0,
        election_timeout_min: float = 0.4,
        election_timeout_max: float = 0.8,
        heartbeat_interval: float = 0.05,
        leader_fallback_timeout: float = 1.0,
        connection_timeout: float | None = None,
        connection_retry: float = 0.25,
        log_compaction_entries: int = 5000,
        log_compaction_seconds: float = 300.0,
        dynamic_membership: bool = False,
        driver: str = "loop",
        tick_interval: float = 0.02,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) == 0:
            raise ConfigError(
                "raft: a cluster secret is required (without one, anyone who reaches the "
                "Raft port can run code in this process through pickle); refusing to start"
            )
        if len(secret) < 16:
            raise ConfigError("raft: the cluster secret must be at least 16 bytes")
        if type(node_id) is not int or node_id < 0:
            raise ConfigError(f"raft: node_id must be a non-negative int, got {node_id!r}")
        if node_id not in peers:
            raise ConfigError(f"raft: peers must include this node ({node_id})")
        if driver not in ("loop", "thread"):
            raise ConfigError(f"raft: driver must be 'loop' or 'thread', got {driver!r}")
        if not 0 < commit_timeout <= 5.0:
            raise ConfigError("raft: commit_timeout must be in (0, 5] seconds")
        _parse_addr(bind_addr, "raft bind_addr")
        for pid, addr in peers.items():
            if type(pid) is not int or pid < 0:
                raise ConfigError(f"raft: peer ids must be non-negative ints, got {pid!r}")
            _parse_addr(addr, f"raft peer {pid}")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise ConfigError("raft: no event loop given and none running") from None

        self.node_id = node_id
        self.commit_timeout = float(commit_timeout)
        self.driver = driver
        self._loop = loop
        self._peers = dict(peers)
        self._tick_interval = tick_interval
        self._quorum_window = max(leader_fallback_timeout / 2, 3 * heartbeat_interval)
        self._closed = False
        self._fatal: str | None = None
        self._pending: set[asyncio.Future] = set()
        self._role_callbacks: list[Callable[[bool], Any]] = []
        self._announced = False
        self._raft_stopped = False
        self._was_leader = False
        self._ready_term = -1
        self._barrier_term = -1  # term of the barrier in flight
        self._barrier_deadline = 0.0
        self._import_deadline = 0.0  # imports in flight until then
        self._next_import_try = 0.0
        self._tick_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._raft_calls: collections.deque[Callable[[], None]] = collections.deque()

        self.data_path = Path(data_path)
        try:
            self.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(f"{self.data_path}: cannot create raft data directory: {e}") from None
        self._lock_fd = self._lock_data_dir()
        try:
            self._build(
                bind_addr,
                secret=bytes(secret),
                initial=initial or {},
                election=(election_timeout_min, election_timeout_max),
                heartbeat=heartbeat_interval,
                fallback=leader_fallback_timeout,
                conn_timeout=connection_timeout,
                conn_retry=connection_retry,
                compaction=(log_compaction_entries, log_compaction_seconds),
                dynamic=dynamic_membership,
            )
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- construction ------------------------------------------------------------------

    def _lock_data_dir(self) -> int:
        path = self.data_path / "raft.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(
                f"{self.data_path}: raft data directory is in use by another process"
            ) from None
        return fd

    def _build(
        self,
        bind_addr: str,
        *,
        secret: bytes,
        initial: Mapping[str, SignRecord | None],
        election: tuple[float, float],
        heartbeat: float,
        fallback: float,
        conn_timeout: float | None,
        conn_retry: float,
        compaction: tuple[int, float],
        dynamic: bool,
    ) -> None:
        self._sm = _SignStateMachine()
        self.journal_path = self.data_path / "raft.journal"
        self.snapshot_path = self.data_path / "raft.snapshot"
        head = None
        if self.snapshot_path.exists():
            try:
                raw = self.snapshot_path.read_bytes()
            except OSError as e:
                raise StateError(f"{self.snapshot_path}: cannot read snapshot: {e}") from None
            states, last, prev, _ = decode_snapshot(raw, f"{self.snapshot_path}")
            self._sm.merge(states)
            head = (prev, last)

        self._self_node = _PeerNode(self.node_id, self._peers[self.node_id])
        self._nodes: dict[int, _PeerNode] = {self.node_id: self._self_node}
        for pid, addr in self._peers.items():
            if pid != self.node_id:
                self._nodes[pid] = _PeerNode(pid, addr)

        self._imports: dict[bytes, SignRecord] = {}
        for chain_id, rec in initial.items():
            if rec is not None:
                self._imports[chain_id.encode()] = rec
        self._drop_satisfied_imports()

        emin, emax = election
        try:
            conf = SyncObjConf(
                password=secret,
                autoTick=self.driver == "thread",
                appendEntriesUseBatch=False,
                journalFile=str(self.journal_path),
                fullDumpFile=str(self.snapshot_path),
                serializer=self._serialize,
                deserializer=self._deserialize,
                bindAddress=bind_addr,
                raftMinTimeout=emin,
                raftMaxTimeout=emax,
                appendEntriesPeriod=heartbeat,
                leaderFallbackTimeout=fallback,
                connectionTimeout=conn_timeout if conn_timeout is not None else max(1.0, emax),
                connectionRetryTime=conn_retry,
                commandsWaitLeader=False,
                logCompactionMinEntries=compaction[0],
                logCompactionMinTime=compaction[1],
                dynamicMembershipChange=dynamic,
                maxBindRetries=1,
                useFork=False,
            )
            conf.validate()
        except AssertionError:
            raise ConfigError(
                "raft: inconsistent timeouts (need election_timeout_min > 3 x "
                "heartbeat_interval, election_timeout_max > election_timeout_min, "
                "leader_fallback_timeout > heartbeat_interval, connection_timeout >= "
                "election_timeout_max, log_compaction_entries >= 2)"
            ) from None

        def journal_factory(path: str | None) -> Journal:
            journal = DurableJournal(self.journal_path, snapshot_head=head)
            journal.on_conflict = self._on_conflict
            journal.on_failure = self._on_journal_failure
            self._journal = journal
            return journal

        poller_factory = None
        poller: _LoopPoller | None = None
        if self.driver == "loop":
            poller = self._poller = _LoopPoller(self._loop, self._kick)
            poller_factory = lambda _type: poller  # noqa: E731

        others = [n for pid, n in self._nodes.items() if pid != self.node_id]
        try:
            with _patched(journal_factory, poller_factory):
                obj = _SignSyncObj(
                    self._sm, self._sync_journal, self._self_node, others, conf, poller
                )
        except SyncObjException as e:
            raise ConfigError(
                f"raft: cannot listen on {bind_addr} ({e.errorCode}); is the address in use?"
            ) from None
        self._obj = obj
        obj.addOnTickCallback(self._on_raft_tick)
        if self.driver == "loop":
            self._tick()
            self._timer = self._loop.call_later(self._tick_interval, self._on_timer)
        else:
            try:
                obj.waitBinded()
            except SyncObjException:
                obj.destroy()
                raise ConfigError(f"raft: cannot listen on {bind_addr}; is it in use?") from None
            self._timer = self._loop.call_later(self._tick_interval, self._on_timer)
        logger.info(
            "raft node %d listening on %s with %d peer(s), driver=%s",
            self.node_id,
            bind_addr,
            len(others),
            self.driver,
        )

    # -- snapshot hooks (called by pysyncobj inside a tick) ----------------------------

    def _serialize(self, filename: str, data: tuple) -> None:
        last, prev, cluster = data
        members = sorted(
            [n.address, n.dial] if isinstance(n, _PeerNode) else [str(n.id), str(n.id)]
            for n in cluster
        )
        raw = encode_snapshot(self._sm.states, last, prev, members)
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _pwrite_all(fd, raw, 0)
            os.fsync(fd)  # pysyncobj renames it; the journal compaction fsyncs the dir
        finally:
            os.close(fd)

    def _deserialize(self, filename: str) -> tuple:
        try:
            fd = os.open(filename, os.O_RDONLY)
            try:
                # A snapshot received from the leader is about to replace the journal:
                # make it (and its rename) durable first.
                os.fsync(fd)
                size = os.fstat(fd).st_size
                raw = os.pread(fd, size, 0)
            finally:
                os.close(fd)
            _fsync_dir(Path(filename).parent)
            states, last, prev, cluster = decode_snapshot(raw, filename)
        except (OSError, StateError) as e:
            self._fatal = f"cannot load raft snapshot {filename}: {e}"
            logger.critical("%s", self._fatal)
            raise
        self._sm.merge(states)
        by_ident = {n.address: n for n in self._nodes.values()}
        nodes = []
        for ident, dial in cluster:
            node = by_ident.get(ident)
            if node is None:
                nid = _node_id_of(ident)
                if nid is None:
                    continue
                node = _PeerNode(nid, dial)
            nodes.append(node)
        return last, prev, set(nodes)

    def _on_conflict(self, index: int) -> None:
        applied = self._obj.raftLastApplied if hasattr(self, "_obj") else 0
        if index <= applied:
            # Raft never overwrites a committed entry; if it happens, stop deciding.
            self._fatal = (
                f"raft log conflict at index {index} which this node already applied "
                f"(applied: {applied}); refusing to sign until an operator investigates"
            )
            logger.critical("%s", self._fatal)
        else:
            logger.info("raft: dropping uncommitted log entries from index %d (new leader)", index)

    def _on_journal_failure(self, msg: str) -> None:
        # Fail closed: refuse to sign and leave the cluster (a node that cannot make
        # its log durable must neither acknowledge entries nor vote).
        self._fatal = f"{msg}; the node left the cluster - fix the disk and restart it"
        self._loop.call_soon_threadsafe(self._stop_raft)

    def _stop_raft(self) -> None:
        if self._raft_stopped:
            return
        self._raft_stopped = True
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(StateError(self._fatal or "raft node stopped"))
        try:
            self._obj.destroy()
        except Exception:
            logger.exception("raft: error while leaving the cluster")
        self._after_tick()

    # -- driving pysyncobj -------------------------------------------------------------

    def _sync_journal(self) -> None:
        self._journal.sync()

    def _kick(self) -> None:
        if self._tick_pending or self._closed:
            return
        self._tick_pending = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._loop.call_soon(self._tick)
        else:
            self._loop.call_soon_threadsafe(self._tick)

    def _tick(self) -> None:
        self._tick_pending = False
        if self._closed or self._raft_stopped:
            return
        try:
            # Entries appended since the last tick are durable before the leader's
            # commit index can count this node's copy.
            self._journal.sync()
            self._obj.doTick(0)
        except Exception:
            logger.exception("raft tick failed")
        self._after_tick()

    def _on_timer(self) -> None:
        if self._closed:
            return
        self._timer = self._loop.call_later(self._tick_interval, self._on_timer)
        if self.driver == "loop":
            self._tick()
        else:
            self._after_tick()

    def _on_raft_tick(self) -> None:
        """Runs inside every pysyncobj tick, after new entries were appended and sent."""
        try:
            self._journal.sync()
        except StateError:
            pass  # the journal logged it; the send hook refuses to acknowledge
        while self._raft_calls:
            fn = self._raft_calls.popleft()
            try:
                fn()
            except Exception:
                logger.exception("raft call failed")

    def _in_raft(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` where pysyncobj's internals may be touched."""
        if self.driver == "loop":
            fn()
        else:
            self._raft_calls.append(fn)

    def _callback(self, fut: asyncio.Future) -> Callable[[Any, int], None]:
        def resolve(res: Any, err: int) -> None:
            if not fut.done():  # a commit() that timed out sees nothing
                fut.set_result((res, err))

        if self.driver == "loop":
            return resolve

        def threaded(res: Any, err: int) -> None:
            self._loop.call_soon_threadsafe(resolve, res, err)

        return threaded

    # -- leadership --------------------------------------------------------------------

    def _quorum_recent(self) -> bool:
        """This node plus the peers heard from within the quorum window are a majority."""
        obj = self._obj
        if self.driver == "loop":
            others = obj._SyncObj__otherNodes  # same thread as pysyncobj: no copy needed
        else:
            try:
                others = obj.otherNodes
            except RuntimeError:  # driver="thread": membership changing right now
                return False
        heard = obj.nb_transport().heard
        since = time.monotonic() - self._quorum_window
        alive = 1
        for n in others:
            if heard.get(n, -1e9) > since:
                alive += 1
        return alive * 2 > len(others) + 1

    def is_authoritative(self) -> bool:
        """Leader of the current term, its barrier applied, a majority heard recently."""
        obj = self._obj
        return (
            not self._closed
            and self._fatal is None
            and obj._isLeader()
            and self._ready_term == obj.raftCurrentTerm
            and self._quorum_recent()
        )

    def on_role_change(self, callback: Callable[[bool], Any]) -> Callable[[], None]:
        """Call ``callback(is_leader)`` on the loop whenever authority is gained or lost.

        Returns a function that unregisters the callback.
        """
        self._role_callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._role_callbacks.remove(callback)

        return remove

    def _after_tick(self) -> None:
        if self._closed:
            return
        obj = self._obj
        leader = obj._isLeader() and not self._raft_stopped
        term = obj.raftCurrentTerm
        if self._raft_stopped:
            self._imports.clear()
        now = time.monotonic()
        if (
            leader
            and self._ready_term != term
            and (self._barrier_term != term or now > self._barrier_deadline)
        ):
            self._propose_barrier(term)
        if self._imports and now >= max(self._import_deadline, self._next_import_try):
            if obj._getLeader() is not None:
                self._next_import_try = now + 0.5
                self._propose_imports()
        if self._was_leader and not leader:
            logger.info(
                "raft node %d stepped down (term %d, leader now %s)",
                self.node_id,
                term,
                self._leader_id(),
            )
        self._was_leader = leader
        authoritative = self.is_authoritative()
        if authoritative != self._announced:
            self._announced = authoritative
            logger.info(
                "raft node %d %s (term %d)",
                self.node_id,
                "is the leader" if authoritative else "is no longer the leader",
                term,
            )
            for cb in list(self._role_callbacks):
                self._loop.call_soon(cb, authoritative)

    def _propose_barrier(self, term: int) -> None:
        """A no-op entry of this term: once it is applied, so is everything before it,
        and this leader's state answers for the cluster."""
        self._barrier_term = term
        self._barrier_deadline = time.monotonic() + max(2 * self.commit_timeout, 1.0)
        if self._imports:
            self._propose_imports()

        def done(res: Any, err: int) -> None:
            if self._barrier_term == term:
                self._barrier_deadline = 0.0  # a failed barrier is retried at once
            if err == FAIL_REASON.SUCCESS:
                self._ready_term = term

        cb: Callable[[Any, int], None] = done
        if self.driver == "thread":

            def cb(res: Any, err: int) -> None:
                self._loop.call_soon_threadsafe(done, res, err)

        self._obj.nb_barrier(term, callback=cb)

    def _drop_satisfied_imports(self) -> None:
        for chain, rec in list(self._imports.items()):
            cur = self._sm.states.get(chain)
            if cur is not None and cur.hrs >= rec.hrs:
                del self._imports[chain]

    def _propose_imports(self) -> None:
        self._drop_satisfied_imports()
        if not self._imports:
            return
        self._import_deadline = time.monotonic() + max(2 * self.commit_timeout, 1.0)
        todo = len(self._imports)

        def done(res: Any, err: int) -> None:
            nonlocal todo
            todo -= 1
            if todo == 0:
                self._import_deadline = 0.0
                self._drop_satisfied_imports()

        cb: Callable[[Any, int], None] = done
        if self.driver == "thread":

            def cb(res: Any, err: int) -> None:
                self._loop.call_soon_threadsafe(done, res, err)

        for chain, rec in self._imports.items():
            logger.info(
                "raft: importing sign state %s for chain %r (only ever raises the mark)",
                rec.hrs,
                chain.decode(errors="replace"),
            )
            self._obj.nb_raise(chain, *_fields(rec), callback=cb)

    # -- SignStore ---------------------------------------------------------------------

    def last(self, chain_id: str) -> SignRecord | None:
        return self._sm.states.get(chain_id.encode())

    def all(self) -> dict[str, SignRecord]:
        return {c.decode(errors="replace"): r for c, r in self._sm.states.items()}

    async def commit(self, chain_id: str, record: SignRecord) -> Decision:
        res = await self._propose(self._obj.nb_sign, chain_id, record)
        if not isinstance(res, Decision):
            raise StateError(f"raft state machine returned {type(res).__name__}")
        return res

    async def raise_to(self, chain_id: str, record: SignRecord) -> bool:
        """Import a sign state through the log: it only ever raises the mark (S4).

        Returns True if the state moved, False if it was already at or above it.
        """
        return bool(await self._propose(self._obj.nb_raise, chain_id, record))

    async def _propose(self, method: Callable[..., None], chain_id: str, record: SignRecord) -> Any:
        if self._closed:
            raise ReplicationError("raft store is closed")
        if self._fatal is not None:
            raise StateError(self._fatal)
        if not self._obj._isLeader():
            leader = self._leader_id()
            raise NotLeader(
                f"node {self.node_id} is not the Raft leader"
                + (f" (leader: node {leader})" if leader is not None else " (no leader)")
            )
        if not self._quorum_recent():
            raise ReplicationError(
                f"node {self.node_id} has not heard from a majority of the cluster recently"
            )
        fut: asyncio.Future = self._loop.create_future()
        self._pending.add(fut)
        # The deadline resolves the future first; a late callback then finds it done
        # and releases nothing.
        expiry = self._loop.call_later(self.commit_timeout, _expire, fut, self.commit_timeout)
        try:
            method(chain_id.encode(), *_fields(record), callback=self._callback(fut))
            res, err = await fut
        finally:
            expiry.cancel()
            self._pending.discard(fut)
        if err != FAIL_REASON.SUCCESS:
            name = _FAIL_NAMES.get(err, str(err))
            if err in _NOT_LEADER_REASONS:
                raise NotLeader(f"raft commit failed: {name}")
            raise ReplicationError(f"raft commit failed: {name}")
        return res

    # -- operations --------------------------------------------------------------------

    def _leader_id(self) -> int | None:
        leader = self._obj._getLeader()
        return None if leader is None else _node_id_of(leader.id)

    def status(self) -> dict[str, Any]:
        obj = self._obj
        for _ in range(10):
            try:  # with driver="thread", pysyncobj may mutate these dicts meanwhile
                st = obj.getStatus()
                others = obj.otherNodes
                break
            except RuntimeError:
                time.sleep(0.001)
        else:
            raise ReplicationError("raft status unavailable (state changing too fast)")
        now = time.monotonic()
        heard = obj.nb_transport().heard
        members = {self.node_id} | {nid for n in others if (nid := _node_id_of(n.id)) is not None}
        peers: dict[int, Any] = {}
        for nid in sorted(members):
            if nid == self.node_id:
                continue
            node = self._nodes.get(nid)
            t = heard.get(node) if node is not None else None
            peers[nid] = {
                "address": node.dial if node is not None else None,
                "connected": node is not None and obj.isNodeConnected(node),
                "last_heard_s": None if t is None else round(now - t, 3),
            }
        return {
            "node_id": self.node_id,
            "role": "stopped"
            if self._raft_stopped or self._closed
            else _ROLE_NAMES.get(st["state"], str(st["state"])),
            "authoritative": self.is_authoritative(),
            "term": st["raft_term"],
            "leader_id": self._leader_id(),
            "commit_index": st["commit_idx"],
            "applied_index": st["last_applied"],
            "has_quorum": self._quorum_recent(),
            "members": sorted(members),
            "peers": peers,
            "chains": {
                c.decode(errors="replace"): record_to_json(r)
                for c, r in sorted(self._sm.states.items())
            },
            "journal": self._journal.stats(),
            "driver": self.driver,
            "fatal": self._fatal,
        }

    async def _call(self, fn: Callable[[Callable[[Any, int], None]], None]) -> tuple[Any, int]:
        fut: asyncio.Future = self._loop.create_future()
        cb = self._callback(fut)
        self._in_raft(lambda: fn(cb))
        if self.driver == "loop":
            self._kick()
        return await asyncio.wait_for(fut, max(self.commit_timeout, 1.0))

    async def transfer_leadership(self, to: int | None = None, timeout: float = 5.0) -> int:
        """Hand leadership to node ``to`` (or the most caught-up follower); returns the
        new leader's id.  Retries while the target is catching up."""
        if to is not None and (to == self.node_id or to not in self._nodes):
            raise ConfigError(f"raft: cannot transfer leadership to node {to}")
        if not self._obj._isLeader():
            raise NotLeader(f"node {self.node_id} is not the Raft leader")
        deadline = time.monotonic() + timeout
        target = self._nodes[to] if to is not None else None
        while time.monotonic() < deadline:
            if not self._obj._isLeader():  # lost it while a transfer was under way
                new = self._leader_id()
                if new is not None and new != self.node_id and (to is None or new == to):
                    return new
                await asyncio.sleep(0.01)
                continue
            try:
                _, err = await self._call(
                    lambda cb: self._obj.transferLeadership(target, callback=cb)
                )
            except TimeoutError:
                err = FAIL_REASON.UNKNOWN_OUTCOME
            if err == FAIL_REASON.SUCCESS:
                step_deadline = min(deadline, time.monotonic() + 1.5)
                while time.monotonic() < step_deadline and self._obj._isLeader():
                    await asyncio.sleep(0.01)
            else:  # REQUEST_DENIED: the target is still catching up
                await asyncio.sleep(0.05)
        raise ReplicationError(
            f"raft: leadership transfer{'' if to is None else f' to node {to}'} did not "
            f"complete within {timeout:g}s"
        )

    async def add_member(self, node_id: int, address: str) -> None:
        """Add a member (``dynamic_membership=True`` on every node; run on the leader).

        Start the new node first, with ``peers`` listing the whole new membership and
        an empty data directory; it receives the state by snapshot and log replay.
        """
        _parse_addr(address, f"raft member {node_id}")
        if node_id in self._members():
            raise ConfigError(f"raft: node {node_id} is already a member")
        node = _PeerNode(node_id, address)
        await self._membership(lambda cb: self._obj.addNodeToCluster(node, callback=cb))
        self._nodes[node_id] = node

    async def remove_member(self, node_id: int) -> None:
        """Remove a member (not the leader itself: transfer leadership first)."""
        if node_id == self.node_id:
            raise ConfigError("raft: the leader cannot remove itself; transfer leadership first")
        node = self._nodes.get(node_id)
        if node is None or node_id not in self._members():
            raise ConfigError(f"raft: node {node_id} is not a member")
        await self._membership(lambda cb: self._obj.removeNodeFromCluster(node, callback=cb))

    def _members(self) -> set[int]:
        ids = {_node_id_of(n.id) for n in self._obj.otherNodes}
        return {self.node_id} | {i for i in ids if i is not None}

    async def _membership(self, fn: Callable[[Callable[[Any, int], None]], None]) -> None:
        if not self._obj.conf.dynamicMembershipChange:
            raise ConfigError("raft: membership changes need dynamic_membership=True")
        if not self._obj._isLeader():
            raise NotLeader(f"node {self.node_id} is not the Raft leader")
        try:
            _, err = await self._call(fn)
        except TimeoutError:
            raise ReplicationError("raft membership change: outcome unknown") from None
        if err != FAIL_REASON.SUCCESS:
            raise ReplicationError(
                f"raft membership change failed: {_FAIL_NAMES.get(err, str(err))}"
            )

    def compact(self) -> None:
        """Ask pysyncobj to write a snapshot and compact the journal at the next tick."""
        self._in_raft(self._obj.forceLogCompaction)
        if self.driver == "loop":
            self._kick()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for fut in list(self._pending):
            if not fut.done():
                fut.set_result((None, FAIL_REASON.UNKNOWN_OUTCOME))
        if self._announced:
            self._announced = False
            for cb in list(self._role_callbacks):
                self._loop.call_soon(cb, False)
        obj = self._obj
        if self.driver == "loop":
            try:
                if not self._raft_stopped:
                    obj.destroy()
            finally:
                self._poller.close()
        else:
            await self._loop.run_in_executor(None, obj.destroy_synchronous)
        os.close(self._lock_fd)
