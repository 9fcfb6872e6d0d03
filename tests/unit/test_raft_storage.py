"""The durable Raft log (nebula/raft/storage.py), on the real file system and on MemFS.

Crash tests run on MemFS (tests/support/memfs.py): a scripted workload is crashed before
every file-system operation it performs, each crash in every mode (unsynced changes lost,
kept, cut to a prefix, a random subset of pages), and the recovered log must hold a state
the workload passed through no older than the last one it was told was durable.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import struct
import zlib
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.errors import StateError
from nebula.raft import storage
from nebula.raft.storage import (
    HEADER_SIZE,
    LOG_NAME,
    OS_FS,
    SNAP_NAME,
    Entry,
    HardState,
    Loaded,
    RaftLog,
    Snapshot,
    SnapshotNotSaved,
)
from tests.support.memfs import MODES, CrashPoint, MemFS

PREALLOC = 4096  # small, so that tests cross preallocation boundaries


def E(
    index: int, term: int = 1, data: bytes | None = None, type: int = 0, ctx: bytes = b""
) -> Entry:
    return Entry(index, term, type, data if data is not None else b"d%d\x01\x02" % index, ctx)


# -- environments: the real file system and MemFS ------------------------------------------


class Env:
    def __init__(self, kind: str, tmp_path) -> None:
        self.kind = kind
        if kind == "os":
            self.fs = OS_FS
            self.dir = str(tmp_path / "node" / "raft")
        else:
            self.fs = MemFS()
            self.dir = "/data/node/raft"

    def open(self, prealloc: int = PREALLOC) -> RaftLog:
        return RaftLog(self.dir, fs=self.fs, segment_prealloc=prealloc)

    @staticmethod
    def abandon(log: RaftLog) -> None:
        """The process dies: no seal; the descriptor and the lock go away."""
        log._release()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def raw(self, name: str = LOG_NAME) -> bytes:
        if self.kind == "os":
            with open(self.path(name), "rb") as f:
                return f.read()
        return self.fs.read(self.path(name))

    def write_raw(self, data: bytes, name: str = LOG_NAME) -> None:
        if self.kind == "os":
            with open(self.path(name), "r+b") as f:
                f.truncate(0)
                f.write(data)
        else:
            self.fs.set_content(self.path(name), data)

    def flip(self, offset: int, name: str = LOG_NAME, mask: int = 0x40) -> None:
        raw = bytearray(self.raw(name))
        raw[offset] ^= mask
        self.write_raw(bytes(raw), name)

    def reopen(self, log: RaftLog) -> RaftLog:
        self.abandon(log)
        return self.open()


@pytest.fixture(params=["os", "mem"])
def env(request: pytest.FixtureRequest, tmp_path) -> Env:
    return Env(request.param, tmp_path)


# -- the model ----------------------------------------------------------------------------


@dataclass
class Model:
    """What a RaftLog should hold, kept the simplest way."""

    base: int = 0
    base_term: int = 0
    entries: list[Entry] = field(default_factory=list)
    hs: HardState = field(default_factory=lambda: HardState(0, 0, 0))
    snap: Snapshot | None = None

    @property
    def last(self) -> int:
        return self.base + len(self.entries)

    def term(self, index: int) -> int | None:
        if index == self.base:
            return self.base_term
        if self.base < index <= self.last:
            return self.entries[index - self.base - 1].term
        return None

    def append(self, entries: list[Entry], hs: HardState | None) -> None:
        if entries:
            del self.entries[entries[0].index - self.base - 1 :]
            self.entries.extend(entries)
        if hs is not None:
            self.hs = hs

    def save_snapshot(self, s: Snapshot) -> None:
        keep = self.entries[s.index - self.base :] if self.term(s.index) is not None else []
        self._install(s, keep, max(self.hs.commit, s.index))

    def apply_snapshot(self, s: Snapshot) -> None:
        self._install(s, [], s.index)

    def _install(self, s: Snapshot, keep: list[Entry], commit: int) -> None:
        self.snap, self.base, self.base_term, self.entries = s, s.index, s.term, list(keep)
        self.hs = self.hs._replace(commit=commit)

    def state(self) -> tuple:
        return (self.hs, self.snap, tuple(self.entries))

    @classmethod
    def of(cls, loaded: Loaded) -> Model:
        s = loaded.snapshot
        return cls(
            s.index if s else 0, s.term if s else 0, list(loaded.entries), loaded.hard_state, s
        )


def state_of(loaded: Loaded) -> tuple:
    return (loaded.hard_state, loaded.snapshot, tuple(loaded.entries))


def check_consistent(loaded: Loaded) -> None:
    base = loaded.snapshot.index if loaded.snapshot else 0
    for i, e in enumerate(loaded.entries):
        assert e.index == base + 1 + i, "entries contiguous from the snapshot index + 1"
    last = base + len(loaded.entries)
    assert base <= loaded.hard_state.commit <= last


# -- basics -------------------------------------------------------------------------------


def test_round_trip(env: Env) -> None:
    log = env.open()
    entries = [
        E(1, 1, b"", type=1, ctx=b"ctx"),
        E(2, 1, bytes(range(256)) * 20, type=0),
        E(3, 2, b"\x00" * 100, type=2, ctx=b"\x01\x02"),
    ]
    log.append(entries, HardState(2, 3, 1))
    log.sync()
    want = Loaded(HardState(2, 3, 1), None, entries)
    assert log.load() == want
    assert (log.first_index, log.last_index) == (1, 3)
    assert log.term(2) == 1 and log.term(3) == 2 and log.term(4) is None
    assert log.entries(2, 4) == entries[1:]
    log = env.reopen(log)
    assert log.load() == want
    log.close()
    log = env.open()
    assert log.load() == want
    assert log.stats()["entries"] == 3
    log.close()


def test_fresh_directory_modes(tmp_path) -> None:
    d = tmp_path / "a" / "b" / "raft"
    log = RaftLog(d)
    assert log.load() == Loaded(HardState(0, 0, 0), None, [])
    assert (log.first_index, log.last_index) == (1, 0)
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert oct((d / LOG_NAME).stat().st_mode & 0o777) == "0o600"
    log.save_snapshot(Snapshot(1, 1, (1,), (), b"s"))
    assert oct((d / SNAP_NAME).stat().st_mode & 0o777) == "0o600"
    log.close()


def test_overwrite_suffix(env: Env) -> None:
    log = env.open()
    log.append([E(i) for i in range(1, 6)], HardState(1, 1, 2))
    log.append([E(4, 2, b"x"), E(5, 2, b"y"), E(6, 2, b"z")], None)
    log.append([E(5, 3, b"Y")], HardState(3, 2, 2))
    want = [E(1), E(2), E(3), E(4, 2, b"x"), E(5, 3, b"Y")]
    assert log.load().entries == want and log.last_index == 5
    log.sync()
    log = env.reopen(log)
    assert log.load() == Loaded(HardState(3, 2, 2), None, want)
    # Contract breaches write nothing and do not poison the log.
    before = log.stats()["bytes"]
    with pytest.raises(ValueError, match="gap"):
        log.append([E(7)], None)
    with pytest.raises(ValueError, match="committed"):
        log.append([E(2, 3)], None)
    with pytest.raises(ValueError, match="contiguous"):
        log.append([E(6), E(8)], None)
    assert log.stats()["bytes"] == before
    log.append([E(6, 3)], None)
    assert log.last_index == 6
    log.close()


def test_hard_state_contract(env: Env) -> None:
    log = env.open()
    log.append([E(1), E(2)], HardState(3, 2, 1))
    for bad, what in (
        (HardState(2, 2, 1), "goes back"),  # term
        (HardState(3, 2, 0), "goes back"),  # commit
        (HardState(3, 1, 1), "changes the vote"),  # a second vote in term 3
        (HardState(3, 0, 1), "changes the vote"),
    ):
        with pytest.raises(ValueError, match=what):
            log.append([], bad)
    log.append([], HardState(4, 0, 2))  # a new term may clear the vote
    log.append([], HardState(4, 1, 2))  # and cast one
    log.sync()
    log = env.reopen(log)
    assert log.hard_state == HardState(4, 1, 2)
    log.close()


def test_hard_state_only(env: Env) -> None:
    log = env.open()
    for t in range(1, 6):
        log.append([], HardState(t, t % 3, 0))
        log.sync()
    log.append([], None)  # nothing: no record
    assert log.stats()["appends"] == 5
    log = env.reopen(log)
    assert log.load() == Loaded(HardState(5, 2, 0), None, [])
    log.close()


def test_one_record_per_append_one_fdatasync_per_sync() -> None:
    fs = MemFS(record=True)
    log = RaftLog("/r", fs=fs, segment_prealloc=1 << 16)
    fs.ops.clear()
    log.append([E(1), E(2)], HardState(1, 1, 0))
    log.append([E(3)], None)
    log.append([], HardState(1, 1, 2))
    log.sync()
    log.sync()  # nothing new: no second fdatasync
    assert [op for op, _ in fs.ops] == ["pwrite", "pwrite", "pwrite", "fdatasync"]
    assert log.stats()["syncs"] == 1


def test_os_sync_is_one_fdatasync(tmp_path, monkeypatch) -> None:
    log = RaftLog(tmp_path / "r", segment_prealloc=1 << 16)
    calls: list[str] = []
    for name in ("fdatasync", "fsync"):
        real = getattr(os, name)

        def spy(fd: int, _real=real, _name=name) -> None:
            calls.append(_name)
            _real(fd)

        monkeypatch.setattr(os, name, spy)
    for i in range(1, 4):
        log.append([E(i)], HardState(1, 1, i - 1))
        log.sync()
    assert calls == ["fdatasync"] * 3
    log.close()


def test_preallocation(env: Env) -> None:
    log = env.open(prealloc=8192)
    log.append([E(1)], None)
    log.sync()
    st0 = log.stats()
    assert st0["file_bytes"] >= st0["bytes"] + 8192 and st0["file_bytes"] % 4096 == 0
    assert len(env.raw()) == st0["file_bytes"]
    for i in range(2, 200):
        log.append([E(i, data=b"p" * 100)], None)
    log.sync()
    st1 = log.stats()
    assert st1["file_bytes"] >= st1["bytes"] > 200 * 100
    log = env.reopen(log)
    assert log.stats()["torn_bytes_discarded"] == 0 and log.last_index == 199
    log.close()
    # Without preallocation the file is exactly its records.
    env2 = Env(env.kind, None) if env.kind == "mem" else None
    if env2 is not None:
        log = env2.open(prealloc=0)
        log.append([E(1)], None)
        log.sync()
        assert len(env2.raw()) == log.stats()["bytes"]
        log.close()


def test_second_open_is_refused(env: Env) -> None:
    log = env.open()
    with pytest.raises(StateError, match="in use"):
        env.open()
    log.close()
    env.open().close()


# -- snapshots ----------------------------------------------------------------------------


def test_snapshot_and_compaction(env: Env) -> None:
    log = env.open()
    log.append([E(i, 1 + i // 4, b"x" * 300) for i in range(1, 11)], HardState(3, 1, 8))
    log.sync()
    big = log.stats()["bytes"]
    snap = Snapshot(6, log.term(6), (1, 2, 3), (4,), b"state@6")
    with pytest.raises(ValueError, match="term"):
        log.save_snapshot(snap._replace(term=99))
    log.save_snapshot(snap)
    want = Loaded(HardState(3, 1, 8), snap, [E(i, 1 + i // 4, b"x" * 300) for i in range(7, 11)])
    assert log.load() == want
    assert (log.first_index, log.last_index) == (7, 10)
    assert log.stats()["bytes"] < big and log.stats()["snapshot_index"] == 6
    assert log.term(6) == snap.term and log.term(5) is None
    with pytest.raises(ValueError, match="not newer"):
        log.save_snapshot(snap)
    with pytest.raises(ValueError, match="below the snapshot"):
        log.append([E(6, 9)], None)
    log.append([E(11, 3)], None)
    log.sync()
    log = env.reopen(log)
    assert log.load() == want._replace(entries=[*want.entries, E(11, 3)])
    # Compact everything: no entries left, the snapshot's term answers term(last).
    log.save_snapshot(Snapshot(11, 3, (1, 2, 3), (), b"state@11"))
    assert log.load().entries == [] and log.last_index == 11 and log.term(11) == 3
    assert log.load().hard_state.commit == 11  # a snapshot holds committed state only
    log = env.reopen(log)
    assert log.last_index == 11 and log.load().snapshot.data == b"state@11"
    log.close()


def test_bootstrap_snapshot_beyond_an_empty_log(env: Env) -> None:
    """The node bootstraps with save_snapshot(index 1) on an empty log."""
    log = env.open()
    log.save_snapshot(Snapshot(1, 1, (1, 2, 3), (), b"empty"))
    log.append([], HardState(1, 0, 1))
    log.sync()
    log.append([E(2, 2)], None)
    log.sync()
    log = env.reopen(log)
    assert log.load() == Loaded(
        HardState(1, 0, 1), Snapshot(1, 1, (1, 2, 3), (), b"empty"), [E(2, 2)]
    )
    log.close()


def test_apply_snapshot(env: Env) -> None:
    log = env.open()
    log.append([E(i, 1) for i in range(1, 6)], HardState(2, 1, 3))
    log.sync()
    snap = Snapshot(20, 4, (1, 2), (3,), b"leader state" * 100)
    log.apply_snapshot(snap)  # durable on return, no sync() needed
    want = Loaded(HardState(2, 1, 20), snap, [])
    assert log.load() == want
    assert (log.first_index, log.last_index) == (21, 20)
    with pytest.raises(ValueError, match="not newer"):
        log.apply_snapshot(snap._replace(index=19))
    if env.kind == "mem":
        env.fs.crash(random.Random(0), "drop")
        log = env.open()
    else:
        log = env.reopen(log)
    assert log.load() == want
    log.append([E(21, 4), E(22, 4)], HardState(4, 2, 21))
    log.sync()
    log = env.reopen(log)
    assert log.load() == Loaded(HardState(4, 2, 21), snap, [E(21, 4), E(22, 4)])
    log.close()


def test_apply_snapshot_even_when_the_log_matches(env: Env) -> None:
    log = env.open()
    log.append([E(i, 1) for i in range(1, 6)], HardState(1, 1, 2))
    log.apply_snapshot(Snapshot(3, 1, (1,), (), b""))
    assert log.load().entries == [] and log.last_index == 3
    log.close()


# -- torn writes and rot --------------------------------------------------------------------


def _three_synced_batches(env: Env) -> tuple[RaftLog, list[int]]:
    log = env.open()
    offsets = []
    for i in (1, 2, 3):
        offsets.append(log.stats()["bytes"])
        log.append([E(i, 1, b"payload %d" % i * 10)], HardState(1, 1, i - 1))
        log.sync()
    return log, offsets


def test_torn_tail_is_discarded(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    log = env.open()
    log.append([E(1)], HardState(1, 1, 0))
    log.sync()
    torn_at = log.stats()["bytes"]
    log.append([E(2, 1, b"z" * 500), E(3)], HardState(1, 1, 1))  # never synced
    end = log.stats()["bytes"]
    env.abandon(log)
    raw = bytearray(env.raw())
    raw[torn_at + 200 : end] = bytes(end - torn_at - 200)  # the rest never reached the disk
    env.write_raw(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="nebula.raft.storage"):
        log = env.open()
    assert f"torn tail of 200 bytes at offset {torn_at}" in caplog.text
    assert log.load() == Loaded(HardState(1, 1, 0), None, [E(1)])
    assert len(env.raw()) == torn_at  # truncated there
    log.append([E(2, 2)], HardState(2, 1, 1))
    log.sync()
    log = env.reopen(log)
    assert log.load() == Loaded(HardState(2, 1, 1), None, [E(1), E(2, 2)])
    log.close()


def test_garbage_after_a_valid_unsynced_record_is_torn(env: Env) -> None:
    """An unsynced record that survived after a torn one vouches for nothing."""
    log = env.open()
    log.append([E(1)], None)
    log.sync()
    at = log.stats()["bytes"]
    log.append([E(2)], None)
    log.append([E(3)], None)  # its mark is still the end of E(1): not proof of a sync
    env.abandon(log)
    env.flip(at + 12)
    log = env.open()
    assert log.load().entries == [E(1)]
    log.close()


@pytest.mark.parametrize("victim", [0, 1])
def test_rot_below_the_synced_mark_refuses_to_start(env: Env, victim: int) -> None:
    log, offsets = _three_synced_batches(env)
    env.abandon(log)
    env.flip(offsets[victim] + 20)
    with pytest.raises(StateError) as exc:
        env.open()
    msg = str(exc.value)
    assert env.path(LOG_NAME) in msg and f"offset {offsets[victim]}" in msg
    assert "synced mark" in msg


def test_rot_in_a_length_field_is_found_too(env: Env) -> None:
    log, offsets = _three_synced_batches(env)
    env.abandon(log)
    env.flip(offsets[1] + 2, mask=0xFF)  # the record's length: no way to skip it
    with pytest.raises(StateError, match=f"offset {offsets[1]}"):
        env.open()


def test_rot_in_the_last_batch_is_the_residual_and_a_seal_covers_it(env: Env) -> None:
    log, offsets = _three_synced_batches(env)
    env.abandon(log)
    # Documented residual: rot in the last batch looks like a torn write.
    env.flip(offsets[2] + 20)
    log = env.open()
    assert [e.index for e in log.load().entries] == [1, 2]
    log.append([E(3, 1, b"again")], HardState(1, 1, 2))
    log.sync()
    log.close()  # seals: the end of the file is now vouched for
    log = env.open()
    assert log.last_index == 3
    env.abandon(log)
    raw = env.raw()
    last = raw.rindex(b"again")
    env.flip(last)
    with pytest.raises(StateError, match="synced mark"):
        env.open()


def test_crc_valid_but_undecodable_record_is_refused(env: Env) -> None:
    log = env.open()
    log.append([E(1)], None)
    log.sync()
    at = log.stats()["bytes"]
    env.abandon(log)
    payload = struct.pack("<QB", HEADER_SIZE, 0x80) + struct.pack("<QI", 2, 0)
    rec = storage._record(storage.KIND_BATCH, [payload])
    raw = bytearray(env.raw())
    raw[at : at + len(rec)] = rec
    env.write_raw(bytes(raw))
    with pytest.raises(StateError, match="undecodable"):
        env.open()


def test_unknown_version_or_magic_refused(env: Env) -> None:
    env.open().close()
    good = env.raw()
    env.write_raw(good[:8] + struct.pack("<H", 2) + good[10:])
    with pytest.raises(StateError, match="format version 2; this Nebula reads version 1"):
        env.open()
    env.write_raw(b"NEBRAFT9" + good[8:])
    with pytest.raises(StateError, match="not a Nebula Raft log"):
        env.open()
    env.write_raw(good[:20] + b"\x01" + good[21:])
    with pytest.raises(StateError, match="header checksum"):
        env.open()
    env.write_raw(good)
    env.open().close()


def test_snapshot_file_checked(env: Env) -> None:
    log = env.open()
    log.save_snapshot(Snapshot(1, 1, (1,), (), b"data"))
    log.close()
    good = env.raw(SNAP_NAME)
    env.flip(len(good) - 6, SNAP_NAME)  # in the data
    with pytest.raises(StateError, match="snapshot checksum"):
        env.open()
    env.write_raw(good[:8] + struct.pack("<H", 7) + good[10:], SNAP_NAME)
    with pytest.raises(StateError, match="snapshot format version 7"):
        env.open()
    env.write_raw(good, SNAP_NAME)
    env.open().close()


def test_log_and_snapshot_that_do_not_belong_together(env: Env) -> None:
    log = env.open()
    log.append([E(1), E(2)], HardState(1, 1, 2))
    log.save_snapshot(Snapshot(2, 1, (1,), (), b""))
    log.close()
    snap = env.raw(SNAP_NAME)
    if env.kind == "os":
        os.unlink(env.path(SNAP_NAME))
    else:
        env.fs.unlink(env.path(SNAP_NAME))
    with pytest.raises(StateError, match="continues a snapshot at index 2"):
        env.open()
    if env.kind == "os":
        os.unlink(env.path(LOG_NAME))
        with open(env.path(SNAP_NAME), "wb") as f:
            f.write(snap)
    else:
        env.fs.unlink(env.path(LOG_NAME))
        env.fs.write_file_durably(env.path(SNAP_NAME), snap)
    with pytest.raises(StateError, match="missing"):
        env.open()


# -- I/O errors fail closed ------------------------------------------------------------------


def test_eio_on_fdatasync_fails_closed() -> None:
    fs = MemFS()
    log = RaftLog("/r", fs=fs, segment_prealloc=PREALLOC)
    log.append([E(1)], HardState(1, 1, 0))
    log.sync()
    log.append([E(2)], HardState(1, 1, 1))
    fs.fail_next("fdatasync")
    with pytest.raises(StateError, match="fdatasync failed"):
        log.sync()
    # Linux may have dropped the dirty pages: a retry would "succeed" with nothing durable.
    for call in (log.sync, log.load, lambda: log.append([E(3)], None), log.seal):
        with pytest.raises(StateError, match="failed earlier"):
            call()
    with pytest.raises(StateError, match="failed earlier"):
        log.save_snapshot(Snapshot(1, 1, (1,), (), b""))
    log.close()  # releases without writing
    fs.crash(random.Random(1), "drop")
    log = RaftLog("/r", fs=fs)
    assert log.load() == Loaded(HardState(1, 1, 0), None, [E(1)])
    log.close()


@pytest.mark.parametrize("later", ["drop", "prefix", "pages"])
def test_a_restart_after_a_failed_fdatasync_makes_what_it_reads_durable(later: str) -> None:
    """After a failed fdatasync, Linux keeps the unwritten pages in the page cache and
    marks them clean.  A process restart (no reboot) then reads the record that was
    never synced.  An fsync alone would have nothing to write, yet the node treats what
    it opened as durable: it acknowledges it without another write.  Opening writes the
    bytes past the last synced mark again before its fsync.  So what a restarted node is
    handed survives a later power loss, whatever the crash tears (found in review: the
    simulator case is tests/sim/test_bug_eio_restart.py)."""
    fs = MemFS()
    log = RaftLog("/r", fs=fs, segment_prealloc=PREALLOC)
    log.append([E(1)], HardState(1, 1, 0))
    log.sync()
    log.append([E(2), E(3)], HardState(1, 1, 1))
    fs.fail_next("fdatasync")
    with pytest.raises(StateError, match="fdatasync failed"):
        log.sync()
    log.close()
    fs.crash(random.Random(3), "process")  # the operator (or systemd) restarts it
    log = RaftLog("/r", fs=fs, segment_prealloc=PREALLOC)
    opened = log.load()
    assert [e.index for e in opened.entries] == [1, 2, 3]  # read from the page cache
    log.close()
    fs.crash(random.Random(4), later)  # a power loss while the restarted node runs
    log = RaftLog("/r", fs=fs, segment_prealloc=PREALLOC)
    assert log.load() == opened
    log.close()


@pytest.mark.parametrize("op", ["pwrite", "fsync", "replace", "fsync_dir"])
def test_other_io_errors_fail_closed(op: str) -> None:
    fs = MemFS()
    log = RaftLog("/r", fs=fs, segment_prealloc=PREALLOC)
    log.append([E(1)], HardState(1, 1, 1))
    log.sync()
    fs.fail_next(op, errno.ENOSPC if op == "pwrite" else errno.EIO)
    with pytest.raises(StateError):
        if op == "pwrite":
            log.append([E(2)], None)
        else:
            log.save_snapshot(Snapshot(1, 1, (1,), (), b"s"))
    with pytest.raises(StateError, match="failed earlier"):
        log.sync()
    log.close()
    fs.crash(random.Random(2), "drop")
    log = RaftLog("/r", fs=fs)
    loaded = log.load()
    assert loaded.entries in ([E(1)], []) and loaded.hard_state.commit == 1
    log.close()


@pytest.mark.parametrize(
    ("op", "nth"),
    [("open", 1), ("pwrite", 1), ("replace", 1), ("open", 2), ("pwrite", 2)],
    ids=["snap-open", "snap-write", "snap-rename", "log-open", "log-write"],
)
@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENOSPC])
def test_a_local_snapshot_that_hits_a_transient_error_is_retried(
    op: str, nth: int, err: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE (a connection flood) or ENOSPC before the new log is renamed into place
    (the nth call of ``op`` during save_snapshot): nothing that matters changed on disk,
    the log stays usable and a later snapshot succeeds.  After the rename nothing but
    failing closed is safe (test_other_io_errors_fail_closed)."""
    fs = MemFS()
    log = RaftLog("/r", fs=fs, segment_prealloc=PREALLOC)
    log.append([E(1), E(2), E(3)], HardState(1, 1, 3))
    log.sync()
    real = getattr(fs, op)
    calls = [0]

    def flaky(*a: object, **kw: object) -> object:
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(err, os.strerror(err))
        return real(*a, **kw)

    monkeypatch.setattr(fs, op, flaky)
    with pytest.raises(SnapshotNotSaved):
        log.save_snapshot(Snapshot(2, 1, (1,), (), b"s"))
    monkeypatch.setattr(fs, op, real)
    # Still usable, nothing lost; the retry succeeds.
    log.append([E(4)], HardState(1, 1, 4))
    log.sync()
    log.save_snapshot(Snapshot(3, 1, (1,), (), b"s3"))
    assert log.load() == Loaded(HardState(1, 1, 4), Snapshot(3, 1, (1,), (), b"s3"), [E(4)])
    log.close()
    log = RaftLog("/r", fs=fs)
    assert log.load() == Loaded(HardState(1, 1, 4), Snapshot(3, 1, (1,), (), b"s3"), [E(4)])
    log.close()


