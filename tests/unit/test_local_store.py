"""The single-node store: a state file written (two copies, one fdatasync) per decision."""

from __future__ import annotations

import asyncio
import json
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nebula.errors import StateError
from nebula.guard import SignRecord, Verdict
from nebula.state import local
from nebula.state.base import (
    load_priv_validator_state,
    record_from_json,
    record_json_bytes,
    record_to_json,
)
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
        assert len(datasyncs) == h  # one fdatasync per decision, nothing else
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
    assert seen == [r(7)]  # durable from its one sync on


def _commit_whose_fdatasync_fails(p, monkeypatch) -> LocalStore:
    """A store at ``p`` holding r(1), whose commit of r(2) just failed in fdatasync."""
    s = LocalStore(p)
    s.commit_sync("c", r(1))

    def boom(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(StateError, match="cannot persist"):
        s.commit_sync("c", r(2))
    monkeypatch.undo()
    return s


def test_write_failure_refuses(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    s = _commit_whose_fdatasync_fails(p, monkeypatch)
    assert s.last("c") == r(1)  # nothing was released, the in-memory mark did not move
    # After an I/O error the descriptor is not trusted: the next write re-creates the
    # whole file through a temp file and a rename.
    renames = _count(monkeypatch, "replace")
    assert s.commit_sync("c", r(3)).verdict == Verdict.ACCEPT
    assert len(renames) == 1
    assert on_disk(p) == r(3)
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def test_a_restart_after_a_failed_fdatasync_writes_what_it_reads_again(
    tmp_path, monkeypatch
) -> None:
    """After a failed fdatasync Linux keeps the unwritten pages in the page cache and marks
    them clean: a process restarted without a reboot reads the state whose commit failed
    (here the page cache is all there is to read), and an identical retry would release
    it with no write.  Opening writes the newest state again, as a new slot, and syncs it
    before anything is answered (found in review, with the Raft log's case)."""
    p = tmp_path / "state.json"
    s = _commit_whose_fdatasync_fails(p, monkeypatch)
    s.close_sync()  # the process stops (fails closed, or is restarted by the operator)
    seq_failed = local._parse(p.read_bytes(), p).seq  # the slot whose sync failed
    datasyncs = _count(monkeypatch, "fdatasync")
    s = LocalStore(p)
    assert s.last("c") == r(2)
    assert len(datasyncs) == 1
    assert local._parse(p.read_bytes(), p).seq == seq_failed + 1
    assert on_disk(p) == r(2)
    datasyncs.clear()
    assert s.commit_sync("c", r(2)).verdict == Verdict.SAME  # the retry: no write needed
    assert datasyncs == []


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


@pytest.mark.parametrize(
    ("content", "why"),
    [
        # A priv_validator_key.json given by mistake (found in review: it read as 0/0/0).
        ('{"address": "AB", "pub_key": {}, "priv_key": {}}', "no 'height'"),
        ('{"Height": "500", "Round": 0, "Step": 3}', "no 'height'"),
        ('{"height": "500", "step": 3}', "no 'round'"),
        ('{"height": 1e3, "round": 0, "step": 3}', "not an integer"),
        ('{"height": "5.9", "round": 0, "step": 3}', "not an integer"),
        ('{"height": true, "round": 0, "step": 3}', "not an integer"),
        ('{"height": "-5", "round": 0, "step": 3}', "not an integer"),
        ('{"height": -5, "round": 0, "step": 3}', "out of range"),
        # Could never be encoded or signed past (found in review: retried forever).
        ('{"height": "99999999999999999999999", "round": 0, "step": 3}', "out of range"),
        ('{"height": "9223372036854775808", "round": 0, "step": 3}', "out of range"),
        ('{"height": "5", "round": 2147483648, "step": 3}', "out of range"),
        ('{"height": "5", "round": 0, "step": 4}', "out of range"),
        # Past Python's 4300-digit int() limit, or its JSON recursion limit: these were
        # a ValueError / RecursionError traceback, not an error naming the file (review).
        ('{"height": "%s", "round": 0, "step": 3}' % ("9" * 5000), "out of range"),
        ('{"height": %s, "round": 0, "step": 3}' % ("9" * 5000), "cannot read"),
        (
            '{"height": "5", "round": 0, "step": 3, "x": %s}' % ("[" * 10**5 + "]" * 10**5),
            "cannot read",
        ),
    ],
)
@pytest.mark.usefixtures("production_recursion_limit")
def test_a_file_that_is_not_a_sign_state_is_an_error_naming_it(
    tmp_path, content: str, why: str
) -> None:
    f = tmp_path / "init.json"
    f.write_text(content)
    with pytest.raises(StateError, match=why) as e:
        load_priv_validator_state(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize(
    "chains",
    [
        '{"c": {"height": "%s", "round": 0, "step": 3}}' % ("9" * 5000),
        '{"c": %s}' % ("[" * 10**5 + "]" * 10**5),
    ],
)
@pytest.mark.usefixtures("production_recursion_limit")
def test_a_first_release_state_file_past_the_parser_limits_is_a_state_error(
    tmp_path, chains: str
) -> None:
    """The first release's plain-JSON state file (read, then converted): past the int()
    digit limit or the JSON recursion limit it is a StateError naming the file, never a
    ValueError / RecursionError traceback at start (found in review)."""
    f = tmp_path / "state.json"
    f.write_text('{"version": 1, "chains": ' + chains + "}")
    for read in (read_states, LocalStore):
        with pytest.raises(StateError) as e:
            read(f)
        assert str(f) in str(e.value)


def test_sign_states_of_other_signers_and_the_bounds_are_read() -> None:
    # tmkms writes the round as a string and adds a block_id; the largest values load.
    tmkms = {"height": "1200", "round": "2", "step": 3, "block_id": "ABCD"}
    assert record_from_json(tmkms, "x") == SignRecord(1200, 2, 3, b"", b"")
    top = {"height": str((1 << 63) - 1), "round": (1 << 31) - 1, "step": 3}
    assert record_from_json(top, "x") == SignRecord((1 << 63) - 1, (1 << 31) - 1, 3, b"", b"")


def test_a_sign_state_of_another_chain_is_refused_for_import(tmp_path) -> None:
    """The chain id inside the sign bytes must be the chain's (found in review: chain-a's
    export imported into chain-b raised chain-b's mark to chain-a's height)."""
    from nebula import proto
    from nebula.state.base import check_state_chain
    from nebula.types import Proposal, Timestamp
    from tests.support.votes import vote

    sb = proto.vote_sign_bytes("chain-a", vote(7))
    rec = SignRecord(7, 0, 2, sb, b"s" * 64)
    check_state_chain(rec, "chain-a", "x")
    with pytest.raises(StateError, match=r"a sign state of chain 'chain-a'.*not of 'chain-b'"):
        check_state_chain(rec, "chain-b", "x")
    prop = Proposal(32, 7, 0, -1, vote(7).block_id, Timestamp(1_700_000_000, 1))
    psb = proto.proposal_sign_bytes("chain-b", prop)
    check_state_chain(SignRecord(7, 0, 1, psb, b"s" * 64), "chain-b", "x")
    with pytest.raises(StateError, match="not canonical sign bytes"):
        check_state_chain(SignRecord(7, 0, 1, b"\x05abc", b"s"), "chain-b", "x")
    check_state_chain(SignRecord(7, 0, 1, b"", b""), "chain-b", "x")  # nothing to check
    f = tmp_path / "a.json"
    f.write_text(json.dumps(record_to_json(rec)))
    assert load_priv_validator_state(f, "chain-a") == rec
    with pytest.raises(StateError) as e:
        load_priv_validator_state(f, "chain-b")
    assert str(f) in str(e.value)


# ---- the state file (format 2: two pairs, each slot in two copies a region apart) ------


def _size(p) -> int:
    return struct.unpack_from("<I", p.read_bytes(), 12)[0]


def _copies(p) -> dict[tuple[int, str], tuple[int, bytes] | None]:
    """(pair, "A"/"B") -> the decoded slot there (None for an invalid one)."""
    raw = p.read_bytes()
    size = _size(p)
    out = {}
    for pair in (0, 1):
        for copy, off in zip("AB", local.slot_offsets(size, pair), strict=True):
            out[(pair, copy)] = local.decode_slot(raw[off : off + size])
    return out


def _newest_pair(p) -> int:
    best = max((v[0], k[0]) for k, v in _copies(p).items() if v is not None)
    return best[1]


def _overwrite(p, offset: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_file_layout_and_size_never_change(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    size = p.stat().st_size
    assert size == local.file_size(local.SLOT_SIZE)
    assert size == local.HEADER_SIZE + (1 << 20) + 2 * local.SLOT_SIZE
    raw = p.read_bytes()
    assert raw[:8] == local.FILE_MAGIC and struct.unpack_from("<HH", raw, 8) == (2, 2)
    inode = p.stat().st_ino
    for h in range(1, 8):
        s.commit_sync("c", r(h))
        assert p.stat().st_size == size and p.stat().st_ino == inode
    c = _copies(p)
    # creation wrote 1 (pair 1) and 2 (pair 0); seven commits: 3..9
    assert c[(1, "A")][0] == c[(1, "B")][0] == 9 and c[(0, "A")][0] == c[(0, "B")][0] == 8
    assert json.loads(c[(1, "A")][1])["chains"]["c"] == record_to_json(r(7))
    assert c[(1, "A")] == c[(1, "B")]
    # the other pair keeps the previous decision
    assert json.loads(c[(0, "B")][1])["chains"]["c"] == record_to_json(r(6))
    # The payload is the old file's JSON, compact.
    assert b" " not in c[(1, "A")][1] and b"\n" not in c[(1, "A")][1]
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def big(h: int) -> SignRecord:
    """A precommit-sized record: ~300 bytes of sign bytes, an extension, two signatures."""
    return SignRecord(
        h, 0, 3, b"\x01" * 290 + bytes([h % 256]), b"s" * 64, b"\x02" * 180, b"e" * 64
    )


def _before_and_after(tmp_path) -> tuple[bytes, bytes, list[tuple[int, bytes]]]:
    """The file with big(6) released, the file after big(7)'s commit, and that commit's
    writes as (offset, bytes) in the order the store made them."""
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", big(5))
    s.commit_sync("c", big(6))  # durable: commit returned, its signature may have left
    s.close_sync()
    q = tmp_path / "after.json"
    q.write_bytes(p.read_bytes())
    t = LocalStore(q)  # opening writes big(6) again, as a new slot
    before = q.read_bytes()
    writes: list[tuple[int, bytes]] = []
    real = local.pwrite_all

    def spy(fd, data, offset):
        writes.append((offset, bytes(data)))
        return real(fd, data, offset)

    local.pwrite_all = spy
    try:
        t.commit_sync("c", big(7))
        t.close_sync()
    finally:
        local.pwrite_all = real
    assert len(writes) == 2  # copy A, copy B: one decision, two pwrites, one fdatasync
    return before, q.read_bytes(), writes


SECTOR = 512


def _reopen(tmp_path, image: bytes) -> SignRecord | None:
    p = tmp_path / "crash.json"
    p.write_bytes(image)
    store = LocalStore(p)
    try:
        last = store.last("c")
        # whatever it loaded is now whole: both copies of the newest slot valid
        c = _copies(p)
        n = _newest_pair(p)
        assert c[(n, "A")] is not None and c[(n, "A")] == c[(n, "B")]
        return last
    finally:
        store.close_sync()


def test_a_crash_at_every_write_loses_nothing_released(tmp_path) -> None:
    """The crash-at-every-write test of format 2: the commit of big(7) after big(6) was
    released, cut short after every sector of either write, in order and out of order
    (a device may persist the sectors of an unsynced write in any order)."""
    before, after, writes = _before_and_after(tmp_path)
    (oa, da), (ob, db) = writes
    images = []
    # In order: copy A up to every sector boundary, then copy B up to every boundary.
    for k in range(0, len(da) + 1, SECTOR):
        img = bytearray(before)
        img[oa : oa + k] = da[:k]
        images.append(bytes(img))
    for k in range(0, len(db) + 1, SECTOR):
        img = bytearray(before)
        img[oa : oa + len(da)] = da
        img[ob : ob + k] = db[:k]
        images.append(bytes(img))
    # Out of order: random subsets of the sectors of both writes reached the disk.
    import random

    rng = random.Random(7)
    sectors = [(o + i, d[i : i + SECTOR]) for o, d in writes for i in range(0, len(d), SECTOR)]
    for _ in range(200):
        img = bytearray(before)
        for off, chunk in sectors:
            if rng.random() < 0.5:
                img[off : off + len(chunk)] = chunk
        images.append(bytes(img))
    seen = set()
    for img in images:
        last = _reopen(tmp_path, img)
        # never below the released decision; the torn one only if a whole copy made it
        assert last in (big(6), big(7)), last
        seen.add(last.height)
    assert seen == {6, 7}  # both outcomes occur, so the test can tell them apart
    assert _reopen(tmp_path, after) == big(7)


def test_a_rotten_sector_loses_no_released_state(tmp_path) -> None:
    """After the commit of big(7) returned, any one sector of the file may rot: the
    released state is still loaded (or, for the header, the store refuses to start)."""
    _before, after, writes = _before_and_after(tmp_path)
    p = tmp_path / "rot.json"
    size = _size_of(after)
    regions = [(0, local.HEADER_SIZE)]
    for pair in (0, 1):
        for off in local.slot_offsets(size, pair):
            regions.append((off, size))
    checked = 0
    for start, length in regions:
        for off in range(start, start + length, SECTOR):
            img = bytearray(after)
            img[off] ^= 0xFF
            img[off + 100] ^= 0x5A
            p.write_bytes(img)
            if off < local.HEADER_SIZE and off < local.FILE_HEADER_LEN:
                with pytest.raises(StateError, match="refusing to start"):
                    LocalStore(p)  # a rotten header: refused, never a guess
                continue
            store = LocalStore(p)
            assert store.last("c") == big(7), f"sector at {off}"
            store.close_sync()
            checked += 1
    assert checked > 30


def _size_of(raw: bytes) -> int:
    return struct.unpack_from("<I", raw, 12)[0]


def test_a_torn_write_repaired_at_open_keeps_two_copies(tmp_path) -> None:
    """Copy A of big(7) reached the disk whole, copy B did not: big(7) was never released,
    but a retry could release it without a write; so the store writes it again, whole,
    when it opens the file."""
    before, _after, writes = _before_and_after(tmp_path)
    (oa, da), (ob, db) = writes
    img = bytearray(before)
    img[oa : oa + len(da)] = da
    img[ob : ob + 100] = db[:100]
    p = tmp_path / "torn.json"
    p.write_bytes(img)
    store = LocalStore(p)
    assert store.last("c") == big(7)
    c = _copies(p)
    n = _newest_pair(p)
    assert c[(n, "A")] == c[(n, "B")] and c[(n, "A")] is not None
    # and a rot of either copy of it now loses nothing
    store.close_sync()
    for off in local.slot_offsets(_size(p), n):
        raw = bytearray(p.read_bytes())
        raw[off + 40] ^= 1
        q = tmp_path / f"rot{off}.json"
        q.write_bytes(raw)
        assert read_states(q)["c"] == big(7)


def test_every_slot_corrupt_refuses_to_start(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(5))
    s.commit_sync("c", r(6))
    size = _size(p)
    for pair in (0, 1):
        for off in local.slot_offsets(size, pair):
            _overwrite(p, off + local.SLOT_PAYLOAD_OFFSET + 3, b"\xff\xfe")
    s.close_sync()
    with pytest.raises(StateError, match="every state slot is corrupted"):
        LocalStore(p)
    # Zeroed slots (e.g. a file of zeros) are no better.
    _overwrite(p, local.HEADER_SIZE, bytes(p.stat().st_size - local.HEADER_SIZE))
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
    # The file never changes size: a short or long file was not written by Nebula, so
    # nothing in it is trusted.
    p.write_bytes(good[: local.HEADER_SIZE + 100])
    with pytest.raises(StateError, match="size"):
        LocalStore(p)
    p.write_bytes(good + b"\0")
    with pytest.raises(StateError, match="size"):
        LocalStore(p)


def test_copies_that_differ_or_a_slot_in_the_wrong_pair_refuse(tmp_path) -> None:
    p = tmp_path / "state.json"
    LocalStore(p).commit_sync("c", r(5))
    good = p.read_bytes()
    size = _size(p)
    n = _newest_pair(p)
    seq = _copies(p)[(n, "A")][0]
    payload = json.dumps({"version": 1, "chains": {"c": record_to_json(r(9))}}).encode()
    _overwrite(p, local.slot_offsets(size, n)[1], bytes(local.encode_slot(seq, payload, size)))
    with pytest.raises(StateError, match="copies of sequence number"):
        LocalStore(p)
    p.write_bytes(good)
    # a valid slot whose sequence number belongs to the other pair
    _overwrite(
        p, local.slot_offsets(size, 1 - n)[0], bytes(local.encode_slot(seq + 2, payload, size))
    )
    with pytest.raises(StateError, match="belongs to the other pair"):
        LocalStore(p)


def test_sequence_is_64_bit_and_never_wraps(tmp_path) -> None:
    p = tmp_path / "state.json"
    LocalStore(p).commit_sync("c", r(5))
    # A file whose newest pair is near the end of the 64-bit range (and past 2**32).
    payload = json.dumps({"version": 1, "chains": {"c": record_to_json(r(6))}}).encode()
    seq = local.MAX_SEQ - 2  # odd: pair 1 (opening writes it again as MAX_SEQ - 1)
    size = _size(p)
    for off in local.slot_offsets(size, 1):
        _overwrite(p, off, bytes(local.encode_slot(seq, payload, size)))
    s = LocalStore(p)
    assert s.last("c") == r(6)
    assert s.commit_sync("c", r(7)).verdict == Verdict.ACCEPT  # seq 2**64 - 1
    assert max(v[0] for v in _copies(p).values() if v) == local.MAX_SEQ
    assert on_disk(p) == r(7)
    with pytest.raises(StateError, match="exhausted"):  # never wraps to 0
        s.commit_sync("c", r(8))
    assert on_disk(p) == r(7)


def _format1_file(p, states: dict[str, SignRecord], seqs=(7, 8)) -> None:
    """A state file exactly as the previous release (format 1, mirrored slots) wrote it."""
    payload = json.dumps(
        {"version": 1, "chains": {c: record_to_json(x) for c, x in states.items()}},
        separators=(",", ":"),
    ).encode()
    size = local.SLOT_SIZE
    img = bytearray(local.HEADER_SIZE + 2 * size)
    img[: local.FILE_HEADER_LEN] = local.file_header(size, local.FILE_FORMAT_MIRRORED)
    for i, seq in enumerate(seqs):
        slot = local.encode_slot(seq, payload, size)
        img[local.HEADER_SIZE + i * size : local.HEADER_SIZE + i * size + len(slot)] = slot
    p.write_bytes(img)
    p.chmod(0o600)


def test_upgrades_the_previous_release_format(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    _format1_file(p, {"a": big(40), "b": r(9)})
    assert read_states(p) == {"a": big(40), "b": r(9)}  # read as it is, nothing written
    renames = _count(monkeypatch, "replace")
    s = LocalStore(p)  # opening converts it, atomically, before anything is answered
    assert len(renames) == 1
    assert struct.unpack_from("<H", p.read_bytes(), 8)[0] == 2
    assert s.all() == {"a": big(40), "b": r(9)}
    datasyncs = _count(monkeypatch, "fdatasync")
    s.commit_sync("b", r(10))
    assert len(renames) == 1 and len(datasyncs) == 1
    assert read_states(p) == {"a": big(40), "b": r(10)}
    # a format-1 file with a torn newer slot loads the older one, and converts
    q = tmp_path / "torn1.json"
    _format1_file(q, {"b": r(9)})
    raw = bytearray(q.read_bytes())
    raw[local.HEADER_SIZE + local.SLOT_SIZE + 60] ^= 1  # slot 1 (seq 8) torn
    q.write_bytes(raw)
    assert LocalStore(q).last("b") == r(9)
    # and both format-1 slots with one sequence number still refuse (never guess)
    _format1_file(q, {"b": r(9)}, seqs=(8, 8))
    with pytest.raises(StateError, match="sequence number 8"):
        LocalStore(q)


def test_migrates_the_first_release_json_format(tmp_path, monkeypatch) -> None:
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
    p.write_text(json.dumps(old, indent=1))  # exactly what the first release wrote
    p.chmod(0o644)
    assert read_states(p)["b"] == r(9)  # inspection reads it as it is
    assert p.read_text().startswith("{")
    renames = _count(monkeypatch, "replace")
    datasyncs = _count(monkeypatch, "fdatasync")
    s = LocalStore(p)  # a store converts it at open, atomically (temp file + rename)
    assert s.last("a") == SignRecord(36, 1, 3, b"\x08\x02", b"\x01" * 64, b"ext", b"\x02" * 64)
    assert s.last("b") == r(9)
    assert len(renames) == 1
    assert p.read_bytes()[:8] == local.FILE_MAGIC
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert [x.name for x in tmp_path.iterdir() if x.name.endswith(".tmp")] == []
    before = len(datasyncs)
    s.commit_sync("b", r(11))
    assert len(renames) == 1 and len(datasyncs) == before + 1
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
    assert p.stat().st_size == local.file_size(size)
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
    # The first decision is written at once (one sync); the six others of the pass
    # share one write (one more sync), not six.
    assert len(datasyncs) == 2
    assert read_states(p) == {"c0": r(5), **{f"c{i}": r(10 + i) for i in range(1, 8)}}


def test_a_failed_group_write_releases_nothing_of_the_group(tmp_path, monkeypatch) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    real = os.fdatasync
    calls = 0

    def fail_second_write(fd):
        nonlocal calls
        calls += 1
        if calls > 1:  # the first decision's write succeeds, the group's fails
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


_records = st.builds(
    SignRecord,
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**31 - 1),
    st.integers(0, 3),
    st.binary(max_size=300),
    st.binary(max_size=96),
    st.binary(max_size=300),
    st.binary(max_size=96),
)


@given(_records)
def test_a_record_encodes_to_the_same_bytes_as_the_json_encoder(rec: SignRecord) -> None:
    assert record_json_bytes(rec) == json.dumps(record_to_json(rec), separators=(",", ":")).encode()


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["a", "b", 'c"\\', "chain-é", "\x00"]), _records, max_size=3
        ),
        max_size=6,
    )
)
def test_the_payload_is_the_json_of_the_current_states_whatever_changed(
    steps: list[dict[str, SignRecord]],
) -> None:
    """The per-chain cache never serves a stale record, a removed chain, or a bad key."""
    store = LocalStore.__new__(LocalStore)
    store._frags = {}
    states: dict[str, SignRecord] = {}
    for change in [*steps, {}]:
        states = {**states, **change}
        if change and len(states) > 1:
            states.pop(sorted(states)[0])  # chains also go away
        want = json.dumps(
            {"version": 1, "chains": {c: record_to_json(r) for c, r in sorted(states.items())}},
            separators=(",", ":"),
        ).encode()
        assert store._payload(states) == want
        assert set(store._frags) == set(states)
