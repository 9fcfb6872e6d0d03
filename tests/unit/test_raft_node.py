"""The Ready loop (nebula/raft/node.py) over the real raft-rs core, in memory.

Nodes share one in-memory file system (tests/support/memfs.py) and a queue standing for
the network; every message goes through the same ``receive``/``process`` calls the event
loop uses.  The deterministic simulation (tests/sim) covers faults; this file pins the
contract of single operations.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from nebula.errors import NotLeader, ReplicationError, StateError
from nebula.guard import Decision, SignRecord, Verdict
from nebula.raft import _core, commands
from nebula.raft.node import CONF_ADD, LEADER, RaftNode
from nebula.raft.storage import RaftLog, SyncJob
from nebula.state.raft import SignStateMachine
from tests.support.memfs import MemFS


def _sign(h: int, sb: bytes = b"") -> bytes:
    rec = SignRecord(h, 0, 2, sb or b"sb-%d" % h, b"sig-%d" % h)
    return commands.encode_command(commands.OP_SIGN, b"chain", rec)


class Net:
    """Nodes in one process; ``deliver`` runs until no message is in flight."""

    def __init__(self, ids: list[int], **kw: Any) -> None:
        self.fs = MemFS()
        self.queue: deque[tuple[int, int, bytes]] = deque()
        self.nodes: dict[int, RaftNode] = {}
        self.down: set[int] = set()
        for i in ids:
            self.nodes[i] = self.make(i, ids, **kw)

    def make(self, i: int, peers: list[int], **kw: Any) -> RaftNode:
        def send(to: int, payload: bytes) -> bool:
            self.queue.append((i, to, payload))
            return True

        kw.setdefault("election_tick", 5 + i)
        kw.setdefault("min_election_tick", kw["election_tick"])
        kw.setdefault("max_election_tick", kw["election_tick"] + 1)
        kw.setdefault("heartbeat_tick", 1)
        return RaftNode(
            i, RaftLog(f"/n{i}", fs=self.fs), SignStateMachine(), send, peers=peers, **kw
        )

    def deliver(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            frm, to, payload = self.queue.popleft()
            if to in self.nodes and to not in self.down and frm not in self.down:
                self.nodes[to].receive(frm, payload)
                self.nodes[to].process()
        raise AssertionError("messages never settled")

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            for i, node in self.nodes.items():
                if i not in self.down:
                    node.tick()
                    node.process()
            self.deliver()

    def leader(self) -> RaftNode:
        for _ in range(200):
            leads = [n for i, n in self.nodes.items() if n.authoritative and i not in self.down]
            if leads:
                return leads[0]
            self.tick()
        raise AssertionError("no leader")


def _collect() -> tuple[list[tuple[Any, BaseException | None]], Callable[[Any, Any], None]]:
    out: list[tuple[Any, BaseException | None]] = []
    return out, lambda r, e: out.append((r, e))


def test_a_one_member_cluster_commits_without_any_tick() -> None:
    net = Net([1])
    node = net.nodes[1]
    node.campaign()
    node.process()
    assert node.authoritative
    got, resolve = _collect()
    for h in range(1, 51):
        node.propose(_sign(h), resolve)
        node.process()  # no tick: the proposal is durable, committed and applied here
    assert len(got) == 50
    assert all(isinstance(r, Decision) and r.verdict is Verdict.ACCEPT for r, e in got)
    assert node.syncs >= 50  # every entry was fdatasync'ed before it was applied


def test_three_members_commit_and_answer_with_the_state_machine_decision() -> None:
    net = Net([1, 2, 3])
    lead = net.leader()
    got, resolve = _collect()
    lead.propose(_sign(5), resolve)
    lead.process()
    net.deliver()
    ((res, err),) = got
    assert err is None and res.verdict is Verdict.ACCEPT
    # The same HRS with other sign bytes: refused by the state machine, not released.
    lead.propose(_sign(5, b"other"), resolve)
    lead.process()
    net.deliver()
    assert got[1][0].verdict is Verdict.REFUSE


def test_followers_refuse_proposals_and_name_the_leader() -> None:
    net = Net([1, 2, 3])
    lead = net.leader()
    follower = next(n for n in net.nodes.values() if n is not lead)
    with pytest.raises(NotLeader, match=f"leader: node {lead.id}"):
        follower.propose(_sign(1), lambda r, e: None)


def test_authority_waits_for_the_first_entry_of_the_term() -> None:
    net = Net([1, 2, 3])
    lead = net.leader()
    # Partition the leader, elect another; the new leader is not authoritative until
    # its own first entry is applied (which needs a majority).
    net.down.add(lead.id)
    new = net.leader()
    assert new is not lead and new.role == LEADER and new.authoritative
    net.down.discard(lead.id)
    net.tick(3)
    assert not lead.authoritative


def test_a_replaced_proposal_releases_nothing() -> None:
    net = Net([1, 2, 3])
    lead = net.leader()
    others = [i for i in net.nodes if i != lead.id]
    got, resolve = _collect()
    net.down.add(lead.id)  # the entry stays in the old leader's log only
    lead.propose(_sign(7), resolve)
    lead.process()
    net.queue.clear()
    new = net.leader()
    assert new.id in others
    new.propose(_sign(8), lambda r, e: None)
    new.process()
    net.deliver()
    net.down.discard(lead.id)
    net.tick(5)  # the old leader rejoins; its entry at that index is replaced
    ((res, err),) = got
    assert res is None and isinstance(err, ReplicationError | NotLeader)
    assert net.nodes[lead.id].applied == new.applied


def test_piggyback_hook_carries_a_follower_context_to_the_leader() -> None:
    """The threshold-BLS hook: a follower attaches data to its append acknowledgement
    (raft-rs messages' context field); the leader reads it on receipt."""
    seen: list[tuple[int, bytes]] = []

    def on_send(to: int, mtype: int, payload: bytes) -> bytes:
        if mtype == _core.MSG_APPEND_RESPONSE:
            return _core.message_with_context(payload, b"share-for-%d" % to)
        return payload

    def on_receive(peer: int, payload: bytes) -> None:
        info = _core.message_info(payload)
        if info[0] == _core.MSG_APPEND_RESPONSE and info[9]:
            seen.append((peer, info[9]))

    net = Net([1, 2, 3], on_send=on_send, on_receive=on_receive)
    lead = net.leader()
    lead.propose(_sign(1), lambda r, e: None)
    lead.process()
    net.deliver()
    assert {p for p, _ in seen} >= {i for i in net.nodes if i != lead.id}
    assert all(ctx == b"share-for-%d" % lead.id for _, ctx in seen)


def test_membership_change_and_a_joining_member_gets_a_snapshot_naming_it() -> None:
    net = Net([1, 2, 3], snapshot_entries=5)
    lead = net.leader()
    for h in range(1, 12):
        lead.propose(_sign(h), lambda r, e: None)
        lead.process()
        net.deliver()
    joined: list[tuple[int, int, bytes, list[int]]] = []
    net.nodes[4] = net.make(4, [], join=True, on_membership=lambda *a: joined.append(a))
    got, resolve = _collect()
    lead.propose_conf_change(CONF_ADD, 4, b"127.0.0.1:9", resolve)
    lead.process()
    net.deliver()
    net.tick(5)
    assert got and got[0][1] is None
    new = net.nodes[4]
    assert new.voters == [1, 2, 3, 4] and new.applied == lead.applied
    assert new.snapshot_index > 1  # learned from a snapshot taken after the change
    sm = new._sm
    assert isinstance(sm, SignStateMachine) and sm.states[b"chain"].height == 11


def test_restart_replays_the_durable_log_into_the_same_state() -> None:
    net = Net([1])
    node = net.nodes[1]
    node.campaign()
    node.process()
    for h in range(1, 8):
        node.propose(_sign(h), lambda r, e: None)
        node.process()
    before = dict(node._sm.states)  # type: ignore[attr-defined]
    node.close()
    again = net.make(1, [1])
    again.process()
    # The commit index is durable only up to the last synced Ready; the rest is learned
    # again once the node leads (a one-member cluster campaigns at once on start).
    again.campaign()
    again.process()
    assert again.authoritative
    assert again._sm.states == before  # type: ignore[attr-defined]


def test_a_sync_failure_fails_the_node_closed() -> None:
    net = Net([1])
    node = net.nodes[1]
    node.campaign()
    node.process()
    got, resolve = _collect()
    net.fs.fail_next("fdatasync")
    node.propose(_sign(1), resolve)
    node.process()
    assert node.fatal is not None and not node.authoritative
    assert got and got[0][0] is None and isinstance(got[0][1], StateError)
    with pytest.raises(StateError):
        node.propose(_sign(2), resolve)


def test_commands_and_snapshot_data_are_versioned_and_strict() -> None:
    rec = SignRecord(3, 1, 2, b"sb", b"sig", b"esb", b"esig")
    data = commands.encode_command(commands.OP_SIGN, b"c", rec)
    assert commands.decode_command(data) == (commands.OP_SIGN, b"c", rec)
    with pytest.raises(StateError, match="version 9"):
        commands.decode_command(bytes([9]) + data[1:])
    with pytest.raises(StateError, match="trailing"):
        commands.decode_command(data + b"x")
    with pytest.raises(StateError):
        commands.decode_command(data[:-1])
    snap = commands.encode_states({b"c": rec}, {4: "10.0.0.4:8080"})
    assert commands.decode_states(snap) == ({b"c": rec}, {4: "10.0.0.4:8080"})
    with pytest.raises(StateError):
        commands.decode_states(snap[:-2])


def test_an_acknowledgement_leaves_after_the_sync_and_before_the_apply() -> None:
    """A follower's append acknowledgement is on the leader's critical path: it leaves as
    soon as the entries are durable, not after the committed entries of the same Ready
    are applied (and never before the sync)."""
    events: dict[int, list[str]] = {}

    def on_send_for(i: int) -> Callable[[int, int, bytes], bytes]:
        def on_send(to: int, mtype: int, payload: bytes) -> bytes:
            if mtype == _core.MSG_APPEND_RESPONSE:
                events[i].append("ack")
            return payload

        return on_send

    net = Net([1, 2, 3])
    for i, node in list(net.nodes.items()):
        events[i] = []
        node._on_send = on_send_for(i)
        sync, apply = node._log.sync, node._sm.apply

        def traced_sync(i: int = i, sync: Callable[[], None] = sync) -> None:
            sync()
            events[i].append("sync")

        def traced_apply(index: int, data: bytes, i: int = i, apply: Any = apply) -> Any:
            events[i].append("apply")
            return apply(index, data)

        node._log.sync = traced_sync  # type: ignore[method-assign]
        node._sm.apply = traced_apply  # type: ignore[method-assign]
    lead = net.leader()
    for h in (1, 2):
        lead.propose(_sign(h), lambda r, e: None)
        lead.process()
        for ev in events.values():
            ev.clear()
        net.deliver()
    # The append of entry 2 carries the commit of entry 1: one Ready with both.
    followers = [i for i in net.nodes if i != lead.id]
    for i in followers:
        ev = events[i]
        assert ev.index("sync") < ev.index("ack") < ev.index("apply"), ev


# -- a leader's sync off the loop thread (RaftStore(sync_off_loop=True)) -------------------


class Offload:
    """Keeps every offloaded sync until the test finishes it (``finish``, ``settle``)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[SyncJob, Callable[[], None]]] = []

    def __call__(self, job: SyncJob, done: Callable[[], None]) -> None:
        self.jobs.append((job, done))

    def finish(self, *, error: OSError | None = None) -> None:
        job, done = self.jobs.pop(0)
        if error is None:
            job.run()
        else:
            job.error = error
        done()

    def settle(self, net: Net) -> None:
        """Deliver every message, finishing each sync as it comes, until all is quiet."""
        net.deliver()
        while self.jobs:
            self.finish()
            net.deliver()


def _offload_net(min_entries: int = 1) -> tuple[Net, RaftNode, Offload]:
    off = Offload()
    net = Net([1, 2, 3], offload=off, offload_min_entries=min_entries)
    lead = net.nodes[1]
    lead.campaign()
    lead.process()
    for _ in range(50):
        off.settle(net)
        if lead.authoritative:
            return net, lead, off
    raise AssertionError("node 1 never led")


def test_an_offloaded_sync_defers_inputs_and_places_proposals_where_it_said() -> None:
    net, lead, off = _offload_net()
    got, resolve = _collect()
    lead.propose(_sign(1), resolve)
    lead.process()
    assert len(off.jobs) == 1 and lead._inflight is not None
    net.deliver()  # the followers append, sync and acknowledge: deferred on the leader
    assert lead._deferred and not got
    # Proposals meanwhile get their (term, index) now and land exactly there.
    t2, i2 = lead.propose(_sign(2), resolve)
    t3, i3 = lead.propose(_sign(3), resolve)
    assert (i2, i3) == (lead.last_index + 1, lead.last_index + 2) and t2 == t3 == lead.term
    lead.process()  # nothing happens while the sync runs
    assert len(off.jobs) == 1 and not got
    off.finish()
    off.settle(net)
    assert [r.verdict for r, e in got] == [Verdict.ACCEPT] * 3 and all(e is None for _, e in got)
    assert [r.record.height for r, _ in got] == [1, 2, 3]
    assert lead.term_at(i2) == t2 and lead.term_at(i3) == t3
    for _ in range(3):  # heartbeats carry the commit index to the followers
        lead.tick()
        lead.process()
        off.settle(net)
    for n in net.nodes.values():
        assert n._sm.states[b"chain"].height == 3  # type: ignore[attr-defined]


def test_a_failed_offloaded_sync_fails_closed_and_releases_nothing() -> None:
    net, lead, off = _offload_net()
    got, resolve = _collect()
    lead.propose(_sign(1), resolve)
    lead.process()
    net.deliver()
    lead.propose(_sign(2), resolve)  # deferred behind the sync
    off.finish(error=OSError(5, "Input/output error"))
    assert lead.fatal is not None and "fdatasync" in lead.fatal
    assert len(got) == 2 and all(r is None and isinstance(e, StateError) for r, e in got)
    with pytest.raises(StateError):
        lead.propose(_sign(3), resolve)


def test_close_with_a_sync_in_flight_drops_its_ready_and_snapshots_wait() -> None:
    net, lead, off = _offload_net()
    got, resolve = _collect()
    lead.propose(_sign(1), resolve)
    lead.process()
    net.queue.clear()  # the appends left before the sync (they vouch for nothing)
    lead.snapshot_now()  # not while the sync runs (it may rewrite the log file)
    assert lead._snapshot_due
    job, done = off.jobs.pop()
    job.run()
    lead.close()
    done()  # late: nothing is sent or applied after close
    assert not net.queue
    assert got and got[0][0] is None and isinstance(got[0][1], ReplicationError)


def test_only_a_ready_of_several_entries_is_offloaded_by_default() -> None:
    net, lead, off = _offload_net(min_entries=2)
    lead.propose(_sign(1), lambda r, e: None)
    lead.process()
    assert not off.jobs and lead._inflight is None  # one entry: synced inline
    lead.propose(_sign(2), lambda r, e: None)
    lead.propose(_sign(3), lambda r, e: None)
    lead.process()
    assert len(off.jobs) == 1


def test_several_messages_to_a_peer_leave_as_one_batch_in_order() -> None:
    """A group commit's appends (one per proposal) and their acknowledgements leave as one
    send_many per peer, in order; a lone message goes through send."""
    calls: list[tuple[int, int, int]] = []  # (from, to, messages)
    net = Net([1, 2, 3])
    for i, n in net.nodes.items():

        def send_many(to: int, ps: list[bytes], i: int = i) -> bool:
            calls.append((i, to, len(ps)))
            for p in ps:
                net.queue.append((i, to, p))
            return True

        n._send_many = send_many
    lead = net.leader()
    calls.clear()
    got, resolve = _collect()
    for h in range(1, 6):
        lead.propose(_sign(h), resolve)
    lead.process()
    assert sorted(to for frm, to, _ in calls if frm == lead.id) == [
        i for i in sorted(net.nodes) if i != lead.id
    ]
    assert all(k == 5 for frm, _to, k in calls if frm == lead.id)  # five appends, one batch
    # A follower steps the whole batch (one socket read), then one Ready: its five
    # acknowledgements go back as one batch too.
    batch, net.queue = list(net.queue), type(net.queue)()
    for f in (i for i in net.nodes if i != lead.id):
        for frm, to, p in batch:
            if to == f:
                net.nodes[f].receive(frm, p)
        net.nodes[f].process()
    assert sorted(k for frm, _to, k in calls if frm != lead.id) == [5, 5]
    net.deliver()
    assert [r.record.height for r, e in got] == [1, 2, 3, 4, 5]


class _Interloper:
    """The raft-rs core, except that every proposal first proposes an extra entry (so a
    deferred proposal lands one index later than the one it was given)."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def propose(self, context: bytes, data: bytes) -> tuple[int, int]:
        self._core.propose(b"", _sign(99, b"interloper"))
        return self._core.propose(context, data)

    def propose_many(self, data: list[bytes]) -> tuple[int, int]:
        self._core.propose(b"", _sign(99, b"interloper"))
        return self._core.propose_many(data)


def test_a_deferred_proposal_placed_elsewhere_resolves_as_lost_and_nothing_else() -> None:
    net, lead, off = _offload_net()
    got, resolve = _collect()
    lead.propose(_sign(1), resolve)
    lead.process()
    term, index = lead.propose(_sign(2), resolve)  # deferred: given index, not placed yet
    lead._core = _Interloper(lead._core)  # type: ignore[assignment]
    off.finish()
    off.settle(net)
    # Entry 1 answered; entry 2 resolved once, as lost; the interloper took its index and
    # was applied there without resolving anybody.
    outcomes = sorted(type(e).__name__ if e else r.verdict.name for r, e in got)
    assert outcomes == ["ACCEPT", "ReplicationError"]
    assert [r.record.height for r, e in got if e is None] == [1]
    assert lead.term_at(index) == term and lead.applied >= index + 1


def _counting_net(ids: list[int]) -> tuple[Net, list[tuple[int, int, int, int]]]:
    """A net whose sends record (from, to, message type, entries in it)."""
    calls: list[tuple[int, int, int, int]] = []
    net = Net(ids)
    for i, n in net.nodes.items():

        def send(to: int, p: bytes, i: int = i) -> bool:
            info = _core.message_info(p)
            calls.append((i, to, info[0], info[8]))
            net.queue.append((i, to, p))
            return True

        n._send = send
    return net, calls


def test_queued_proposals_go_to_raft_as_one_append_per_follower() -> None:
    """Proposals of one loop pass (batch=True) land at the indexes they were given, reach
    each follower in one append, come back in one acknowledgement, and each resolves
    with its own entry's decision."""
    net, calls = _counting_net([1, 2, 3])
    lead = net.leader()
    net.deliver()
    calls.clear()
    got, resolve = _collect()
    last = lead.last_index
    appends_before, entries_before = lead.appends, lead.entries_appended
    given = [lead.propose(_sign(h), resolve, batch=True) for h in range(1, 9)]
    assert [i for _t, i in given] == list(range(last + 1, last + 9))
    assert lead.last_index == last  # queued: nothing in raft-rs yet
    lead.process()
    appends = [c for c in calls if c[0] == lead.id and c[2] == _core.MSG_APPEND]
    assert sorted(to for _f, to, _m, _n in appends) == [i for i in net.nodes if i != lead.id]
    assert all(n == 8 for *_x, n in appends)  # eight entries, one append each
    assert (lead.appends, lead.entries_appended) == (appends_before + 1, entries_before + 8)
    net.deliver()
    acks = [c for c in calls if c[2] == _core.MSG_APPEND_RESPONSE]
    assert len(acks) == 2
    assert [r.record.height for r, e in got] == list(range(1, 9))
    assert all(e is None and r.verdict is Verdict.ACCEPT for r, e in got)
    for (term, index), h in zip(given, range(1, 9), strict=True):
        assert lead.term_at(index) == term
        assert commands.decode_command(lead._log.entries(index, index + 1)[0].data)[2].height == h


def test_a_proposal_after_a_queued_one_is_queued_behind_it() -> None:
    net = Net([1, 2, 3])
    lead = net.leader()
    got, resolve = _collect()
    t1, i1 = lead.propose(_sign(1), resolve, batch=True)
    t2, i2 = lead.propose(_sign(2), resolve)  # not batch, but must not jump the queue
    assert (t2, i2) == (t1, i1 + 1)
    lead.flush_proposals()
    assert lead.last_index == i2
    lead.process()
    net.deliver()
    assert [r.record.height for r, e in got] == [1, 2]


def test_queued_proposals_of_a_deposed_leader_resolve_as_lost_and_release_nothing() -> None:
    net = Net([1, 2, 3])
    lead = net.leader()
    got, resolve = _collect()
    for h in (1, 2, 3):
        lead.propose(_sign(h), resolve, batch=True)
    # Before the flush, a message from a later term deposes it (another member won an
    # election while this one was cut off).
    net.down.add(lead.id)
    new = net.leader()
    net.down.discard(lead.id)
    new.propose(_sign(50), lambda r, e: None)
    new.process()
    for _ in range(50):
        if lead._core.role != LEADER:
            break
        if not net.queue:
            new.tick()
            new.process()
        frm, to, p = net.queue.popleft()
        if to == lead.id:
            lead.receive(frm, p)  # stepped, not processed: the queue is still there
        else:
            net.nodes[to].receive(frm, p)
            net.nodes[to].process()
    assert lead._core.role != LEADER and lead.role == LEADER  # deposed; not processed yet
    lead.process()
    net.deliver()
    assert len(got) == 3
    assert all(r is None and isinstance(e, (ReplicationError, NotLeader)) for r, e in got)
    # None of the three is in anyone's log.
    for n in net.nodes.values():
        for e in n._log.entries(n._log.first_index, n.last_index + 1):
            if e.data:
                assert commands.decode_command(e.data)[2].height not in (1, 2, 3)


def test_the_core_takes_proposals_only_as_leader() -> None:
    """raft-rs would forward a follower's proposal to its leader and report success; the
    binding refuses it instead (there is no index of its own to wait on)."""
    net = Net([1, 2, 3])
    lead = net.leader()
    follower = next(n for n in net.nodes.values() if n is not lead)
    with pytest.raises(_core.ProposalDropped):
        follower._core.propose(b"", _sign(1))
    with pytest.raises(_core.ProposalDropped):
        follower._core.propose_many([_sign(1), _sign(2)])
    with pytest.raises(_core.ProposalDropped):
        follower._core.propose_conf_change(CONF_ADD, 9, b"")
    with pytest.raises(ValueError):
        lead._core.propose_many([])


def _msg(**fields: int) -> bytes:
    """An eraftpb.Message with the given varint fields (msg_type 1, to 2, from 3, term 4,
    log_term 5, index 6, commit 8), encoded by hand: no correct member sends these."""
    numbers = {"msg_type": 1, "to": 2, "frm": 3, "term": 4, "log_term": 5, "index": 6, "commit": 8}
    out = bytearray()
    for name, value in fields.items():
        for v in ((numbers[name] << 3), value):
            while True:
                b, v = v & 0x7F, v >> 7
                out.append(b | (0x80 if v else 0))
                if not v:
                    break
    return bytes(out)


def test_a_heartbeat_that_commits_past_the_log_is_refused_and_the_node_goes_on() -> None:
    """raft-rs panics on a heartbeat whose commit index is past the receiver's log, and a
    panic stops the node for good.  No correct leader sends one (it commits at most what
    the follower acknowledged); a member of another cluster with the same secret and ids,
    or an old incarnation, can.  The core refuses it like any bad message (found in
    review: one such message stopped a node)."""
    net = Net([1, 2, 3])
    lead = net.leader()
    got, resolve = _collect()
    lead.propose(_sign(5), resolve)
    lead.process()
    net.deliver()
    follower = next(n for i, n in net.nodes.items() if n is not lead)
    forged = _msg(msg_type=8, to=follower.id, frm=lead.id, term=follower.term, commit=1000)
    assert _core.message_info(forged)[0] == _core.MSG_HEARTBEAT
    follower.receive(lead.id, forged)
    follower.process()
    assert follower.fatal is None
    assert follower.commit_index < 1000
    # ... and the cluster goes on committing through it.
    net.down.add(next(i for i, n in net.nodes.items() if n is not lead and n is not follower))
    lead.propose(_sign(6), resolve)
    lead.process()
    net.deliver()
    assert [r.verdict for r, _ in got] == [Verdict.ACCEPT, Verdict.ACCEPT]
    assert follower.fatal is None