# -- crash at every write ----------------------------------------------------------------


def _script() -> list[tuple]:
    """A workload touching every write path: batches, overwrites, several appends per
    sync, hard state alone, compaction, a leader's snapshot, a clean restart, a seal."""
    big = b"\x01\x02" * 700  # crosses pages and preallocation boundaries
    return [
        ("append", [E(1, 1), E(2, 1, big)], HardState(1, 1, 0)),
        ("sync",),
        ("append", [E(3, 1)], None),
        ("append", [E(3, 2, b"three"), E(4, 2, big)], HardState(2, 2, 1)),
        ("sync",),
        ("append", [], HardState(2, 2, 3)),
        ("append", [E(5, 2, big), E(6, 2)], None),
        ("sync",),
        ("append", [E(7, 2)], HardState(2, 2, 4)),  # unsynced when the snapshot starts
        ("save_snapshot", Snapshot(3, 2, (1, 2, 3), (), b"sm@3")),
        ("append", [E(7, 2, big)], HardState(2, 2, 6)),
        ("sync",),
        ("reopen",),
        ("append", [E(8, 3)], HardState(3, 3, 6)),
        ("apply_snapshot", Snapshot(12, 3, (1, 2), (3,), b"leader@12" * 50)),
        ("append", [E(13, 3), E(14, 3, big)], HardState(3, 3, 13)),
        ("sync",),
        ("append", [E(15, 3)], None),
        # The log holds (14, term 3): a leader's snapshot still replaces all of it.
        ("apply_snapshot", Snapshot(14, 3, (1, 2, 3), (), b"leader@14")),
        ("append", [E(15, 4)], HardState(4, 0, 14)),
        ("seal",),
    ]


