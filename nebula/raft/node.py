"""The Ready loop: raft-rs's ``RawNode`` driven the way it is meant to be (design.md §4).

:class:`RaftNode` owns a :class:`nebula.raft._core.Node`, the durable
:class:`~nebula.raft.storage.RaftLog` and a :class:`StateMachine`.  It does no I/O of
its own besides the log: messages leave through the injected ``send`` callable (several to
one peer from one pass - a group commit's appends, their acknowledgements - through
``send_many``: one frame, one write), time
arrives as :meth:`tick` calls, and messages arrive through :meth:`receive`.  The event
loop (``nebula.state.raft``) and the deterministic simulation (``tests/sim``) drive the
same class.

One pass of :meth:`process`, per Ready:

1. send ``messages`` - raft-rs puts only messages there that vouch for nothing unpersisted
   (the leader's appends and heartbeats: its own copy counts only after step 3);
2. a snapshot from the leader: durable, then the state machine restores it;
3. ``entries`` and ``hard_state`` appended to the log and **fdatasync'ed** when raft-rs says
   ``must_sync`` (new entries, or a new term or vote; a hard state whose only change is the
   commit index is neither written nor synced then: it rides with the next write).  One sync per Ready, so everything that arrived together
   shares it: group commit;
4. ``persisted_messages`` (votes, append acknowledgements) leave now, right after the
   sync they vouch for and before the apply below (a follower's acknowledgement is on the
   leader's critical path; applying is not);
5. committed entries applied in order through the state machine; a waiting proposal is
   resolved by its (term, index): the entry at that index must carry that term, otherwise
   the proposal was replaced and resolves as lost (nothing is released, S3);
6. ``advance()``: raft-rs learns the Ready is durable; the LightReady's messages leave and
   its committed entries are applied; ``advance_apply()``.

Queued proposals (``propose(..., batch=True)``).  A proposal can be queued instead of
handed to raft-rs at once; the queue goes to raft-rs as one proposal (raft-rs appends the
entries together, all or none, and sends each follower one append) at the next
:meth:`process` or :meth:`flush_proposals`.  Each queued proposal is told at once the
(term, index) it will get; one that lands anywhere else resolves as lost.  The event loop
queues every decision of one loop pass (several chains at once: group commit).

A leader's sync off the loop (``offload``, ``RaftStore(sync_off_loop=True)``).  When a
leader's Ready carries at least ``offload_min_entries`` entries (several decisions: several
chains at once), step 3's ``fdatasync`` runs on a worker thread and the Ready is finished
(steps 4-6) when it returns; the event loop serves other requests meanwhile.  The sync is
handed over before the Ready's messages are sent (a leader may send its appends before
its own entries are durable; they count for its own vote only once they are), so the
disk works while the appends travel.  The node
takes no input while the sync runs, so raft-rs sees the same sequence of calls as with an
inline sync: messages and ticks that arrive are stepped afterwards in arrival order (to
raft-rs, a network delay); proposals are placed right after the Ready, each at the (term,
index) it was given at once (raft-rs takes no new entry between ``ready()`` and
``advance()``, and nothing else can append meanwhile; a difference resolves that proposal
and the later ones as lost); operator calls (conf change, transfer, campaign) follow them;
a snapshot waits for the Ready.  A failed sync fails the node closed.

Leadership.  A leader is *authoritative* once the first entry of its term (the empty entry
raft-rs appends on election) is applied: every entry committed by earlier leaders is then
in its state machine (S2, S4).  Losing leadership fails every waiting proposal (the entry
may still commit under the next leader; its decision then stands in the state machine and a
retried request gets it from there - no second signature is possible).

Snapshots.  Every ``snapshot_entries`` applied entries, and after every membership change
(raft-rs refuses a snapshot whose conf state does not name the receiver, so a new member
needs one taken after it was added), the state machine's bytes become a snapshot (durable
first), and the log before it is dropped.  A follower too far behind
gets the snapshot from the leader.  The high-water mark lives in the state machine, so the
snapshot carries it (S4).

The piggyback hook (threshold signing): ``on_send(to, msg_type, payload) -> payload`` and
``on_receive(peer, payload)`` see every message; :func:`nebula.raft._core.message_info` and
``message_with_context`` read and set a message's ``context`` field (a follower's signature
share on its append acknowledgement, read by the leader); ``on_append(entries)`` sees the
entries of each Ready as they are written to the log (before the sync that precedes any
acknowledgement of them).

Failure.  Any storage error, a raft-rs panic, or a committed entry the state machine cannot
decode stops the node for good (``fatal``): it then sends nothing and answers nothing -
fail closed; the operator restarts it after fixing the cause.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from nebula.errors import NotLeader, ReplicationError, StateError
from nebula.raft import _core
from nebula.raft.storage import Entry, HardState, RaftLog, Snapshot, SnapshotNotSaved, SyncJob
from nebula.types import Resolver

log = logging.getLogger("nebula.raft")

FOLLOWER, CANDIDATE, LEADER, PRECANDIDATE = 0, 1, 2, 3
ROLE_NAMES = {
    FOLLOWER: "follower",
    CANDIDATE: "candidate",
    LEADER: "leader",
    PRECANDIDATE: "pre-candidate",
}

ENTRY_NORMAL, ENTRY_CONF_CHANGE = 0, 1


class _Stopped(Exception):
    """Unwinds the Ready loop after :meth:`RaftNode.fail` (nothing more may be sent)."""


CONF_ADD, CONF_REMOVE, CONF_ADD_LEARNER = 0, 1, 2


# offload(job, done): run the sync job (job.run(), or an fdatasync of job.os_fd recorded
# with job.ran) on another thread, then call done() on the loop thread.
Offload = Callable[[SyncJob, Callable[[], None]], None]


class StateMachine(Protocol):
    """What the node applies committed entries to (deterministic, no I/O)."""

    def apply(self, index: int, data: bytes) -> Any:
        """Apply one committed normal entry; the return value resolves its proposal."""

    def snapshot_data(self) -> bytes:
        """The whole state, for a snapshot at the last applied index."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's."""


