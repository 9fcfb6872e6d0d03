"""Deterministic simulation of a Nebula Raft cluster (issue 11, design.md §4).

N :class:`~nebula.raft.node.RaftNode` members run in one process over the real raft-rs
core, the real durable log (:class:`~nebula.raft.storage.RaftLog`, each member on its own
:class:`~tests.support.memfs.MemFS`) and the real sign state machine
(:class:`~nebula.state.raft.SignStateMachine`).  Everything else is simulated and driven by
one ``random.Random(seed)``:

* **a fake clock** (integer units; a member ticks every ``TICK`` units, jittered) and a
  discrete-event queue: ``(time, seq)`` orders events, so a run is a pure function of the
  seed (raft-rs's own randomized election timeout is pinned: ``min = e, max = e + 1``, a
  different ``e`` per member and incarnation, drawn from the seed);
* **the network**: every message gets a random latency (so messages reorder), may be
  dropped, duplicated, delayed, or **held** for a long time and delivered much later (the
  stale frame that made pysyncobj drop a committed entry); partitions (symmetric or one
  way) drop what crosses them; a paused member's messages wait in its socket buffer and
  arrive together, stale, when it resumes;
* **faults**: crash a member (a power loss: :meth:`MemFS.crash` with a random mode - the
  unsynced writes dropped, kept, cut to a prefix or torn page by page), crash it *inside* a
  Ready (a MemFS crash point on one of its next file operations), an I/O error on its next
  ``fdatasync``/``pwrite``/``fsync`` (it fails closed), restart it later from its MemFS,
  pause/resume it, partition/heal, transfer leadership, force a campaign; membership
  changes on the leader (``nebula cluster add``: a new machine started with
  ``join=True`` and added as a voter; with ``removals``, ``cluster remove`` of a voter
  other than the leader, the removed machine then stopped);
* **a leader's sync off the loop** (odd seeds; ``RaftStore(sync_off_loop=True)``): the
  ``fdatasync`` of a leader's Ready runs 0..4 units later as an event of its own, while
  messages, ticks and proposals keep arriving (deferred by the node); a power loss
  meanwhile loses what it would have made durable;
* **clients** propose SIGN commands for a small space of (chain, height, round, step) with
  sign bytes unique to each attempt, so a second decision at one HRS is a conflict the
  guard must refuse; some retry an earlier attempt with identical bytes.

A proposal is **released** when its resolve callback (on the member that proposed it) gets
an accepting :class:`~nebula.guard.Decision` (ACCEPT, or SAME/SAME_TIMESTAMP: the stored
signature): that is the signature a validator would receive.

Invariants checked on every seed (:class:`Violation` names the seed and a replay command):

1. at most one released signature per (chain, height, round, step): two releases there
   must carry the same sign bytes;
2. every released decision is in the state of every leader of a later term once it is
   authoritative (checked when a member gains authority and at every release): its
   record for the chain has a higher HRS, or the same HRS and the same sign bytes;
3. committed prefixes agree: the (index, term, data) every member applies, and the state
   after each applied index, equal what every other member applied there; a snapshot a
   member restores equals the state the others had at that index; within one
   incarnation a member's high-water mark never moves down;
4. no member fails (``fatal``), panics, refuses its own log at restart or raises from
   ``tick``/``receive``/``propose``, except through an injected storage fault (a crash
   point or an injected I/O error);
5. liveness after the storm: every partition healed, every member resumed and
   restarted, the network reliable: within the calm phase a leader is authoritative, a
   new decision commits and is released, and every voter applies it.

Run one seed verbosely: ``python -m tests.sim.harness --seed 42 --nodes 5 --trace``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import heapq
import json
import logging
import random
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nebula.errors import NebulaError, NotLeader, StateError
from nebula.guard import Decision, SignRecord, Verdict
from nebula.raft import _core, commands
from nebula.raft.node import CONF_ADD, CONF_REMOVE, LEADER, RaftNode
from nebula.raft.storage import RaftLog, SyncJob
from nebula.state.raft import SignStateMachine
from tests.support.memfs import CrashPoint, MemFS

TICK = 10  # clock units between two ticks of a member (jittered by +-2)
HEARTBEAT_TICK = 2
CHAINS = (b"sim-a", b"sim-b")
CRASH_MODES = ("drop", "prefix", "pages", "keep")
LIVENESS_CHAIN = CHAINS[0]
LIVENESS_HEIGHT = 10**9

# Event kinds (ints: the queue holds plain tuples).
_TICK, _DELIVER, _PROCESS, _PROPOSE, _FAULT, _RESTART, _END_STORM, _LIVENESS, _SYNC_DONE = range(9)


class Violation(AssertionError):
    """An invariant failed; the message names the seed, the replay command and the trace."""


@dataclass(frozen=True)
class Profile:
    """The shape of one run; :func:`draw_profile` picks the fault rates from the seed."""

    nodes: int = 3
    storm: int = 1500  # clock units with faults
    calm: int = 1500  # clock units of the calm phase (invariant 5)
    latency: int = 6  # a message takes 1..latency units
    p_drop: float = 0.05
    p_dup: float = 0.05
    p_delay: float = 0.05  # + 10..30 ticks
    p_hold: float = 0.01  # + 50..300 ticks: the stale frame
    fault_every: int = 150  # mean units between faults (0: no faults)
    propose_every: int = 25  # mean units between client proposals
    snapshot_entries: int = 8
    prealloc: int = 0
    election_ticks: tuple[int, int] = (8, 14)
    # Membership changes remove voters too, not only add them (off by default: a leader
    # that applies its own removal panics or blocks the cluster, test_bug_removed_leader).
    removals: bool = False


def draw_profile(
    rng: random.Random, nodes: int, *, long: bool = False, removals: bool = False
) -> Profile:
    """Fault rates for one seed: some seeds calm, some a storm (from the seed's rng)."""
    scale = 5 if long else 1
    return Profile(
        nodes=nodes,
        storm=rng.choice((800, 1200, 1600, 2400)) * scale,
        calm=1500,
        latency=rng.choice((2, 4, 8)),
        p_drop=rng.choice((0.0, 0.02, 0.1, 0.25)),
        p_dup=rng.choice((0.0, 0.02, 0.1)),
        p_delay=rng.choice((0.0, 0.03, 0.15)),
        p_hold=rng.choice((0.0, 0.005, 0.02, 0.05)),
        fault_every=rng.choice((0, 60, 120, 250)),
        propose_every=rng.choice((8, 20, 50)),
        snapshot_entries=rng.choice((2, 3, 5, 8, 13, 20)),
        prealloc=rng.choice((0, 0, 4096)),
        removals=removals,
    )


class RecordingStateMachine(SignStateMachine):
    """The real state machine, reporting every apply and restore to the simulation."""

    def __init__(self, sim: Simulation, member: Member) -> None:
        super().__init__()
        self._sim = sim
        self._member = member
        self.node: RaftNode | None = None
        self.log: RaftLog | None = None

    def apply(self, index: int, data: bytes) -> Any:
        result = super().apply(index, data)
        self._sim._on_apply(self._member, self, index, data)
        return result

    def restore(self, data: bytes) -> None:
        before = dict(self.states)
        super().restore(data)
        self._sim._on_restore(self._member, self, before)


StateMachineFactory = Callable[["Simulation", "Member"], RecordingStateMachine]
LogFactory = Callable[[str, MemFS, Profile], RaftLog]


def default_log(path: str, fs: MemFS, profile: Profile) -> RaftLog:
    return RaftLog(path, fs=fs, segment_prealloc=profile.prealloc)


class Member:
    """One machine: its MemFS (survives crashes) and the current incarnation of its node."""

    __slots__ = (
        "backlog",
        "dirty",
        "fs",
        "id",
        "incarnation",
        "joiner",
        "node",
        "paused",
        "removed",
        "sm",
    )

    def __init__(self, node_id: int, fs: MemFS, *, joiner: bool = False) -> None:
        self.id = node_id
        # Added to the running cluster (``join=True``): not a voter until the leader says so.
        self.joiner = joiner
        self.removed = False  # removed from the cluster and decommissioned
        self.fs = fs
        self.node: RaftNode | None = None
        self.sm: RecordingStateMachine | None = None
        self.incarnation = 0
        self.paused = False
        self.backlog: list[tuple[int, bytes]] = []
        self.dirty = False


class Simulation:
    """One seeded run (see the module docstring).  :meth:`run` returns the stats and the
    trace hash, or raises :class:`Violation`."""

    def __init__(
        self,
        seed: int,
        profile: Profile | None = None,
        *,
        nodes: int = 3,
        long: bool = False,
        removals: bool = False,
        state_machine: StateMachineFactory = RecordingStateMachine,
        log_factory: LogFactory = default_log,
        fs_factory: Callable[[], MemFS] = MemFS,
        node_factory: Callable[..., RaftNode] = RaftNode,
        offload: bool | None = None,
        trace: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        # Whether a client proposal is queued (propose(batch=True), as the event loop
        # does: it reaches raft-rs at the member's next process event, with whatever else
        # was queued meanwhile) or handed to raft-rs at once: its own stream, so every
        # other draw of a seed stays what it was.
        self._batch_rng = random.Random(seed ^ 0x5EED_BA7C)
        # Drawn seeds: odd ones offload the leader's sync; a scripted profile: off unless asked.
        self.offload = (seed % 2 == 1 and profile is None) if offload is None else offload
        if profile is None:
            profile = draw_profile(self.rng, nodes, long=long, removals=removals)
        self.profile = profile
        self.long = long
        self._make_sm = state_machine
        self._make_log = log_factory
        self._make_node = node_factory
        self.now = 0
        self._seq = 0
        self._queue: list[tuple[int, int, int, Any, Any, Any]] = []
        self._hash = hashlib.blake2b(digest_size=16)
        self._recent: collections.deque[tuple] = collections.deque(maxlen=80)
        self._print_trace = trace
        self._make_fs = fs_factory
        self.members = {i: Member(i, fs_factory()) for i in range(1, self.profile.nodes + 1)}
        self.ids = tuple(self.members)  # the founding members
        # network state
        self._cut: set[tuple[int, int]] = set()  # (src, dst) pairs that drop messages
        self.storm = True
        # A scripted scenario's filter: a message it accepts is kept in ``held``.
        self.hold: Callable[[int, int, bytes], bool] | None = None
        self.held: list[tuple[int, int, bytes]] = []
        # client state
        self._attempt = 0
        self._top = {c: 1 for c in CHAINS}
        self._history: list[tuple[bytes, SignRecord]] = []
        # invariants
        self.released: dict[tuple[bytes, int, int, int], bytes] = {}
        self.releases: list[tuple[int, bytes, SignRecord, int]] = []  # (term, chain, rec, node)
        self.entry_at: dict[int, tuple[int, bytes]] = {}
        self.state_at: dict[int, tuple] = {}
        self._liveness: SignRecord | None = None
        self._liveness_released = False
        self.stats: collections.Counter[str] = collections.Counter()
        self.violation: Violation | None = None
        self._done = False

    # -- the event queue ---------------------------------------------------------------

    def _at(self, t: int, kind: int, a: Any = None, b: Any = None, c: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, kind, a, b, c))

    def _note(self, *event: Any) -> None:
        self._recent.append((self.now, *event))
        self._hash.update(repr(event).encode())
        if self._print_trace:
            print(self.now, *event)

    def fail(self, what: str) -> None:
        """Raise :class:`Violation`.  Raised inside a node's callback (apply, resolve,
        on_authority) it is caught by the node's fail-closed handler, so the first one is
        kept and raised again once the call into the node returns (:meth:`_guard`)."""
        if self.violation is None:
            self.violation = Violation(self._report(what))
        raise self.violation

    def _report(self, what: str) -> str:
        p = self.profile
        lines = [
            f"simulation invariant violated: {what}",
            f"seed {self.seed}, {p.nodes} nodes{' (long mode)' if self.long else ''}, at t={self.now}",
            f"profile: {p}",
            "replay: " + replay_command(self.seed, p.nodes, self.long, p.removals),
            "last events (t, what, ...):",
        ]
        lines += [f"  {e!r}"[:300] for e in self._recent]
        for m in self.members.values():
            n = m.node
            if n is None:
                lines.append(f"  node {m.id}: down")
            else:
                lines.append(
                    f"  node {m.id}: role {n.role} term {n.term} leader {n.leader_id} "
                    f"commit {n.commit_index} applied {n.applied} last {n.last_index} "
                    f"snap {n.snapshot_index} fatal {n.fatal!r} paused {m.paused} "
                    f"states {m.sm.states if m.sm else None}"
                )
        return "\n".join(lines)

    # -- running -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """The whole run: storm, calm, final checks.  Returns the trace hash and stats."""
        p = self.profile
        self.start()
        self._at(p.storm, _END_STORM)
        self._at(p.storm + p.calm // 3, _LIVENESS)
        self.run_until(p.storm + p.calm)
        self._final_checks()
        return self.result()

    def result(self) -> dict[str, Any]:
        self.stats["events"] = self._seq
        return {"trace": self._hash.hexdigest(), "stats": dict(self.stats)}

    def start(self) -> None:
        """Start every member; schedule faults and client proposals if the profile has
        them (a scripted scenario drives the rest itself)."""
        p = self.profile
        for m in self.members.values():
            if p.fault_every and self.rng.random() < 0.05:
                m.fs.crash_at = self.rng.randint(0, 12)  # a power loss while bootstrapping
            self._start(m)
        if p.fault_every:
            self._at(self._exp(p.fault_every), _FAULT)
        if p.propose_every:
            self._at(self._exp(p.propose_every), _PROPOSE)

    def run_until(self, end: int, until: Callable[[], bool] | None = None) -> bool:
        """Run events up to time ``end``, or until ``until()`` holds after an event
        (then True)."""
        p = self.profile
        queue = self._queue
        pop = heapq.heappop
        while queue and not self._done and queue[0][0] <= end:
            t, _seq, kind, a, b, c = pop(queue)
            self.now = t
            if kind == _DELIVER:
                self._deliver(a, b, c)
            elif kind == _TICK:
                self._tick(a, b)
            elif kind == _PROCESS:
                self._process_event(a, b)
            elif kind == _PROPOSE:
                self._propose_event()
            elif kind == _FAULT:
                if self.storm:
                    self._fault()
                    self._at(t + self._exp(p.fault_every), _FAULT)
            elif kind == _RESTART:
                self._restart(a, b)
            elif kind == _END_STORM:
                self._end_storm()
            elif kind == _LIVENESS:
                self._liveness_probe()
            elif kind == _SYNC_DONE:
                self._sync_done(a, b, c)
            if until is not None and until():
                return True
        if not self._done:
            self.now = max(self.now, end)
        return False

    # -- scripted scenarios ------------------------------------------------------------

    def leader(self) -> Member | None:
        """The authoritative leader of the highest term, if any."""
        best = None
        for m in self.members.values():
            n = m.node
            if n is not None and not m.paused and n.authoritative:
                if best is None or n.term > best.node.term:  # type: ignore[union-attr]
                    best = m
        return best

    def propose(self, node_id: int, chain: bytes, rec: SignRecord) -> tuple[int, int] | None:
        """A client asks ``node_id`` to decide ``rec``: the entry's (term, index), or None
        (refused: not the leader)."""
        return self._propose(self.members[node_id], chain, rec)

    def kick(self, node_id: int) -> None:
        """Process ``node_id``'s Ready now (after a scripted call into its node)."""
        self._kick(self.members[node_id])

    def deliver_now(self, src: int, dst: int, payload: bytes) -> None:
        self._at(self.now, _DELIVER, src, dst, payload)

    def isolate(self, node_id: int) -> None:
        """Cut every link to and from ``node_id`` (added to any cut already in place)."""
        for other in self.members:
            if other != node_id:
                self._cut |= {(node_id, other), (other, node_id)}
        self._note("isolate", node_id)

    def cut(self, src: int, dst: int) -> None:
        """Drop every message from ``src`` to ``dst`` (one way) until :meth:`heal`."""
        self._cut.add((src, dst))
        self._note("cut", src, dst)

    def heal(self) -> None:
        self._cut = set()
        self._note("heal")

    def pause(self, node_id: int) -> None:
        self.members[node_id].paused = True
        self._note("pause", node_id)

    def resume(self, node_id: int) -> None:
        self._resume(self.members[node_id])

    def _exp(self, mean: int) -> int:
        return 1 + int(self.rng.expovariate(1.0 / mean))

    # -- members -----------------------------------------------------------------------

    def _start(self, m: Member) -> None:
        """Start (or restart) ``m``'s node from its MemFS."""
        rng = self.rng
        lo, hi = self.profile.election_ticks
        e = rng.randint(lo, hi)
        sm = self._make_sm(self, m)
        inc = m.incarnation + 1
        try:
            log = sm.log = self._make_log(f"/n{m.id}/raft", m.fs, self.profile)
            send = self._sender(m.id, inc)
            node = self._make_node(
                m.id,
                log,
                sm,
                send,
                # Batches go out message by message here: each still gets its own latency,
                # drops and duplicates (a superset of a batch's arriving in one frame).
                send_many=lambda to, ps, send=send: all([send(to, p) for p in ps]),
                # A member added later keeps ``join = true`` in its config for good.
                peers=self.ids if m.id in self.ids else (),
                join=m.id not in self.ids,
                election_tick=e,
                heartbeat_tick=HEARTBEAT_TICK,
                min_election_tick=e,
                max_election_tick=e + 1,
                snapshot_entries=self.profile.snapshot_entries,
                on_authority=self._authority_cb(m, inc),
                offload=self._offloader(m.id, inc) if self.offload else None,
                offload_min_entries=1,  # every leader sync (the product: 2, concurrency)
                clock=self._clock,
            )
        except CrashPoint as exc:
            self._note("start-crashed", m.id, str(exc))
            self.stats["crash_points"] += 1
            self._power_loss(m)
            self._at(self.now + self.rng.randint(5, 60) * TICK, _RESTART, m.id, m.incarnation)
            return
        except StateError as exc:
            if "injected into" in str(exc):
                self._note("start-failed-injected", m.id, str(exc))
                self.stats["injected_io_errors"] += 1
                self._power_loss(m)
                self._at(self.now + self.rng.randint(5, 60) * TICK, _RESTART, m.id, m.incarnation)
                return
            self.fail(f"node {m.id} refuses to start from its own log: {exc}")
        except BaseException as exc:  # a panic in the core, a ValueError in the log...
            self.fail(f"node {m.id} cannot start: {type(exc).__name__}: {exc}")
        m.incarnation = inc
        m.node = node
        m.sm = sm
        sm.node = node
        m.paused = False
        m.backlog = []
        m.dirty = False
        torn = log.stats()["torn_bytes_discarded"]
        if torn:
            self.stats["torn_tails_recovered"] += 1
        self._note("start", m.id, inc, e, node.applied, node.last_index, node.term, torn)
        self._at(self.now + rng.randint(1, TICK), _TICK, m.id, inc)
        self._at(self.now, _PROCESS, m.id, inc)
        m.dirty = True

    def _clock(self) -> float:
        return self.now / 1000.0

    def _offloader(self, node_id: int, inc: int) -> Callable[..., None]:
        def offload(work: SyncJob, done: Callable[[], None]) -> None:
            self.stats["syncs_offloaded"] += 1
            self._at(self.now + self.rng.randint(0, 4), _SYNC_DONE, node_id, inc, (work, done))

        return offload

    def _sync_done(self, node_id: int, inc: int, job: tuple[Any, ...]) -> None:
        m = self._live(node_id, inc)
        if m is None:
            return  # crashed meanwhile: what the sync would have made durable is lost
        if m.paused:
            self._at(self.now + TICK, _SYNC_DONE, node_id, inc, job)
            return
        work, done = job
        self._note("sync-done", node_id)
        work.run()
        self._guard(m, "sync done", done)
        self._after(m)

    def _sender(self, src: int, inc: int) -> Callable[[int, bytes], bool]:
        def send(to: int, payload: bytes) -> bool:
            return self._send(src, inc, to, payload)

        return send

    def _authority_cb(self, m: Member, inc: int) -> Callable[[bool], None]:
        def on_authority(auth: bool) -> None:
            if auth and m.incarnation == inc and m.node is not None:
                self._note("authority", m.id, m.node.term)
                self.stats["authorities"] += 1
                self._check_leader_state(m, m.node.term, None)

        return on_authority

    def _live(self, node_id: int, inc: int) -> Member | None:
        m = self.members[node_id]
        if m.node is None or m.incarnation != inc:
            return None
        return m

    def _after(self, m: Member) -> None:
        """After any call into ``m``'s node: a crash point or an injected I/O error that
        fired is a crash; any other failure is a violation (invariant 4)."""
        node = m.node
        if node is None or node.fatal is None:
            return
        reason = node.fatal
        if "CrashPoint" in reason:
            self._note("crash-point", m.id, reason)
            self.stats["crash_points"] += 1
        elif "injected into" in reason:
            self._note("io-error", m.id, reason)
            self.stats["injected_io_errors"] += 1
            # Failed closed on an I/O error: restarted by its supervisor with the page
            # cache intact (no power loss) as often as after a power loss of any kind.
            if self.rng.random() < 0.5:
                self._power_loss(m, "process")
                self._at(self.now + self.rng.randint(5, 60) * TICK, _RESTART, m.id, m.incarnation)
                return
        elif node.voters and m.id not in node.voters:
            # Removed from the cluster, then stopped: failing closed is what it should do.
            self._note("removed-member-stopped", m.id, reason)
            m.removed = True
            m.node = None
            m.sm = None
            m.incarnation += 1
            return
        else:
            self.fail(f"node {m.id} failed: {reason}")
        self._power_loss(m)
        self._at(self.now + self.rng.randint(5, 60) * TICK, _RESTART, m.id, m.incarnation)

    def _power_loss(self, m: Member, mode: str | None = None) -> None:
        """``m`` loses power: its node is gone, unsynced writes are lost or torn."""
        if mode is None:
            mode = self.rng.choice(CRASH_MODES)
        m.fs.crash(self.rng, mode)
        m.node = None
        m.sm = None
        m.paused = False
        m.backlog = []
        m.incarnation += 1
        self.stats["crashes"] += 1
        self._note("power-loss", m.id, mode)

    def _guard(self, m: Member, what: str, fn: Callable[[], Any]) -> Any:
        """Call into ``m``'s node: a violation found inside is raised here; any exception
        but a refusal is a violation (invariant 4)."""
        try:
            out = fn()
        except (NotLeader, StateError, _core.ProposalDropped):
            if self.violation is not None:
                raise self.violation from None
            raise
        except BaseException as exc:
            if self.violation is not None:
                raise self.violation from None
            self.fail(f"node {m.id}: {what} raised {type(exc).__name__}: {exc}")
        if self.violation is not None:
            raise self.violation
        return out

    # -- events ------------------------------------------------------------------------

    def _tick(self, node_id: int, inc: int) -> None:
        m = self._live(node_id, inc)
        if m is None:
            return
        self._at(self.now + TICK + self.rng.randint(-2, 2), _TICK, node_id, inc)
        if m.paused:
            return
        node = m.node
        assert node is not None
        self._guard(m, "tick", node.tick)
        self._guard(m, "process", node.process)
        self._after(m)

    def _process_event(self, node_id: int, inc: int) -> None:
        m = self._live(node_id, inc)
        if m is None or m.paused:
            return
        m.dirty = False
        node = m.node
        assert node is not None
        self._guard(m, "process", node.process)
        self._after(m)

    def _kick(self, m: Member) -> None:
        # Messages that arrive at the same instant share one Ready (one sync), like the
        # event loop's call_soon in RaftStore.
        if not m.dirty:
            m.dirty = True
            self._at(self.now, _PROCESS, m.id, m.incarnation)

    def _send(self, src: int, inc: int, dst: int, payload: bytes) -> bool:
        p = self.profile
        rng = self.rng
        if self.hold is not None and self.hold(src, dst, payload):
            # A scripted scenario keeps this frame (to deliver it much later, stale).
            self.held.append((src, dst, payload))
            self._note("held", src, dst, zlib.crc32(payload))
            return True
        if (src, dst) in self._cut:
            self.stats["msgs_cut"] += 1
            return False  # no connection: the transport reports it
        if self.storm and rng.random() < p.p_drop:
            self.stats["msgs_dropped"] += 1
            return True
        copies = 2 if self.storm and rng.random() < p.p_dup else 1
        for _ in range(copies):
            t = self.now + rng.randint(1, p.latency)
            if self.storm:
                r = rng.random()
                if r < p.p_hold:
                    t += rng.randint(50, 300) * TICK
                    self.stats["msgs_held"] += 1
                elif r < p.p_hold + p.p_delay:
                    t += rng.randint(10, 30) * TICK
            self._at(t, _DELIVER, src, dst, payload)
        self.stats["msgs_sent"] += copies
        return True

    def _deliver(self, src: int, dst: int, payload: bytes) -> None:
        if (src, dst) in self._cut:
            self.stats["msgs_cut"] += 1
            return
        m = self.members.get(dst)
        if m is None or m.node is None:
            return
        if m.paused:
            m.backlog.append((src, payload))
            return
        self._note("deliver", src, dst, zlib.crc32(payload))
        node = m.node
        self._guard(m, "receive", lambda: node.receive(src, payload))
        self.stats["msgs_delivered"] += 1
        self._kick(m)

    def _restart(self, node_id: int, inc: int) -> None:
        m = self.members[node_id]
        if m.node is None and m.incarnation == inc and not m.removed:
            if self.storm and self.rng.random() < 0.15:
                # Another power loss during recovery (torn tail truncated, interrupted
                # snapshot step completed, the recovered log synced...).
                m.fs.crash_at = m.fs.op_count + self.rng.randint(0, 5)
            self._start(m)
            self.stats["restarts"] += 1

    # -- the client --------------------------------------------------------------------

    def _propose_event(self) -> None:
        p = self.profile
        self._at(self.now + self._exp(p.propose_every), _PROPOSE)
        rng = self.rng
        if self._history and rng.random() < 0.1:
            # A retry of an earlier request with identical bytes (CometBFT retries after a
            # dropped connection): SAME with the stored signature, or a refusal.
            chain, rec = rng.choice(self._history[-20:])
        else:
            chain = rng.choice(CHAINS)
            top = self._top[chain]
            if rng.random() < 0.3:
                self._top[chain] = top = top + 1
            self._attempt += 1
            h = rng.randint(max(1, top - 2), top)
            r, s = rng.randint(0, 1), rng.randint(1, 3)
            sb = b"sim|%s|%d|%d|%d|attempt %d" % (chain, h, r, s, self._attempt)
            rec = SignRecord(h, r, s, sb, b"sig|" + sb)
            self._history.append((chain, rec))
        up = [m for m in self.members.values() if m.node is not None and not m.paused]
        if not up:
            return
        leaders = [m for m in up if m.node is not None and m.node.role == LEADER]
        target = rng.choice(leaders) if leaders and rng.random() < 0.9 else rng.choice(up)
        self._propose(target, chain, rec)

    def _propose(self, m: Member, chain: bytes, rec: SignRecord) -> tuple[int, int] | None:
        node = m.node
        assert node is not None
        data = commands.encode_command(commands.OP_SIGN, chain, rec)
        holder: list[int] = []

        def resolve(result: Any, err: BaseException | None) -> None:
            self._resolved(m, holder[0] if holder else -1, chain, rec, result, err)

        try:
            batch = self._batch_rng.random() < 0.7
            term, index = self._guard(
                m, "propose", lambda: node.propose(data, resolve, batch=batch)
            )
        except (NotLeader, StateError):
            self.stats["proposals_refused_not_leader"] += 1
            return None
        holder.append(term)
        self.stats["proposals"] += 1
        if node._inflight is not None:
            self.stats["proposals_during_sync"] += 1
        elif batch:
            self.stats["proposals_queued"] += 1
        self._note("propose", m.id, term, index, chain, rec.hrs, rec.sign_bytes[-12:])
        self._kick(m)
        return term, index

    def _resolved(
        self,
        m: Member,
        term: int,
        chain: bytes,
        rec: SignRecord,
        result: Any,
        err: BaseException | None,
    ) -> None:
        if err is not None or not isinstance(result, Decision):
            self.stats["proposals_lost"] += 1
            if err is not None and "was not placed there" in str(err):
                self.stats["queued_lost"] += 1
            if err is not None and not isinstance(err, NebulaError):
                self.fail(f"node {m.id}: a proposal failed with {type(err).__name__}: {err}")
            return
        if result.verdict == Verdict.REFUSE:
            self.stats["refused"] += 1
            return
        out = result.record
        if out is None or out.hrs != rec.hrs:
            self.fail(
                f"node {m.id}: decision {result} for {chain!r} {rec.hrs} carries another record"
            )
        assert out is not None
        self._release(m, term, chain, out, result.verdict)

    def _release(
        self, m: Member, term: int, chain: bytes, rec: SignRecord, verdict: Verdict
    ) -> None:
        self._note("release", m.id, term, chain, rec.hrs, rec.sign_bytes[-12:], verdict.name)
        self.stats["released"] += 1
        if rec.height == LIVENESS_HEIGHT:
            self._liveness_released = True
        key = (chain, *rec.hrs)
        prev = self.released.get(key)
        if prev is None:
            self.released[key] = rec.sign_bytes
        elif prev != rec.sign_bytes:
            self.fail(
                f"two signatures released for {chain!r} {rec.hrs}: {prev!r} and "
                f"{rec.sign_bytes!r} (the second by node {m.id} in term {term})"
            )
        self.releases.append((term, chain, rec, m.id))
        # Invariant 2, for leaders of later terms that are already authoritative.
        for other in self.members.values():
            n = other.node
            if other is not m and n is not None and n.term > term and n.authoritative:
                self._check_leader_state(other, n.term, [(term, chain, rec, m.id)])

    # -- invariants --------------------------------------------------------------------

    def _check_leader_state(
        self, m: Member, term: int, releases: list[tuple[int, bytes, SignRecord, int]] | None
    ) -> None:
        """Invariant 2: the authoritative leader ``m`` (of ``term``) holds every decision
        released in a term up to its own."""
        assert m.sm is not None
        states = m.sm.states
        for rterm, chain, rec, by in self.releases if releases is None else releases:
            if rterm > term:
                continue
            cur = states.get(chain)
            if (
                cur is None
                or cur.hrs < rec.hrs
                or (cur.hrs == rec.hrs and cur.sign_bytes != rec.sign_bytes)
            ):
                self.fail(
                    f"node {m.id}, authoritative leader of term {term}, lacks the decision "
                    f"{chain!r} {rec.hrs} {rec.sign_bytes!r} released by node {by} in term "
                    f"{rterm}; its state: {cur}"
                )

    def _on_apply(self, m: Member, sm: RecordingStateMachine, index: int, data: bytes) -> None:
        node = sm.node
        term = node.term_at(index) if node is not None else None
        if term is None:
            self.fail(f"node {m.id} applies index {index}, which is not in its log")
        got = (term, data)
        seen = self.entry_at.setdefault(index, got)
        if seen != got:
            self.fail(
                f"committed entries disagree at index {index}: node {m.id} applies term "
                f"{term} {data!r}, another member applied term {seen[0]} {seen[1]!r}"
            )
        state = tuple(sorted(sm.states.items()))
        known = self.state_at.setdefault(index, state)
        if known != state:
            self.fail(
                f"state after index {index} disagrees: node {m.id} has {state}, another "
                f"member had {known}"
            )
        self.stats["applied"] += 1

    def _on_restore(
        self, m: Member, sm: RecordingStateMachine, before: dict[bytes, SignRecord]
    ) -> None:
        """A snapshot replaced ``m``'s state: from its own log at start, or the leader's.
        The log holds it already (durable first), so its index is known here."""
        self.stats["snapshot_restores"] += 1
        snap = sm.log.snapshot if sm.log is not None else None
        if snap is None:
            self.fail(f"node {m.id} restored a snapshot its log does not hold")
        assert snap is not None
        if sm.node is not None:
            self.stats["snapshot_installs"] += 1
            for chain, rec in before.items():
                cur = sm.states.get(chain)
                if cur is None or cur.hrs < rec.hrs:
                    self.fail(
                        f"node {m.id}: a snapshot moved the high-water mark of {chain!r} "
                        f"down from {rec.hrs} to {None if cur is None else cur.hrs}"
                    )
        # The state after the last entry with data at or below the snapshot's index (the
        # member that made the snapshot applied every one of them, and recorded them).
        idx = snap.index
        known = [i for i in self.state_at if i <= idx]
        want = self.state_at[max(known)] if known else ()
        have = tuple(sorted(sm.states.items()))
        if have != want:
            self.fail(
                f"node {m.id} restored a snapshot at index {idx} whose state {have} differs "
                f"from the committed state there {want}"
            )

    # -- faults ------------------------------------------------------------------------

    def _fault(self) -> None:
        rng = self.rng
        up = [m for m in self.members.values() if m.node is not None]
        kind = rng.choices(
            (
                "crash",
                "crash_point",
                "io_error",
                "pause",
                "resume",
                "partition",
                "one_way",
                "heal",
                "transfer",
                "campaign",
                "reconfig",
            ),
            weights=(4, 3, 1, 3, 3, 3, 1, 3, 2, 1, 2),
        )[0]
        if kind == "crash" and up:
            m = rng.choice(up)
            self._note("fault", kind, m.id)
            self._power_loss(m)
            self._at(self.now + rng.randint(3, 80) * TICK, _RESTART, m.id, m.incarnation)
        elif kind == "crash_point" and up:
            m = rng.choice(up)
            m.fs.crash_at = m.fs.op_count + rng.randint(0, 6)
            self._note("fault", kind, m.id, m.fs.crash_at)
        elif kind == "io_error" and up:
            m = rng.choice(up)
            op = rng.choice(("fdatasync", "pwrite", "fsync"))
            m.fs.fail_next(op)
            self._note("fault", kind, m.id, op)
        elif kind == "pause":
            cands = [m for m in up if not m.paused]
            if cands:
                m = rng.choice(cands)
                m.paused = True
                self._note("fault", kind, m.id)
                self.stats["pauses"] += 1
        elif kind == "resume":
            cands = [m for m in up if m.paused]
            if cands:
                self._resume(rng.choice(cands))
        elif kind == "partition":
            ids = self._current()
            rng.shuffle(ids)
            k = rng.randint(1, len(ids) // 2)
            side = set(ids[:k])
            self._cut = {(a, b) for a in ids for b in ids if (a in side) != (b in side)}
            self._note("fault", kind, sorted(side))
            self.stats["partitions"] += 1
        elif kind == "one_way":
            a, b = rng.sample(self._current(), 2)
            self._cut.add((a, b))
            self._note("fault", kind, a, b)
        elif kind == "heal":
            self._cut = set()
            self._note("fault", kind)
        elif kind == "transfer":
            leaders = [
                m for m in up if m.node is not None and m.node.role == LEADER and not m.paused
            ]
            if leaders:
                m = rng.choice(leaders)
                to = rng.choice([i for i in self._current() if i != m.id])
                node = m.node
                assert node is not None
                self._note("fault", kind, m.id, to)
                self._guard(m, "transfer_leader", lambda: node.transfer_leader(to))
                self.stats["transfers"] += 1
                self._kick(m)
        elif kind == "campaign":
            # Only a member of its own configuration (RaftStore campaigns only as the one
            # member of a one-member cluster; raft-rs panics on a campaign outside it).
            cands = [
                m
                for m in up
                if not m.paused
                and m.node is not None
                and m.node.role != LEADER
                and m.id in m.node.voters
            ]
            if cands:
                m = rng.choice(cands)
                node = m.node
                assert node is not None
                self._note("fault", kind, m.id)
                self._guard(m, "campaign", node.campaign)
                self._kick(m)

        elif kind == "reconfig":
            self._reconfig()

    def _current(self) -> list[int]:
        """Ids of the members not decommissioned."""
        return [i for i, m in self.members.items() if not m.removed]

    def _reconfig(self) -> None:
        """``nebula cluster remove`` / ``add`` on the authoritative leader: remove a voter
        other than the leader, or add a new member (a fresh machine with a new id and an
        empty disk, started with ``join=True`` first).  Members the leader no longer
        counts are decommissioned; joiners it counts become members."""
        rng = self.rng
        lead = self.leader()
        if lead is None or lead.node is None:
            return
        voters = set(lead.node.voters)
        if lead.id not in voters:
            return  # a leader that applied its own removal (test_bug_removed_leader.py)
        for m in self.members.values():
            if m.id in voters:
                if m.joiner:
                    self.stats["members_joined"] += 1
                m.joiner = False
            elif not m.joiner and not m.removed:
                m.removed = True  # the removal committed: the operator stops the machine
                if m.node is not None:
                    self._note("decommission", m.id)
                    m.node = None
                    m.sm = None
                    m.incarnation += 1
                self.stats["members_removed"] += 1
        n = self.profile.nodes
        joiners = [m for m in self.members.values() if m.joiner and not m.removed]
        removable = self.profile.removals and len(voters) > max(2, n - 1)
        if removable and (len(voters) >= n + 2 or rng.random() < 0.5):
            victim = rng.choice(sorted(voters - {lead.id}))
            change, target = CONF_REMOVE, victim
        elif len(voters) >= n + 2:
            return
        elif joiners:
            change, target = CONF_ADD, joiners[0].id
        else:
            new = Member(max(self.members) + 1, self._make_fs(), joiner=True)
            self.members[new.id] = new
            self._note("new-member", new.id)
            self.stats["members_started_to_join"] += 1
            self._start(new)
            change, target = CONF_ADD, new.id
        node = lead.node

        def resolve(result: Any, err: BaseException | None) -> None:
            self._note("conf-change-resolved", lead.id, change, target, result, repr(err))

        self._note("conf-change", lead.id, change, target)
        try:
            self._guard(
                lead,
                "propose_conf_change",
                lambda: node.propose_conf_change(change, target, b"", resolve),
            )
        except (NotLeader, StateError):
            return
        self.stats["conf_changes"] += 1
        self._kick(lead)

    def _resume(self, m: Member) -> None:
        m.paused = False
        backlog, m.backlog = m.backlog, []
        self._note("resume", m.id, len(backlog))
        # What waited in the socket buffer arrives now, in order per sender.
        for src, payload in backlog:
            self._at(self.now, _DELIVER, src, m.id, payload)
        self._kick(m)

    def _end_storm(self) -> None:
        """The calm phase: heal, resume, restart; a reliable network from now on (held
        messages already in flight still arrive, stale)."""
        self.storm = False
        self._cut = set()
        self._note("calm")
        for m in self.members.values():
            m.fs.crash_at = None
            m.fs._fail.clear()  # injected I/O errors not yet fired
            if m.node is None and not m.removed:
                self._start(m)
            elif m.paused:
                self._resume(m)

    def _liveness_probe(self) -> None:
        """Calm phase: propose a fresh decision on the authoritative leader until one is
        released; then the run ends as soon as every member has applied it."""
        self._at(self.now + 5 * TICK, _LIVENESS)
        if self._liveness_released:
            if all(self._has_liveness(m) for m in self._voter_members()):
                self._done = True
            return
        leader = self.leader()
        if leader is None:
            return
        if self._liveness is None:
            self._attempt += 1
            sb = b"sim|liveness|attempt %d" % self._attempt
            self._liveness = SignRecord(LIVENESS_HEIGHT, 0, 3, sb, b"sig|" + sb)
        # Retried with identical bytes (as CometBFT retries): an earlier attempt that
        # committed while its outcome was lost is then answered from the state (SAME).
        if self._propose(leader, LIVENESS_CHAIN, self._liveness) is not None:
            self.stats["liveness_attempts"] += 1

    def _voter_members(self) -> list[Member]:
        """The members the authoritative leader counts (all of them without a leader)."""
        lead = self.leader()
        if lead is None or lead.node is None:
            return [m for m in self.members.values() if not m.removed]
        return [self.members[i] for i in lead.node.voters]

    def _has_liveness(self, m: Member) -> bool:
        cur = None if m.sm is None else m.sm.states.get(LIVENESS_CHAIN)
        return cur is not None and cur.height == LIVENESS_HEIGHT

    def _final_checks(self) -> None:
        if not self._liveness_released:
            self.fail(
                f"liveness: no decision committed within {self.profile.calm} units of calm "
                "(every member up and connected, a reliable network)"
            )
        for m in self._voter_members():
            if m.node is None or m.sm is None:
                self.fail(f"liveness: node {m.id} is down at the end of the calm phase")
            assert m.node is not None and m.sm is not None
            if not self._has_liveness(m):
                cur = m.sm.states.get(LIVENESS_CHAIN)
                self.fail(f"liveness: node {m.id} has not applied the calm phase's decision: {cur}")
        for m in self.members.values():
            if m.node is not None and m.node.authoritative:
                self._check_leader_state(m, m.node.term, None)


def replay_command(seed: int, nodes: int, long: bool = False, removals: bool = False) -> str:
    flags = (" --long" if long else "") + (" --removals" if removals else "")
    return f"python -m tests.sim.harness --seed {seed} --nodes {nodes}{flags} --trace"


def run_seed(
    seed: int, nodes: int, *, long: bool = False, removals: bool = False, **kw: Any
) -> dict[str, Any]:
    return Simulation(seed, nodes=nodes, long=long, removals=removals, **kw).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--removals", action="store_true", help="membership changes remove too")
    ap.add_argument("--trace", action="store_true", help="print every event")
    args = ap.parse_args(argv)
    if args.trace:
        logging.basicConfig(level=logging.INFO, format="    log: %(name)s: %(message)s")
    else:
        logging.disable(logging.CRITICAL)
    try:
        out = run_seed(
            args.seed, args.nodes, long=args.long, removals=args.removals, trace=args.trace
        )
    except Violation as v:
        print(v, file=sys.stderr)
        return 1
    print(json.dumps({"seed": args.seed, "nodes": args.nodes, **out}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