@dataclass
class Tracker:
    states: list[tuple] = field(default_factory=list)
    durable: int = 0


DURABLE_OPS = {"sync", "save_snapshot", "apply_snapshot", "reopen", "seal"}


def _run(fs: MemFS, script: list[tuple], tracker: Tracker) -> None:
    model = Model()
    tracker.states.append(model.state())
    log = RaftLog("/n/raft", fs=fs, segment_prealloc=PREALLOC)
    for name, *args in script:
        if name == "append":
            model.append(*args)
        elif name in ("save_snapshot", "apply_snapshot"):
            getattr(model, name)(*args)
        tracker.states.append(model.state())
        if name == "reopen":
            log.close()
            log = RaftLog("/n/raft", fs=fs, segment_prealloc=PREALLOC)
        else:
            getattr(log, name)(*args)
        if name in DURABLE_OPS:
            tracker.durable = len(tracker.states) - 1


def _recover_and_check(fs: MemFS, tracker: Tracker, where: str) -> None:
    log = RaftLog("/n/raft", fs=fs, segment_prealloc=PREALLOC)
    loaded = log.load()
    check_consistent(loaded)
    got = state_of(loaded)
    candidates = tracker.states[tracker.durable :]
    assert got in candidates, f"{where}: recovered {got}\nnot one of {candidates}"
    # What the recovery read is durable: a power loss right after it changes nothing.
    fs.crash(random.Random(0), "drop")
    log = RaftLog("/n/raft", fs=fs, segment_prealloc=PREALLOC)
    assert state_of(log.load()) == got, where
    # And the log goes on.
    nxt = log.last_index + 1
    log.append([E(nxt, 9)], HardState(9, 9, loaded.hard_state.commit))
    log.sync()
    fs.crash(random.Random(0), "drop")
    log = RaftLog("/n/raft", fs=fs, segment_prealloc=PREALLOC)
    assert log.load().entries[-1] == E(nxt, 9), where
    log.close()


