"""Reading a stopped member's Raft data for an offline export (nebula.state.raft
``states_in_log``, ``read_offline``; ``nebula state export --offline``): what it applied,
the highest entry it holds, and what is exported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nebula import config
from nebula.errors import StateError
from nebula.guard import SignRecord
from nebula.raft import commands
from nebula.raft.binding import check_binding
from nebula.raft.storage import Entry, HardState, Loaded, RaftLog, Snapshot
from nebula.state.raft import read_offline, states_in_log

A, B = b"chain-a", b"chain-b"


def rec(h: int, r: int = 0, s: int = 2, tag: bytes = b"") -> SignRecord:
    return SignRecord(h, r, s, b"sb-%d-%d-%d%s" % (h, r, s, tag), b"sig-%d%s" % (h, tag))


def sign(index: int, chain: bytes, r: SignRecord, term: int = 2) -> Entry:
    return Entry(index, term, 0, commands.encode_command(commands.OP_SIGN, chain, r), b"")


def test_committed_entries_are_applied_and_a_higher_uncommitted_one_is_a_bare_mark() -> None:
    snap = Snapshot(10, 1, (1, 2, 3), (), commands.encode_states({A: rec(5), B: rec(7)}))
    entries = [
        Entry(11, 2, 0, b"", b""),  # a new leader's empty entry
        sign(12, A, rec(6)),
        sign(13, A, rec(6, tag=b"x")),  # same HRS, other bytes: refused when applied
        Entry(14, 2, 1, b"\x08\x01", b"ctx"),  # a conf change: not a command
        sign(15, B, rec(8)),
        sign(16, A, rec(9)),  # past the commit index
    ]
    st = states_in_log(Loaded(HardState(2, 1, 15), snap, entries))
    assert st.applied == {A: rec(6), B: rec(8)}
    assert st.highest == {A: rec(9), B: rec(8)}
    assert (st.commit, st.last_index) == (15, 16)
    # A's highest entry is not known to be committed: its HRS, without bytes to re-answer.
    assert st.export(A) == SignRecord(9, 0, 2)
    assert st.export(B) == rec(8)  # the applied record, signature and all
    assert st.export(b"chain-c") is None


def test_a_commit_index_past_the_log_and_a_snapshot_alone() -> None:
    snap = Snapshot(20, 3, (1,), (), commands.encode_states({A: rec(4)}))
    st = states_in_log(Loaded(HardState(3, 1, 20), snap, []))
    assert st.applied == st.highest == {A: rec(4)}
    assert (st.commit, st.last_index) == (20, 20)
    assert st.export(A) == rec(4)
    st = states_in_log(Loaded(HardState(0, 0, 0), None, []))
    assert st.applied == st.highest == {} and st.last_index == 0


def test_an_import_raises_the_mark_and_a_lower_uncommitted_entry_changes_nothing() -> None:
    raise_to = commands.encode_command(commands.OP_RAISE, A, SignRecord(50, 0, 0))
    entries = [
        sign(1, A, rec(10)),
        Entry(2, 2, 0, raise_to, b""),
        sign(3, A, rec(20)),  # uncommitted and lower than the import: not exported
    ]
    st = states_in_log(Loaded(HardState(2, 1, 2), None, entries))
    assert st.applied[A].hrs == (50, 0, 0)
    assert st.export(A) == st.applied[A]


def test_an_entry_this_release_cannot_read_is_an_error_not_a_lower_mark() -> None:
    bad = Entry(1, 1, 0, b"\x09garbage", b"")
    with pytest.raises(StateError):
        states_in_log(Loaded(HardState(1, 1, 1), None, [bad]))
    with pytest.raises(StateError):  # uncommitted: still read, never skipped
        states_in_log(Loaded(HardState(1, 1, 0), None, [bad]))


def test_offline_read_under_a_new_secret_does_not_advise_a_wipe(tmp_path: Path) -> None:
    """The rebuild steps write a new secret: an operator who wrote it before exporting is
    told to point secret_path back, never the start's advice to wipe the only copy of
    this member's mark (found in review)."""
    old, new = b"old-cluster-secret-0123456789abcdef", b"new-cluster-secret-0123456789abcdef"
    d = tmp_path / "raft_data"
    d.mkdir()
    check_binding(d, old)
    RaftLog(d / "log").close()
    with pytest.raises(StateError) as ei:
        read_offline(d, new)
    msg = str(ei.value)
    assert "wipe" not in msg and "secret_path" in msg and "keep this directory" in msg


def test_offline_export_is_not_below_a_configured_initial_state_not_yet_applied(
    tmp_path: Path,
) -> None:
    """A migration's initial state that the cluster never applied (it lost its majority
    before the import committed): the old signer signed up to it, so the export is at
    least that (found in review; the online export refuses then)."""
    from nebula.cli.main import _export_offline

    text = config.template(
        "native", chain_id="c1", version="v0_38", persist="raft", key_type="ed25519"
    )
    head, sep, raft = text.partition("[raft]")
    raft = raft.replace(
        '# initial_state_path = "./priv_validator_state.json"',
        'initial_state_path = "./pvs.json"',
        1,
    )
    cfg_path = tmp_path / "nebula.toml"
    cfg_path.write_text(head + sep + raft)
    secret = tmp_path / "cluster_secret"
    secret.write_bytes(b"ab" * 32 + b"\n")
    os.chmod(secret, 0o600)
    (tmp_path / "pvs.json").write_text(json.dumps({"height": "100", "round": 0, "step": 3}))
    RaftLog(tmp_path / "raft_data" / "log").close()  # a log that holds nothing
    rec = _export_offline(config.load(str(cfg_path)), "c1")
    assert rec is not None and rec.hrs == (100, 0, 3), rec
