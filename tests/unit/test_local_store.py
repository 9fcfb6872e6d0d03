"""The single-node store: a double-slot state file, fdatasync'ed per accepted decision."""

from __future__ import annotations

import asyncio
import json
import os
import struct

import pytest

from nebula.errors import StateError
from nebula.guard import SignRecord, Verdict
from nebula.state import local
from nebula.state.base import load_priv_validator_state, record_to_json
from nebula.state.local import LocalStore, read_states


def r(h: int, s: int = 2, sb: bytes = b"\x01sb", sig: bytes = b"sig") -> SignRecord:
    return SignRecord(h, 0, s, sb + bytes([h % 256]), sig)


def on_disk(p, chain: str = "c") -> SignRecord | None:
    """What a restart would load from ``p`` right now (read without the store's lock)."""
    return read_states(p).get(chain)


def test_state_survives_reopen(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    assert asyncio.run(s.commit("c", r(5))).verdict == Verdict.ACCEPT
    assert on_disk(p) == r(5)
    asyncio.run(s.close())
    assert LocalStore(p).last("c") == r(5)
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def test_refused_decision_does_not_write(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(5))
    before = p.read_bytes()
    d = s.commit_sync("c", r(4))
    assert d.verdict == Verdict.REFUSE
    assert p.read_bytes() == before


def _count(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(os, name)

    def spy(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(os, name, spy)
    return calls


def test_every_accept_is_synced_before_commit_returns(tmp_path, monkeypatch) -> None:
    s = LocalStore(tmp_path / "state.json")
    datasyncs = _count(monkeypatch, "fdatasync")
    fsyncs = _count(monkeypatch, "fsync")
    renames = _count(monkeypatch, "replace")
    for h in range(1, 6):
        assert s.commit_sync("c", r(h)).verdict == Verdict.ACCEPT
        assert len(datasyncs) == 2 * h  # two mirrored fdatasyncs per decision, nothing else
    assert fsyncs == [] and renames == []
    datasyncs.clear()
    s.commit_sync("c", r(5))  # identical retry: nothing new to persist
    s.commit_sync("c", r(4))  # refused: nothing to persist
    assert datasyncs == []


def test_commit_returns_only_after_its_slot_is_synced(tmp_path, monkeypatch) -> None:
    """The fdatasync that returns before commit does covers the bytes of that record."""
    p = tmp_path / "state.json"
    s = LocalStore(p)
    seen: list[SignRecord | None] = []
    real = os.fdatasync

    def check(fd):
        real(fd)
        seen.append(on_disk(p))  # what a restart would load right now

    monkeypatch.setattr(os, "fdatasync", check)
    s.commit_sync("c", r(7))
    assert seen == [r(7), r(7)]  # durable from the first sync on; the second mirrors it


def test_write_failure_refuses(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(1))

    def boom(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(StateError, match="cannot persist"):
        s.commit_sync("c", r(2))
    assert s.last("c") == r(1)  # nothing was released, the in-memory mark did not move
    monkeypatch.undo()
    # After an I/O error the descriptor is not trusted: the next write re-creates the
    # whole file through a temp file and a rename.
    renames = _count(monkeypatch, "replace")
    assert s.commit_sync("c", r(3)).verdict == Verdict.ACCEPT
    assert len(renames) == 1
    assert on_disk(p) == r(3)
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def test_creation_failure_refuses(tmp_path, monkeypatch) -> None:
    def boom(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(StateError, match="cannot persist"):
        LocalStore(tmp_path / "state.json")
    assert not (tmp_path / "state.json").exists()


def test_initial_state_only_raises_the_mark(tmp_path) -> None:
    p = tmp_path / "state.json"
    LocalStore(p).commit_sync("c", r(10))
    assert LocalStore(p, {"c": r(3)}).last("c") == r(10)
    assert LocalStore(p, {"c": r(20)}).last("c") == r(20)


def test_corrupted_state_file_refuses_to_start(tmp_path) -> None:
    p = tmp_path / "state.json"
    p.write_text("{not json")
    with pytest.raises(StateError, match="corrupted"):
        LocalStore(p)


def test_priv_validator_state_json_round_trip(tmp_path) -> None:
    rec = SignRecord(36, 0, 3, bytes.fromhex("7608"), b"\x01" * 64)
    f = tmp_path / "priv_validator_state.json"
    f.write_text(json.dumps(record_to_json(rec)))
    assert load_priv_validator_state(f) == rec
    f.write_text('{"height": "0", "round": 0, "step": 0}')
    assert load_priv_validator_state(f) is None
    f.write_text('{"height": "x"}')
    with pytest.raises(StateError):
        load_priv_validator_state(f)


# ---- the double-slot file --------------------------------------------------------------


def _slots(p) -> list[tuple[int, bytes] | None]:
    """The decoded slots of the file at ``p`` (None for an invalid one)."""
    raw = p.read_bytes()
    size = struct.unpack_from("<I", raw, 12)[0]
    return [
        local.decode_slot(raw[local.HEADER_SIZE + i * size : local.HEADER_SIZE + (i + 1) * size])
        for i in (0, 1)
    ]


def _newest(p) -> int:
    a, b = _slots(p)
    if a is None or b is None:
        return 0 if b is None else 1
    return 0 if a[0] > b[0] else 1


def _slot_offset(p, i: int) -> int:
    size = struct.unpack_from("<I", p.read_bytes(), 12)[0]
    return local.HEADER_SIZE + i * size


def _overwrite(p, offset: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_file_layout_and_size_never_change(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    size = p.stat().st_size
    assert size == local.HEADER_SIZE + 2 * local.SLOT_SIZE
    assert p.read_bytes()[:8] == local.FILE_MAGIC
    inode = p.stat().st_ino
    for h in range(1, 8):
        s.commit_sync("c", r(h))
        assert p.stat().st_size == size and p.stat().st_ino == inode
    # Mirrored: after every completed commit both slots hold the last record.
    seqs = sorted(_slots(p), key=lambda x: x[0])
    assert [x[0] for x in seqs] == [15, 16]  # creation wrote 1 and 2, each commit 2 more
    assert json.loads(seqs[1][1])["chains"]["c"] == record_to_json(r(7))
    assert json.loads(seqs[0][1])["chains"]["c"] == record_to_json(r(7))
    # The payload is the old file's JSON, compact.
    assert b" " not in seqs[1][1] and b"\n" not in seqs[1][1]
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def big(h: int) -> SignRecord:
    """A precommit-sized record: ~300 bytes of sign bytes, an extension, two signatures."""
    return SignRecord(
        h, 0, 3, b"\x01" * 290 + bytes([h % 256]), b"s" * 64, b"\x02" * 180, b"e" * 64
    )


@pytest.mark.parametrize("torn", [1, 20, 52, 512, "last"])
def test_torn_newest_slot_falls_back_to_the_previous_state(tmp_path, torn) -> None:
    """A crash between pwrite and fdatasync: only part of the new slot reached the disk."""
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", big(5))
    s.commit_sync("c", big(6))  # durable: commit returned, its signature may have left
    # What the write of height 7 puts into the other slot, taken from a copy of the file.
    q = tmp_path / "copy.json"
    q.write_bytes(p.read_bytes())
    LocalStore(q).commit_sync("c", big(7))
    target = 1 - _newest(p)  # the first of the two mirrored writes goes here
    assert json.loads(_slots(q)[target][1])["chains"]["c"] == record_to_json(big(7))
    off = _slot_offset(p, target)
    new_slot = q.read_bytes()[off : off + local.SLOT_SIZE]
    used = local.SLOT_PAYLOAD_OFFSET + len(_slots(q)[target][1])
    assert used > 1024  # the tear points below are inside the record
    if torn == "last":  # everything but the last byte that differs from the old slot
        old_slot = p.read_bytes()[off : off + local.SLOT_SIZE]
        torn = max(i for i in range(used) if new_slot[i] != old_slot[i])
    assert torn < used
    # Only the first `torn` bytes of the new slot reached the disk before the crash.
    _overwrite(p, off, new_slot[:torn])
    s.close_sync()  # the crash
    reopened = LocalStore(p)
    assert reopened.last("c") == big(6)
    # It carries on from there, and never overwrites the slot holding height 6.
    assert reopened.commit_sync("c", big(7)).verdict == Verdict.ACCEPT
    assert on_disk(p) == big(7)


def test_torn_tail_of_newest_slot_falls_back(tmp_path) -> None:
    """The other order: the end of the new record reached the disk, its start did not."""
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", big(5))
    s.commit_sync("c", big(6))
    q = tmp_path / "copy.json"
    q.write_bytes(p.read_bytes())
    LocalStore(q).commit_sync("c", big(7))
    target = 1 - _newest(p)
    off = _slot_offset(p, target)
    _overwrite(p, off + 512, q.read_bytes()[off + 512 : off + local.SLOT_SIZE])
    s.close_sync()
    assert LocalStore(p).last("c") == big(6)


@pytest.mark.parametrize("which", ["newest", "older"])
def test_a_rotten_slot_loses_no_released_state(tmp_path, which) -> None:
    """A block that rots after its commit returned (its signature may have left) must not
    take the mark back: the mirror holds the same state."""
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(5))
    s.commit_sync("c", r(6))
    slot = _newest(p) if which == "newest" else 1 - _newest(p)
    # A flipped bit in the sequence number (covered by the checksum, so it cannot make
    # an old slot look newer).
    off = _slot_offset(p, slot)
    raw = bytearray(p.read_bytes())
    raw[off + 8] ^= 0x01
    p.write_bytes(raw)
    s.close_sync()
    assert LocalStore(p).last("c") == r(6)


def test_crash_during_the_second_mirrored_write_keeps_the_new_state(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", big(5))
    s.commit_sync("c", big(6))
    q = tmp_path / "copy.json"
    q.write_bytes(p.read_bytes())
    LocalStore(q).commit_sync("c", big(7))
    first, second = 1 - _newest(p), _newest(p)
    done = q.read_bytes()
    off1, off2 = _slot_offset(p, first), _slot_offset(p, second)
    _overwrite(p, off1, done[off1 : off1 + local.SLOT_SIZE])  # the first write completed
    _overwrite(p, off2, done[off2 : off2 + 100])  # the second was torn
    s.close_sync()
    assert LocalStore(p).last("c") == big(7)


def test_both_slots_corrupt_refuses_to_start(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(5))
    s.commit_sync("c", r(6))
    for i in (0, 1):
        off = _slot_offset(p, i)
        _overwrite(p, off + local.SLOT_PAYLOAD_OFFSET + 3, b"\xff\xfe")
    s.close_sync()
    with pytest.raises(StateError, match="both state slots are corrupted"):
        LocalStore(p)
    # Zeroed slots (e.g. a file of zeros) are no better.
    size = p.stat().st_size
    _overwrite(p, local.HEADER_SIZE, bytes(size - local.HEADER_SIZE))
    with pytest.raises(StateError, match="refusing to start"):
        LocalStore(p, {"c": r(1)})


def test_corrupt_or_truncated_header_refuses(tmp_path) -> None:
    p = tmp_path / "state.json"
    LocalStore(p).commit_sync("c", r(5))
    good = p.read_bytes()
    bad = bytearray(good)
    bad[12] ^= 0x10  # the slot size
    p.write_bytes(bad)
    with pytest.raises(StateError, match="header is corrupted"):
        LocalStore(p)
    p.write_bytes(good[:20])
    with pytest.raises(StateError, match="truncated"):
        LocalStore(p)
    # Slot 0 (the empty state of the creation) is intact, but the file never changes
    # size: a short or long file was not written by Nebula, so nothing in it is trusted.
    p.write_bytes(good[: local.HEADER_SIZE + 100])
    with pytest.raises(StateError, match="size"):
        LocalStore(p)
    p.write_bytes(good + b"\0")
    with pytest.raises(StateError, match="size"):
        LocalStore(p)


def test_equal_sequence_numbers_refuse(tmp_path) -> None:
    p = tmp_path / "state.json"
    LocalStore(p).commit_sync("c", r(5))
    payload = json.dumps({"version": 1, "chains": {"c": record_to_json(r(9))}}).encode()
    a, b = _slots(p)
    seq = max(x[0] for x in (a, b) if x is not None)
    other = 1 - _newest(p)
    _overwrite(p, _slot_offset(p, other), bytes(local.encode_slot(seq, payload, local.SLOT_SIZE)))
    with pytest.raises(StateError, match="sequence number"):
        LocalStore(p)


def test_sequence_is_64_bit_and_never_wraps(tmp_path) -> None:
    p = tmp_path / "state.json"
    LocalStore(p).commit_sync("c", r(5))
    # A file whose newest slot is near the end of the 64-bit range (and past 2**32).
    payload = json.dumps({"version": 1, "chains": {"c": record_to_json(r(6))}}).encode()
    big = local.MAX_SEQ - 2
    other = 1 - _newest(p)
    _overwrite(p, _slot_offset(p, other), bytes(local.encode_slot(big, payload, local.SLOT_SIZE)))
    s = LocalStore(p)
    assert s.last("c") == r(6)
    assert s.commit_sync("c", r(7)).verdict == Verdict.ACCEPT  # seqs 2**64 - 2, 2**64 - 1
    assert max(x[0] for x in _slots(p)) == local.MAX_SEQ
    assert on_disk(p) == r(7)
    with pytest.raises(StateError, match="exhausted"):  # never wraps to 0
        s.commit_sync("c", r(8))
    assert on_disk(p) == r(7)


def test_migrates_the_previous_json_format(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    old = {
        "version": 1,
        "chains": {
            "a": record_to_json(
                SignRecord(36, 1, 3, b"\x08\x02", b"\x01" * 64, b"ext", b"\x02" * 64)
            ),
            "b": record_to_json(r(9)),
        },
    }
    p.write_text(json.dumps(old, indent=1))  # exactly what the previous version wrote
    p.chmod(0o644)
    s = LocalStore(p)
    assert s.last("a") == SignRecord(36, 1, 3, b"\x08\x02", b"\x01" * 64, b"ext", b"\x02" * 64)
    assert s.last("b") == r(9)
    assert p.read_text().startswith("{")  # opening alone (e.g. `state export`) converts nothing
    renames = _count(monkeypatch, "replace")
    datasyncs = _count(monkeypatch, "fdatasync")
    assert s.commit_sync("b", r(10)).verdict == Verdict.ACCEPT
    assert len(renames) == 1  # converted atomically, through a temp file and a rename
    assert p.read_bytes()[:8] == local.FILE_MAGIC
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert [x.name for x in tmp_path.iterdir() if x.name.endswith(".tmp")] == []
    s.commit_sync("b", r(11))
    assert len(renames) == 1 and len(datasyncs) == 2  # from then on: the mirrored slots
    assert read_states(p) == {"a": s.last("a"), "b": r(11)}


def test_initial_state_migrates_at_open(tmp_path) -> None:
    p = tmp_path / "state.json"
    p.write_text(json.dumps({"version": 1, "chains": {"c": record_to_json(r(3))}}, indent=1))
    LocalStore(p, {"c": r(4)})
    assert p.read_bytes()[:8] == local.FILE_MAGIC
    assert LocalStore(p).last("c") == r(4)


def test_large_state_grows_the_slots(tmp_path) -> None:
    """A vote extension can be up to 1 MiB, and its sign bytes are kept."""
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(1))
    big = SignRecord(2, 0, 3, b"\x01" * 200, b"s" * 64, b"\x07" * 5000, b"e" * 64)
    assert s.commit_sync("c", big).verdict == Verdict.ACCEPT
    size = struct.unpack_from("<I", p.read_bytes(), 12)[0]
    assert size == 16384  # the 10 KB of hex did not fit 4 KiB or 8 KiB
    assert p.stat().st_size == local.HEADER_SIZE + 2 * size
    assert on_disk(p) == big
    s.commit_sync("c", r(3))
    assert on_disk(p) == r(3)


def test_state_too_large_is_refused(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(1))
    monkeypatch.setattr(local, "MAX_SLOT_SIZE", 8192)
    huge = SignRecord(2, 0, 3, b"\x01" * 200, b"s" * 64, b"\x07" * 5000, b"e" * 64)
    with pytest.raises(StateError, match="larger than the 8192-byte slot limit"):
        s.commit_sync("c", huge)
    assert s.last("c") == r(1)
    assert on_disk(p) == r(1)


def test_closed_store_refuses_to_write(tmp_path) -> None:
    s = LocalStore(tmp_path / "state.json")
    asyncio.run(s.close())
    with pytest.raises(StateError, match="closed"):
        s.commit_sync("c", r(1))


# ---- one process per state file ----------------------------------------------------------


def test_a_second_store_on_one_file_is_refused_naming_file_and_holder(tmp_path) -> None:
    """Two stores on one file would each keep their own mark: both would ACCEPT
    conflicting records at one height/round/step."""
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(5))
    with pytest.raises(StateError) as ei:
        LocalStore(p)
    msg = str(ei.value)
    assert str(p) in msg and f"pid {os.getpid()}" in msg
    assert s.commit_sync("c", r(6)).verdict == Verdict.ACCEPT  # the holder is unaffected
    s.close_sync()
    again = LocalStore(p)  # released by close
    assert again.last("c") == r(6)
    assert again.commit_sync("c", SignRecord(5, 0, 2, b"\x02other", b"sig")).verdict == (
        Verdict.REFUSE
    )


def test_the_lock_is_held_across_processes(tmp_path) -> None:
    import subprocess
    import sys

    p = tmp_path / "state.json"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from nebula.state.local import LocalStore\n"
            f"s = LocalStore({str(p)!r})\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StateError, match=f"pid {holder.pid}"):
            LocalStore(p)
        assert read_states(p) == {}  # reading without the lock is allowed; nothing written
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    LocalStore(p).commit_sync("c", r(1))  # the holder's exit released it


def test_a_refused_open_changes_nothing(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(5))
    before = p.read_bytes()
    with pytest.raises(StateError, match="in use"):
        LocalStore(p, {"c": r(9)})  # an initial state would have raised the mark
    assert p.read_bytes() == before and s.last("c") == r(5)


def test_created_only_on_first_start(tmp_path) -> None:
    p = tmp_path / "state.json"
    first = LocalStore(p)
    assert first.created and first.last("c") is None
    first.close_sync()
    assert not LocalStore(p).created


def test_read_states_of_a_missing_file_is_empty_and_creates_nothing(tmp_path) -> None:
    assert read_states(tmp_path / "none.json") == {}
    assert list(tmp_path.iterdir()) == []


def test_single_node_store_capabilities(tmp_path) -> None:
    """What every store offers, as a single-node store offers it."""
    from nebula.errors import ConfigError

    s = LocalStore(tmp_path / "state.json")
    assert s.replicated is False and s.is_authoritative()
    calls: list[bool] = []
    remove = s.on_role_change(calls.append)
    remove()
    assert calls == []
    assert asyncio.run(s.raise_to("c", r(4))) is True
    assert asyncio.run(s.raise_to("c", r(3))) is False
    st = s.status()
    assert st["role"] == "standalone" and st["authoritative"] is True
    assert st["chains"] == {"c": record_to_json(r(4))}
    for call in (
        s.transfer_leadership(),
        s.add_member(4, "127.0.0.1:1"),
        s.remove_member(4),
    ):
        with pytest.raises(ConfigError, match="needs persist = 'raft'"):
            asyncio.run(call)
    s.compact()


# ---- group commit: decisions of several chains in one loop pass share a write ----------


def test_commits_of_several_chains_in_one_pass_share_a_write(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c0", r(5))
    datasyncs = _count(monkeypatch, "fdatasync")

    async def go() -> list:
        # 8 chains at once (one retry of c0 and one regression on c0 among them).
        coros = [s.commit(f"c{i}", r(10 + i)) for i in range(1, 8)]
        coros += [s.commit("c0", r(5)), s.commit("c0", r(3))]
        return await asyncio.gather(*coros)

    out = asyncio.run(go())
    verdicts = [d.verdict for d in out]
    assert verdicts == [Verdict.ACCEPT] * 7 + [Verdict.SAME, Verdict.REFUSE]
    assert [d.record for d in out[:7]] == [r(10 + i) for i in range(1, 8)]
    # The first decision is written at once (2 mirrored syncs); the six others of the
    # pass share one write (2 more), not 12.
    assert len(datasyncs) == 4
    assert read_states(p) == {"c0": r(5), **{f"c{i}": r(10 + i) for i in range(1, 8)}}


def test_a_failed_group_write_releases_nothing_of_the_group(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    real = os.fdatasync
    calls = 0

    def fail_second_write(fd):
        nonlocal calls
        calls += 1
        if calls > 2:  # the first decision's write succeeds, the group's fails
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fail_second_write)

    async def go() -> list:
        coros = [s.commit(f"c{i}", r(1)) for i in range(4)]
        return await asyncio.gather(*coros, return_exceptions=True)

    out = asyncio.run(go())
    assert out[0].verdict == Verdict.ACCEPT
    assert all(isinstance(e, StateError) for e in out[1:])
    assert s.all() == {"c0": r(1)}  # the failed group moved no mark
    monkeypatch.undo()
    # (What reached the file unsynced may be there: a mark only ever too high is safe.)
    assert read_states(p)["c0"] == r(1)
    assert s.commit_sync("c1", r(1)).verdict == Verdict.ACCEPT  # and the store recovers
    assert read_states(p)["c1"] == r(1)