def test_crash_at_every_write() -> None:
    script = _script()
    full = MemFS(record=True)
    _run(full, script, Tracker())
    n_ops = full.op_count
    assert n_ops > 40
    kinds = {op for op, _ in full.ops}
    assert {"pwrite", "fdatasync", "fsync", "replace", "fsync_dir", "create"} <= kinds
    variants = [("drop", 0), ("keep", 0), ("process", 0)]
    variants += [(m, seed) for m in ("prefix", "pages") for seed in range(1, 5)]
    checked = 0
    for k in range(n_ops + 1):
        fs = MemFS(crash_at=k)
        tracker = Tracker()
        try:
            _run(fs, script, tracker)
        except CrashPoint:
            pass
        else:
            assert k == n_ops
        for mode, seed in variants:
            c = fs.clone()
            c.crash(random.Random(seed * 1000 + k), mode)
            where = f"crash before op {k} ({full.ops[k] if k < n_ops else 'end'}), {mode}/{seed}"
            _recover_and_check(c, tracker, where)
            checked += 1
    assert checked == (n_ops + 1) * len(variants)


def test_crash_during_recovery() -> None:
    """A second crash at every write the recovery itself makes (truncating a torn tail,
    finishing an interrupted snapshot step, syncing what it read)."""
    script = _script()
    full = MemFS()
    _run(full, script, Tracker())
    recovery_writes = 0
    for k in range(full.op_count):
        fs = MemFS(crash_at=k)
        tracker = Tracker()
        try:
            _run(fs, script, tracker)
        except CrashPoint:
            pass
        for mode, seed in (("process", 0), ("prefix", k), ("pages", k)):
            first = fs.clone()
            first.crash(random.Random(seed), mode)
            probe = first.clone()
            start = probe.op_count
            RaftLog("/n/raft", fs=probe, segment_prealloc=PREALLOC)
            for r in range(probe.op_count - start):
                c = first.clone()
                c.crash_at = start + r
                with pytest.raises(CrashPoint):
                    RaftLog("/n/raft", fs=c, segment_prealloc=PREALLOC)
                for mode2 in ("drop", "pages"):
                    c2 = c.clone()
                    c2.crash(random.Random(r), mode2)
                    _recover_and_check(c2, tracker, f"crash {k}/{mode}, recovery crash {r}/{mode2}")
                    recovery_writes += 1
    assert recovery_writes > 100