class RaftNode:
    """One member's Raft node (see the module docstring).

    * ``peers``: the voters when the cluster is bootstrapped (ignored once the log holds a
      snapshot); ``join=True``: this node is being added to a running cluster - it starts
      with no conf state and waits for the leader's snapshot.
    * ``election_tick`` / ``heartbeat_tick``: in ticks; ``min/max_election_tick``: the
      randomized election timeout range (0 = raft-rs's ``[e, 2e)``).
    * ``skip_bcast_commit``: followers learn a new commit index from the next append or
      heartbeat instead of an extra message per commit (half the messages; their applied
      state trails the leader's by at most a heartbeat - the leader's state decides).
    * ``snapshot_entries``: applied entries between snapshots.
    * ``on_role``: called with (role, leader_id, term) on every soft-state change;
      ``on_authority``: called with True/False when this node gains/loses authority;
      ``on_membership``: called with (change, node_id, context, voters) after a conf change.
    """

    def __init__(
        self,
        node_id: int,
        log: RaftLog,
        state_machine: StateMachine,
        send: Callable[[int, bytes], bool],
        *,
        send_many: Callable[[int, list[bytes]], bool] | None = None,
        peers: Iterable[int] = (),
        join: bool = False,
        election_tick: int = 10,
        heartbeat_tick: int = 2,
        min_election_tick: int = 0,
        max_election_tick: int = 0,
        pre_vote: bool = True,
        check_quorum: bool = True,
        max_inflight_msgs: int = 256,
        skip_bcast_commit: bool = True,
        snapshot_entries: int = 10_000,
        on_role: Callable[[int, int, int], None] | None = None,
        on_authority: Callable[[bool], None] | None = None,
        on_membership: Callable[[int, int, bytes, list[int]], None] | None = None,
        on_send: Callable[[int, int, bytes], bytes] | None = None,
        on_receive: Callable[[int, bytes], None] | None = None,
        on_append: Callable[[list[tuple[int, int, int, bytes, bytes]]], None] | None = None,
        offload: Offload | None = None,
        offload_min_entries: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = node_id
        self._log = log
        self._sm = state_machine
        self._send = send
        self._send_many = send_many
        self._snapshot_entries = max(2, int(snapshot_entries))
        self._on_role = on_role
        self._on_authority = on_authority
        self._on_membership = on_membership
        self._on_send = on_send
        self._on_receive = on_receive
        self._on_append = on_append
        self._offload = offload
        self._offload_min = max(1, int(offload_min_entries))
        # A leader's sync running off the loop thread: (job, committed, persisted messages)
        # of the Ready it belongs to; inputs wait in _deferred until it is done.
        self._inflight: tuple[SyncJob, list[Any], list[Any]] | None = None
        self._deferred: list[tuple[int, bytes] | None] = []
        # Proposals made meanwhile: (term, index, data, resolve), proposed to raft-rs in
        # order right after that Ready (raft-rs takes no new entry between ready() and
        # advance()); the (term, index) is known in advance: nothing else can append
        # meanwhile.  A waiter joins _pending only once its placement is checked, so no
        # other entry can ever resolve it.
        self._deferred_props: list[tuple[int, int, bytes, Resolver]] = []
        # Other operator calls made meanwhile (conf change, transfer, campaign), after those.
        self._deferred_calls: list[Callable[[], None]] = []
        self._clock = clock
        self._pending: dict[int, tuple[int, Resolver]] = {}
        self._snap_reports: list[tuple[int, bool]] = []
        self.fatal: str | None = None
        self.role = FOLLOWER
        self.leader_id = 0
        self._leader_ready_index = 0  # authority once applied >= this, in _leader_term
        self._leader_term = -1
        self._authoritative = False
        self.syncs = 0
        self.syncs_offloaded = 0  # of those, run off the loop thread
        # Readies that appended entries, and the entries: their ratio is how many
        # decisions share a Raft round (group commit)
        self.appends = 0
        self.entries_appended = 0
        self.applied = 0
        self._snapshot_due = False
        self._pending_hs: HardState | None = None
        self._snapshot_retry_at = 0

        loaded = log.load()
        snap = loaded.snapshot
        hs = loaded.hard_state
        if snap is None and not loaded.entries and hs == HardState(0, 0, 0) and not join:
            voters = tuple(sorted(set(peers)))
            if node_id not in voters:
                raise StateError(
                    f"raft node {node_id}: bootstrapping a cluster whose voters {list(voters)} "
                    "do not include this node (a new member joins with join = true)"
                )
            # Bootstrap: every founding member writes the same snapshot (index 1, term 1,
            # the initial voters, the empty state), so a member added later learns the
            # founding membership from the leader's snapshot.
            snap = Snapshot(1, 1, voters, (), state_machine.snapshot_data())
            log.save_snapshot(snap)
            log.append([], HardState(1, 0, 1))
            log.sync()
            hs = HardState(1, 0, 1)
            loaded = log.load()
        if snap is not None:
            state_machine.restore(snap.data)
            self.applied = snap.index
        self._core = _core.Node(
            node_id,
            election_tick=election_tick,
            heartbeat_tick=heartbeat_tick,
            min_election_tick=min_election_tick,
            max_election_tick=max_election_tick,
            pre_vote=pre_vote,
            check_quorum=check_quorum,
            max_inflight_msgs=max_inflight_msgs,
            skip_bcast_commit=skip_bcast_commit,
            applied=self.applied,
            hard_state=tuple(hs),
            snapshot=None if snap is None else tuple(snap),
            entries=[tuple(e) for e in loaded.entries],
        )
        self._snap_index = 0 if snap is None else snap.index

    # -- inputs ------------------------------------------------------------------------

    def tick(self) -> None:
        if self.fatal is None:
            if self._inflight is not None:
                self._deferred.append(None)
                return
            self._core.tick()

    def receive(self, peer: int, payload: bytes) -> None:
        """A message from ``peer`` (authenticated by the transport)."""
        if self.fatal is not None:
            return
        if self._inflight is not None:
            # Stepped once the sync in flight is done, in arrival order (to raft-rs
            # that is only a network delay).
            self._deferred.append((peer, payload))
            return
        if self._on_receive is not None:
            self._on_receive(peer, payload)
        try:
            self._core.step_from(peer, payload)
        except _core.RaftError as e:
            # A message from a removed member, a stale response, or a malformed one: raft-rs
            # refuses it without changing state.
            log.debug("raft node %d: message from %d ignored: %s", self.id, peer, e)
        except BaseException as e:  # a raft-rs panic: fail closed, as process() does
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            self.fail(f"raft node {self.id} stopped: {type(e).__name__}: {e}")

    def propose(self, data: bytes, resolve: Resolver, *, batch: bool = False) -> tuple[int, int]:
        """Propose ``data``; ``resolve`` gets the state machine's result once the entry is
        applied, or an exception when the outcome is lost.  Returns (term, index).

        ``batch``: queue it instead, with the proposals queued before it; they go to
        raft-rs as one proposal (one append per follower, one acknowledgement back) at the
        next :meth:`flush_proposals` or :meth:`process`.  The (term, index) returned is
        where it will land; a proposal that lands anywhere else resolves as lost.  While
        a sync runs off the loop, or while proposals are queued, every proposal is queued.
        """
        self._check_leader()
        if self._inflight is not None or batch or self._deferred_props:
            core = self._core
            if core.lead_transferee is not None:  # raft-rs would drop it now
                raise NotLeader(f"raft node {self.id}: proposal dropped (leadership transfer)")
            term = core.term
            index = core.last_index + 1 + len(self._deferred_props)
            self._deferred_props.append((term, index, data, resolve))
            return term, index
        try:
            term, index = self._core.propose(b"", data)
        except _core.ProposalDropped:
            raise NotLeader(
                f"raft node {self.id}: proposal dropped (leadership changing)"
            ) from None
        self._pending[index] = (term, resolve)
        return term, index

    def flush_proposals(self) -> None:
        """Hand the queued proposals to raft-rs (one proposal) unless a sync runs off the
        loop (they go right after it then); :meth:`process` does this first too."""
        if self._deferred_props and self._inflight is None and self.fatal is None:
            self._guarded(self._propose_deferred)

    def propose_conf_change(
        self, change: int, node_id: int, context: bytes, resolve: Resolver
    ) -> tuple[int, int]:
        """Like :meth:`propose`; while a sync runs off the loop it is proposed after it,
        and (term, 0) is returned (a refusal then reaches ``resolve``)."""
        self._check_leader()
        self.flush_proposals()  # queued ones first: they were promised their indexes
        if self._inflight is not None:

            def later() -> None:
                try:
                    self.propose_conf_change(change, node_id, context, resolve)
                except (NotLeader, StateError) as e:
                    resolve(None, e)

            self._deferred_calls.append(later)
            return self._core.term, 0
        try:
            term, index = self._core.propose_conf_change(change, node_id, context)
        except _core.ProposalDropped:
            raise NotLeader(f"raft node {self.id}: conf change dropped") from None
        self._pending[index] = (term, resolve)
        return term, index

    def transfer_leader(self, to: int) -> None:
        self._check_leader()
        self.flush_proposals()
        if self._inflight is not None:
            self._deferred_calls.append(lambda: self._core.transfer_leader(to))
            return
        self._core.transfer_leader(to)

    def campaign(self) -> None:
        if self.fatal is None and self.id in self._core.voters:
            if self._inflight is not None:
                self._deferred_calls.append(self._core.campaign)
                return
            self._core.campaign()

    def _check_leader(self) -> None:
        if self.fatal is not None:
            raise StateError(self.fatal)
        if self.role != LEADER:
            leader = self.leader_id
            raise NotLeader(
                f"node {self.id} is not the Raft leader"
                + (f" (leader: node {leader})" if leader else " (no leader)")
            )

    # -- the Ready loop ----------------------------------------------------------------

    def process(self) -> None:
        """Handle every Ready raft-rs has (call after any input); queued proposals first."""
        if self.fatal is not None or self._inflight is not None:
            return
        self._guarded(self._process)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except _Stopped:
            pass
        except BaseException as e:  # includes pyo3's PanicException
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
            self.fail(f"raft node {self.id} stopped: {type(e).__name__}: {e}")

    def _process(self) -> None:
        core = self._core
        while True:
            if self._inflight is not None:
                return  # the rest runs when the sync is done (_synced)
            if self._deferred_props:
                self._propose_deferred()
            rd = core.ready()
            if rd is None:
                break
            _number, ss, hs, snap, entries, msgs, committed, pmsgs, must_sync = rd
            if ss is not None:
                self._soft_state(ss[0], ss[1])
            # A leader's sync that runs off the loop starts before its messages go out
            # (raft-rs lets a leader send before persisting): the sync thread takes a core
            # while the followers are still idle, and the disk works while the appends
            # travel.
            offload = (
                must_sync
                and self._offload is not None
                and self.role == LEADER
                and len(entries) >= self._offload_min
            )
            if msgs and not offload:
                self._transmit(msgs)
            if snap is not None:
                s = Snapshot(snap[0], snap[1], tuple(snap[2]), tuple(snap[3]), snap[4])
                self._log.apply_snapshot(s)
                self._pending_hs = None
                self._sm.restore(s.data)
                self._snap_index = s.index
                self.applied = s.index
                self._fail_pending_up_to(s.index)
            if entries or must_sync:
                if hs is None:
                    hs_out, self._pending_hs = self._pending_hs, None
                else:
                    hs_out, self._pending_hs = HardState(*hs), None
                if hs_out is not None:
                    # A snapshot (after a conf change) may have moved the log's commit
                    # past a deferred hard state: the commit index never goes back.
                    floor = self._log.hard_state.commit
                    if hs_out.commit < floor:
                        hs_out = hs_out._replace(commit=floor)
                self._log.append([Entry(*e) for e in entries], hs_out)
                if entries:
                    self.appends += 1
                    self.entries_appended += len(entries)
                if entries and self._on_append is not None:
                    self._on_append(entries)
            elif hs is not None:
                # Only the commit index moved: no write now, it rides with the next one
                # (a commit index lost in a crash is learned again from the leader).
                self._pending_hs = HardState(*hs)
            if must_sync:  # raft-rs: new entries, or a new term or vote
                if offload:
                    job = self._log.sync_job()
                    if job is not None:
                        # Off the loop thread: the loop serves other work (other chains'
                        # requests, which propose into the next Ready) meanwhile.
                        self._inflight = (job, committed, pmsgs)
                        self._offload(job, self._on_synced)
                        if msgs:
                            self._transmit(msgs)
                        return
                if offload and msgs:
                    self._transmit(msgs)
                self._log.sync()
                self.syncs += 1
            self._finish(committed, pmsgs)
        self._after_readies()

    def _finish(self, committed: list[Any], pmsgs: list[Any]) -> None:
        """The rest of a Ready once it is durable."""
        core = self._core
        if pmsgs:
            # Votes and append acknowledgements vouch only for what is durable now;
            # they leave before the committed entries are applied, which a
            # follower's acknowledgement (on the leader's critical path) never
            # waits for.
            self._transmit(pmsgs)
        if committed:
            self._apply(committed)
        _commit, lmsgs, lcommitted = core.advance()
        if lmsgs:
            self._transmit(lmsgs)
        if lcommitted:
            self._apply(lcommitted)
        core.advance_apply()
        if self._snap_reports:
            for to, ok in self._snap_reports:
                core.report_snapshot(to, ok)
            self._snap_reports.clear()

    def _on_synced(self) -> None:
        """The offloaded sync is done (loop thread): finish its Ready, then step what
        arrived meanwhile, then go on with the next Ready."""
        inflight, self._inflight = self._inflight, None
        if inflight is None or self.fatal is not None:
            return
        job, committed, pmsgs = inflight

        def resume() -> None:
            self._log.sync_done(job)  # StateError if the sync failed: fail closed
            self.syncs += 1
            self.syncs_offloaded += 1
            self._finish(committed, pmsgs)
            self._propose_deferred()
            calls, self._deferred_calls = self._deferred_calls, []
            for call in calls:
                if self.fatal is not None:
                    return
                call()
            deferred, self._deferred = self._deferred, []
            for item in deferred:
                if self.fatal is not None:
                    return
                if item is None:
                    self._core.tick()
                else:
                    self.receive(*item)
            self._process()

        self._guarded(resume)

    def _propose_deferred(self) -> None:
        """Propose the queued proposals (those that arrived during an offloaded sync, first
        thing after its Ready, or those of one loop pass) as one raft-rs proposal: each
        lands at the (term, index) its caller was given - checked before its waiter is
        registered; a proposal that landed anywhere else resolves as lost (its entry may
        still commit: its decision then stands in the state machine, and nothing was
        released for it, S3)."""
        props, self._deferred_props = self._deferred_props, []
        if not props:
            return
        try:
            got = self._core.propose_many([p[2] for p in props])
        except _core.ProposalDropped:
            got = None
        lost: list[tuple[int, int, Resolver]] = []
        for k, (term, index, _data, resolve) in enumerate(props):
            if got is not None and (term, index) == (got[0], got[1] + k):
                self._pending[index] = (term, resolve)
            else:
                lost.append((term, index, resolve))
        if lost:
            log.warning(
                "raft node %d: %d queued proposal(s) went to %s, not where promised (%d, %d)",
                self.id,
                len(lost),
                got,
                lost[0][0],
                lost[0][1],
            )
            for _t, i, waiter in lost:
                waiter(None, ReplicationError(f"raft proposal for index {i} was not placed there"))

    def _after_readies(self) -> None:
        self._check_authority()
        if (
            self.applied > self._snap_index
            and (self._snapshot_due or self.applied - self._snap_index >= self._snapshot_entries)
            and self.applied >= self._snapshot_retry_at
        ):
            self._snapshot_due = False
            try:
                self._take_snapshot()
            except SnapshotNotSaved:
                # A transient error (EMFILE, ENOSPC) before anything changed on disk: the
                # log holds every entry still; try again after some more entries.
                self._snapshot_retry_at = self.applied + max(1, self._snapshot_entries // 10)

    def _transmit(self, msgs: list[tuple[int, int, bytes]]) -> None:
        on_send = self._on_send
        send_many = self._send_many
        if send_many is None or len(msgs) < 2:
            for to, mtype, payload in msgs:
                if on_send is not None:
                    payload = on_send(to, mtype, payload)
                ok = self._send(to, payload)
                if mtype == _core.MSG_SNAPSHOT:
                    self._snap_reports.append((to, ok))
            return
        # Several messages (one append per proposal of a group commit, and their
        # acknowledgements): one frame and one write per peer, in order.
        groups: dict[int, list[bytes]] = {}
        for to, mtype, payload in msgs:
            if on_send is not None:
                payload = on_send(to, mtype, payload)
            if mtype == _core.MSG_SNAPSHOT:
                before = groups.pop(to, None)
                if before:
                    send_many(to, before)
                self._snap_reports.append((to, self._send(to, payload)))
                continue
            group = groups.get(to)
            if group is None:
                groups[to] = [payload]
            else:
                group.append(payload)
        for to, payloads in groups.items():
            if len(payloads) == 1:
                self._send(to, payloads[0])
            else:
                send_many(to, payloads)

    def _apply(self, entries: list[tuple[int, int, int, bytes, bytes]]) -> None:
        pending = self._pending
        removed = False
        for index, term, etype, data, _ctx in entries:
            if index <= self.applied:
                continue  # already in the state machine (a snapshot covered it)
            result: Any = None
            if etype == ENTRY_NORMAL:
                if data:
                    try:
                        result = self._sm.apply(index, data)
                    except StateError:
                        raise
                    except Exception as e:
                        raise StateError(
                            f"raft node {self.id}: committed entry {index} cannot be applied: {e}"
                        ) from e
            elif etype == ENTRY_CONF_CHANGE:
                if data:
                    change, node_id, context, voters, _learners = self._core.apply_conf_change(data)
                    result = (change, node_id, voters)
                    if voters and self.id not in voters:
                        # This member was removed (possibly while it led: raft-rs 0.7
                        # would keep such a leader in place, dropping every proposal).
                        removed = True
                    # raft-rs refuses a snapshot whose conf state does not name the
                    # receiver: snapshot now, so a member just added gets one with itself.
                    self._snapshot_due = True
                    if self._on_membership is not None:
                        self._on_membership(change, node_id, context, voters)
            else:
                raise StateError(f"raft node {self.id}: unsupported entry type {etype} at {index}")
            self.applied = index
            waiter = pending.pop(index, None) if pending else None
            if waiter is not None:
                wterm, resolve = waiter
                if wterm != term:
                    resolve(
                        None,
                        ReplicationError(
                            f"raft proposal at index {index} was replaced (term {wterm} -> {term})"
                        ),
                    )
                else:
                    resolve(result, None)
        if removed:
            self.fail(
                f"raft node {self.id} was removed from the cluster; it takes no further "
                "part (start it again with join = true and an empty data directory to re-add it)"
            )
            raise _Stopped

    def _fail_pending_up_to(self, index: int) -> None:
        for i in [i for i in self._pending if i <= index]:
            _, resolve = self._pending.pop(i)
            resolve(None, ReplicationError("raft proposal outcome unknown (snapshot installed)"))

    def fail_pending(self, exc: BaseException) -> None:
        """Resolve every waiting proposal with ``exc`` (nothing is released); the ones
        still waiting for an offloaded sync are not proposed any more."""
        pending, self._pending = self._pending, {}
        props, self._deferred_props = self._deferred_props, []
        for _, resolve in pending.values():
            resolve(None, exc)
        for *_, resolve in props:
            resolve(None, exc)

    def _soft_state(self, leader_id: int, role: int) -> None:
        was = self.role
        self.role = role
        self.leader_id = leader_id
        term = self._core.term
        if role == LEADER and was != LEADER:
            # The empty entry raft-rs appended on election is the last one now.
            self._leader_ready_index = self._core.last_index
            self._leader_term = term
            log.info("raft node %d won the election (term %d)", self.id, term)
        elif was == LEADER and role != LEADER:
            log.info(
                "raft node %d stepped down (term %d, leader now %s)",
                self.id,
                term,
                leader_id or "none",
            )
            self.fail_pending(NotLeader(f"node {self.id} lost Raft leadership"))
        if self._on_role is not None:
            self._on_role(role, leader_id, term)

    def _check_authority(self) -> None:
        auth = self.authoritative
        if auth != self._authoritative:
            self._authoritative = auth
            log.info(
                "raft node %d %s (term %d)",
                self.id,
                "is the leader" if auth else "is no longer the leader",
                self._core.term,
            )
            if self._on_authority is not None:
                self._on_authority(auth)

    @property
    def authoritative(self) -> bool:
        """Leader of the current term with the first entry of its term applied."""
        return (
            self.fatal is None
            and self.role == LEADER
            and self._core.role == LEADER
            and self._leader_term == self._core.term
            and self.applied >= self._leader_ready_index
        )

    def _take_snapshot(self) -> None:
        index = self.applied
        data = self._sm.snapshot_data()
        term = self._core.term_at(index)
        if term is None:
            raise StateError(f"raft node {self.id}: no term for applied index {index}")
        # Durable first; only then does the in-memory log drop what the snapshot covers.
        self._log.save_snapshot(
            Snapshot(index, term, tuple(self._core.voters), tuple(self._core.learners), data)
        )
        self._core.compact(index, data)
        self._snap_index = index

    def snapshot_now(self) -> None:
        """Take a snapshot at the applied index now (operator ``compact``)."""
        if self.fatal is not None:
            raise StateError(self.fatal)
        if self._inflight is not None:
            # Not while a sync runs off the loop (the snapshot may rewrite the log file):
            # it is taken right after that sync's Ready.
            self._snapshot_due = True
            return
        if self.applied > self._snap_index:
            try:
                self._take_snapshot()
            except SnapshotNotSaved:
                raise  # nothing changed; the log is usable and the node goes on
            except BaseException as e:
                self.fail(f"raft node {self.id} stopped: snapshot failed: {e}")
                raise StateError(self.fatal or str(e)) from e

    def fail(self, reason: str) -> None:
        """Stop for good (fail closed)."""
        if self.fatal is None:
            self.fatal = reason
            log.error("%s; this node no longer takes part in the cluster", reason)
            self.role = FOLLOWER
            self.fail_pending(StateError(reason))
            self._check_authority()

    def close(self) -> None:
        """Resolve every waiting proposal as lost and close the log.  With an offloaded
        sync, call it once that sync has ended (its Ready is then dropped unfinished:
        nothing of it is sent or applied)."""
        self._inflight = None
        self._deferred.clear()
        self._deferred_calls.clear()
        self.fail_pending(ReplicationError(f"raft node {self.id} closed"))
        if self._pending_hs is not None and self.fatal is None:
            try:
                self._log.append([], self._pending_hs)
                self._log.sync()
            except (StateError, ValueError) as e:
                log.warning("raft node %d: last commit index not saved: %s", self.id, e)
        self._pending_hs = None
        self._log.close()

    # -- introspection -----------------------------------------------------------------

    @property
    def term(self) -> int:
        return self._core.term

    @property
    def commit_index(self) -> int:
        return self._core.commit_index

    @property
    def last_index(self) -> int:
        return self._core.last_index

    @property
    def snapshot_index(self) -> int:
        return self._snap_index

    @property
    def voters(self) -> list[int]:
        return list(self._core.voters)

    @property
    def lead_transferee(self) -> int | None:
        return self._core.lead_transferee

    def progress(self) -> Mapping[int, tuple[int, int, int, bool]]:
        """On the leader: {id: (matched, next_index, state, recent_active)}."""
        return self._core.progress()

    def term_at(self, index: int) -> int | None:
        return self._core.term_at(index)
