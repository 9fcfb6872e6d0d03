"""Regression (found by the simulation, fixed in nebula/raft/node.py) (membership changes): the leader fails closed after a
removal that moves the commit index when it is applied.

``RaftNode._process`` keeps a hard state that only moves the commit index in
``_pending_hs`` and writes it with the next append (node.py, "rides with the next
write").  Two things move the commit index without refreshing ``_pending_hs``:

1. ``advance()``'s LightReady commit index is dropped (``_commit, lmsgs, lcommitted =
   core.advance()``).  On the leader, applying a conf change that removes a lagging voter
   shrinks the quorum: raft-rs's ``post_conf_change`` calls ``maybe_commit`` inside
   ``apply_conf_change``, the commit index jumps (3 -> 4 here), and the LightReady hands
   out entry 4;
2. the snapshot taken after every conf change (``_snapshot_due``) raises the log's commit
   to the applied index (``RaftLog._install_snapshot_log``: ``max(commit, snap.index)``).

The next append (the next client request) then carries the stale ``_pending_hs``
(commit 3) and ``RaftLog.append`` refuses it: ``ValueError: raft hard state (2, 3, 3)
goes back from (2, 3, 4)``; the leader stops for good (``fatal``) - after a routine
``nebula cluster remove`` under load.  In the randomized sweep with removals on:
``python -m tests.sim.harness --seed 211 --nodes 3 --removals`` (as of the commit that
added this file's harness fix; traces change with the code).

Fix that would do: fold the LightReady's commit index into ``_pending_hs`` (or write
``max`` of it and the log's commit), and drop ``_pending_hs`` when a snapshot covers it.
Nothing unsafe happens (the node fails closed); the cluster loses its leader.
"""

from __future__ import annotations

from nebula.guard import SignRecord
from nebula.raft import _core
from nebula.raft.node import CONF_REMOVE
from tests.sim.harness import Profile, Simulation

CALM4 = Profile(
    nodes=4, storm=10**9, p_drop=0.0, p_dup=0.0, p_delay=0.0, p_hold=0.0,
    fault_every=0, propose_every=0, snapshot_entries=1000,
)  # fmt: skip


def test_leader_survives_a_removal_that_moves_the_commit_index() -> None:
    sim = Simulation(0, CALM4)
    sim.start()
    assert sim.run_until(5000, lambda: sim.leader() is not None)
    lead = sim.leader()
    assert lead is not None and lead.node is not None
    L = lead.id
    _A, B, C = (i for i in sim.ids if i != L)

    # C lags (cut off).  The leader appends "remove C" (index i) and decision X (i + 1);
    # B gets only "remove C": under 4 voters X lacks a quorum, under the 3 left it has one.
    sim.cut(L, C)
    sim.cut(C, L)
    _term, i = lead.node.propose_conf_change(CONF_REMOVE, C, b"", lambda r, e: None)

    def hold(src: int, dst: int, payload: bytes) -> bool:
        info = _core.message_info(payload)  # (type, from, to, term, log_term, index, ..., n)
        return src == L and dst == B and info[0] == _core.MSG_APPEND and info[5] + info[8] > i

    sim.hold = hold
    assert sim.propose(L, b"sim-a", SignRecord(5, 0, 1, b"X", b"sig")) is not None
    sim.kick(L)
    # Applying "remove C" commits X at once (the LightReady), then the snapshot follows.
    assert sim.run_until(sim.now + 500, lambda: (b"sim-a", 5, 0, 1) in sim.released)
    assert lead.node.voters == sorted(set(sim.ids) - {C})

    # The next request: its append carries the deferred hard state.
    assert sim.propose(L, b"sim-a", SignRecord(6, 0, 1, b"Y", b"sig")) is not None
    assert sim.run_until(sim.now + 500, lambda: (b"sim-a", 6, 0, 1) in sim.released)
    assert lead.node.fatal is None