def test_crash_tears_are_really_exercised() -> None:
    """Some crash variants must actually lose or cut data (else the test above proves little)."""
    script = _script()
    seen_torn = seen_lost = 0
    full = MemFS()
    _run(full, script, Tracker())
    for k in range(full.op_count):
        fs = MemFS(crash_at=k)
        tracker = Tracker()
        try:
            _run(fs, script, tracker)
        except CrashPoint:
            pass
        for mode in ("prefix", "pages"):
            c = fs.clone()
            c.crash(random.Random(k), mode)
            log = RaftLog("/n/raft", fs=c, segment_prealloc=PREALLOC)
            seen_torn += log.stats()["torn_bytes_discarded"] > 0
            seen_lost += state_of(log.load()) != tracker.states[-1]
            log.close()
    assert seen_torn >= 5 and seen_lost >= 5


# -- MemFS itself ----------------------------------------------------------------------------


def test_memfs_crash_semantics() -> None:
    fs = MemFS()
    fs.makedirs("/d")
    fd = fs.open("/d/f", create=True)
    fs.pwrite(fd, b"abc", 0)
    fs.fsync(fd)
    c = fs.clone()
    c.crash(random.Random(0), "drop")
    assert not c.exists("/d/f")  # the name was never made durable
    fs.fsync_dir("/d")
    fs.pwrite(fd, b"XYZW", 1)
    for mode, want in (("drop", {b"abc"}), ("keep", {b"aXYZW"})):
        c = fs.clone()
        c.crash(random.Random(0), mode)
        assert c.read("/d/f") in want
    outs = set()
    for seed in range(40):
        c = fs.clone()
        c.crash(random.Random(seed), "prefix")
        outs.add(c.read("/d/f"))
    assert outs == {b"abc", b"aXc", b"aXY", b"aXYZ", b"aXYZW"}
    fs.replace("/d/f", "/d/g")
    c = fs.clone()
    c.crash(random.Random(0), "drop")
    assert c.exists("/d/f") and not c.exists("/d/g")
    # Determinism: same seed, same result.
    a, b = fs.clone(), fs.clone()
    a.crash(random.Random(5), "pages")
    b.crash(random.Random(5), "pages")
    assert a.listdir("/d") == b.listdir("/d") and a.read(f"/d/{a.listdir('/d')[0]}") == b.read(
        f"/d/{b.listdir('/d')[0]}"
    )


