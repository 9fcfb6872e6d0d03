"""Regression (found by the simulation, fixed in nebula/raft/node.py) (membership changes): a leader that applies its own removal
keeps leading.

``nebula cluster remove X`` on leader L appends the removal of X.  The entry reaches X, L
fails over before it commits, and X - still a voter in its applied configuration - wins
the election, commits the entry and applies its own removal **while leader**.  raft-rs
0.7 leaves such a leader in place ("untested" branch of ``Raft::post_conf_change``),
without a ``Progress`` of its own:

* with an entry of its term still uncommitted (a client's proposal in flight), the next
  append acknowledgement that moves the commit index panics in ``Raft::maybe_commit``
  (``prs.get_mut(self_id).unwrap()``, raft.rs:943).  ``RaftNode.receive`` catches only
  ``RaftError``, so the ``PanicException`` (a ``BaseException``) escapes it - and the
  transport's ``except Exception`` - instead of failing the node closed as ``process()``
  does; the node keeps a ``RawNode`` whose ``step`` unwound midway;
* idle, it stays leader for good: both remaining voters hear its heartbeats (so
  CheckQuorum keeps it and nobody campaigns) while raft-rs drops every proposal on a
  leader outside its configuration - the cluster signs nothing until an operator acts.

In the randomized sweep with removals on: ``python -m tests.sim.harness --seed 591
--nodes 3 --removals`` and ``--seed 1398 --nodes 5 --removals`` (panics; traces change
with the code).

What the tests expect: nothing escapes the nodes, and the two remaining members go on
signing.  Fixes that would do: in the binding, step down when a conf change removes the
leader (``become_follower``, like etcd's ``StepDownOnRemoval``), or in ``RaftNode`` fail
closed once the applied configuration no longer holds this node; and ``receive`` treating
a panic like ``process`` does.  Until then the sweep runs membership changes that add
members only (``NEBULA_SIM_REMOVALS=1`` turns removals on).
"""

from __future__ import annotations

import pytest

from nebula.guard import SignRecord
from nebula.raft.node import CONF_REMOVE, LEADER
from tests.sim.harness import Profile, Simulation

CALM = Profile(
    nodes=3, storm=10**9, p_drop=0.0, p_dup=0.0, p_delay=0.0, p_hold=0.0,
    fault_every=0, propose_every=0, snapshot_entries=1000,
)  # fmt: skip


@pytest.mark.parametrize("in_flight", [True, False], ids=["proposal-in-flight", "idle"])
def test_a_leader_that_applies_its_own_removal_hands_over(in_flight: bool) -> None:
    sim = Simulation(0, CALM)
    sim.start()
    assert sim.run_until(5000, lambda: sim.leader() is not None)
    lead = sim.leader()
    assert lead is not None and lead.node is not None
    L = lead.id
    X, Y = (i for i in sim.ids if i != L)
    x = sim.members[X]

    # L appends "remove X"; X gets it, but neither X's acknowledgement reaches L nor the
    # entry Y: it cannot commit under L.
    sim.cut(X, L)
    sim.cut(L, Y)
    _term, index = lead.node.propose_conf_change(CONF_REMOVE, X, b"", lambda r, e: None)
    sim.kick(L)
    assert sim.run_until(sim.now + 500, lambda: x.node is not None and x.node.last_index >= index)

    # L fails over (paused); X, whose log is the longest, wins with Y's vote.
    sim.pause(L)
    sim.heal()
    assert sim.run_until(sim.now + 5000, lambda: x.node is not None and x.node.role == LEADER)
    if in_flight:
        # A client's request reaches X before it applies its removal, and L comes back
        # while X's entries are in flight: L's acknowledgement moves the commit index
        # after X applied its removal.
        assert sim.propose(X, b"sim-a", SignRecord(9, 0, 1, b"in flight", b"sig")) is not None
    else:
        assert sim.run_until(
            sim.now + 2000, lambda: x.node is None or X not in x.node.voters
        )  # X committed and applied its own removal
    sim.resume(L)

    # L and Y - the whole configuration now - elect a leader and sign.
    assert sim.run_until(sim.now + 5000, lambda: (m := sim.leader()) is not None and m.id != X), (
        "no leader among the remaining members"
    )
    # The client retries the identical request until it is answered (the first leader
    # it finds may be L, stale, whose entry is then replaced).
    rec = SignRecord(10, 0, 1, b"after removal", b"sig")
    for _ in range(20):
        m = sim.leader()
        if m is not None and m.id != X:
            sim.propose(m.id, b"sim-a", rec)
        if sim.run_until(sim.now + 300, lambda: (b"sim-a", 10, 0, 1) in sim.released):
            break
    assert sim.released.get((b"sim-a", 10, 0, 1)) == b"after removal"
