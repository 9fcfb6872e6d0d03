"""Fuzzing what the Raft layer reads from peers and from disk.

Properties:

* a log command or snapshot payload decodes, or raises StateError (a NebulaError with a
  message) - never another exception, never a partial record; what decodes re-encodes to
  the same bytes;
* a Raft message from an authenticated peer that is not a valid raft-rs protobuf, or that
  names another sender or receiver, is refused by the core with RaftError and leaves the
  node working (it still commits afterwards);
* a log file or snapshot file of random or damaged content is refused with StateError at
  open (or loads a consistent state when the damage is a torn tail) - never another
  exception.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from nebula.errors import StateError
from nebula.guard import SignRecord
from nebula.raft import _core, commands
from nebula.raft.node import RaftNode
from nebula.raft.storage import LOG_NAME, SNAP_NAME, HardState, RaftLog
from nebula.state.raft import SignStateMachine
from tests.fuzz.conftest import fuzz_settings, mutations, outcome
from tests.support.memfs import MemFS

REC = SignRecord(7, 1, 2, b"sign-bytes", b"sig", b"ext", b"ext-sig")
GOOD_CMD = commands.encode_command(commands.OP_SIGN, b"chain", REC)
GOOD_SNAP = commands.encode_states({b"chain": REC}, {4: "127.0.0.1:9"})


@fuzz_settings(400)
@given(mutations(GOOD_CMD))
@example(b"")
@example(bytes([commands.VERSION, 9]) + GOOD_CMD[2:])
def test_log_commands_decode_or_refuse(data: bytes) -> None:
    kind, res = outcome(commands.decode_command, data)
    if kind == "error":
        assert res is StateError
        return
    op, chain, rec = res
    assert commands.encode_command(op, chain, rec) == data


@fuzz_settings(400)
@given(mutations(GOOD_SNAP))
@example(b"NBSM")
def test_snapshot_data_decodes_or_refuses(data: bytes) -> None:
    kind, res = outcome(commands.decode_states, data)
    if kind == "error":
        assert res is StateError
        return
    states, members = res
    assert commands.encode_states(states, members) == data


def _single() -> RaftNode:
    fs = MemFS()
    return RaftNode(
        1, RaftLog("/n", fs=fs), SignStateMachine(), lambda to, p: True, peers=[1, 2, 3]
    )


@fuzz_settings(300)
@given(st.binary(max_size=300), st.integers(0, 5))
@example(b"\x08\x03\x10\x01\x18\x02", 2)  # a MsgAppend naming 1 -> 2, from peer 2
def test_garbage_from_a_peer_is_refused_by_the_core(payload: bytes, peer: int) -> None:
    node = _single()
    try:
        _core.message_info(payload)
    except _core.RaftError:
        pass
    node.receive(peer, payload)  # must not raise, must not fail the node
    node.process()
    assert node.fatal is None


@fuzz_settings(200)
@given(st.binary(max_size=4096), st.booleans())
def test_random_log_or_snapshot_files_are_refused_at_open(content: bytes, snap: bool) -> None:
    fs = MemFS()
    log = RaftLog("/d", fs=fs)
    log.append([], HardState(1, 0, 0))
    log.sync()
    log.close()
    name = SNAP_NAME if snap else LOG_NAME
    path = f"/d/{name}"
    fd = fs.open(path, create=True)
    fs.truncate(fd, 0)
    fs.pwrite(fd, content, 0)
    fs.fsync(fd)
    fs.close(fd)
    kind, res = outcome(lambda: RaftLog("/d", fs=fs).load())
    if kind == "error":
        assert res is StateError
    else:
        # Only a file that is still a valid log (e.g. empty after a torn first write)
        # may load; what loads is consistent.
        assert res.snapshot is None or all(e.index > res.snapshot.index for e in res.entries)