def test_memfs_failed_fsync_drops_the_pages() -> None:
    fs = MemFS()
    fd = fs.open("/f", create=True)
    fs.fsync_dir("/")
    fs.pwrite(fd, b"data", 0)
    fs.fail_next("fdatasync")
    with pytest.raises(OSError) as exc:
        fs.fdatasync(fd)
    assert exc.value.errno == errno.EIO
    fs.fdatasync(fd)  # "succeeds"
    assert fs.read("/f") == b"data"
    fs.crash(random.Random(0), "drop")
    assert fs.read("/f") == b""


# -- property: random operation sequences against the model ----------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 4), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("sync")),
        st.tuples(st.just("save_snapshot"), st.integers(0, 10)),
        st.tuples(st.just("apply_snapshot"), st.integers(1, 6)),
        st.tuples(st.just("crash"), st.sampled_from(MODES), st.integers(0, 2**16)),
        st.tuples(st.just("reopen")),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_random_sequences_match_the_model(ops: list[tuple]) -> None:
    fs = MemFS()
    log = RaftLog("/p", fs=fs, segment_prealloc=PREALLOC)
    model = Model()
    since_durable = [model.state()]
    term = 1
    for op in ops:
        name = op[0]
        if name == "append":
            _, back, count, with_hs = op
            lo = max(model.base + 1, model.hs.commit + 1)
            first = max(lo, model.last + 1 - back)
            term += back > 0
            entries = [E(i, term, b"v%d.%d" % (i, term)) for i in range(first, first + count)]
            last = first + count - 1 if count else model.last
            hs = HardState(term, 1, min(last, model.hs.commit + 1)) if with_hs else None
            log.append(entries, hs)
            model.append(entries, hs)
            since_durable.append(model.state())
        elif name == "sync":
            log.sync()
            since_durable = [model.state()]
        elif name == "save_snapshot":
            index = model.base + 1 + op[1]
            t = model.term(index)
            snap = Snapshot(index, t if t is not None else term, (1, 2), (), b"s%d" % index)
            log.save_snapshot(snap)
            model.save_snapshot(snap)
            since_durable = [model.state()]
        elif name == "apply_snapshot":
            index = max(model.last, model.base) + op[1]
            snap = Snapshot(index, term, (1, 2, 3), (), b"L%d" % index)
            log.apply_snapshot(snap)
            model.apply_snapshot(snap)
            since_durable = [model.state()]
        elif name == "crash":
            log._release()
            fs.crash(random.Random(op[2]), op[1])
            log = RaftLog("/p", fs=fs, segment_prealloc=PREALLOC)
            got = state_of(log.load())
            assert got in since_durable
            model = Model.of(log.load())
            since_durable = [model.state()]
        else:
            log.close()
            log = RaftLog("/p", fs=fs, segment_prealloc=PREALLOC)
            since_durable = [model.state()]
        loaded = log.load()
        check_consistent(loaded)
        assert state_of(loaded) == model.state()
        assert log.last_index == model.last
    log.close()


def test_batch_record_bytes_follow_the_documented_layout() -> None:
    """A BATCH record, built here field by field from the module docstring's layout:
    len u32 | crc u32 (over len, kind, body) | kind u8 | body."""
    ents = [E(7, 2, b"data-7"), Entry(8, 2, 1, b"cc", b"ctx"), Entry(9, 3, 0, b"", b"")]
    hs = HardState(3, 1, 8)
    body = struct.pack("<QB", 640, 1) + struct.pack("<QQQ", *hs) + struct.pack("<QI", 7, 3)
    for e in ents:
        body += struct.pack("<QBII", e.term, e.type, len(e.data), len(e.context))
        body += e.data + e.context
    head = struct.pack("<I", len(body))
    crc = zlib.crc32(head + bytes([storage.KIND_BATCH]) + body)
    assert storage.encode_batch(640, ents, hs) == head + struct.pack("<I", crc) + bytes([1]) + body
    empty = struct.pack("<QB", 5, 0) + struct.pack("<QI", 0, 0)
    crc = zlib.crc32(struct.pack("<I", len(empty)) + b"\x01" + empty)
    assert storage.encode_batch(5, [], None) == struct.pack("<IIB", len(empty), crc, 1) + empty
