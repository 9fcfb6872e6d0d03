"""Raft-replicated sign state (``persist = "raft"``) on tikv's raft-rs.

The layers, top-down (``nebula/raft/``): the pyo3 binding of raft-rs (``_core``), the
durable log (``storage``), the authenticated transport (``transport``), the Ready loop
(``node``), versioned commands (``commands``).  This module is the thin store on top:

* :class:`SignStateMachine` - the replicated state, last sign record per chain, changed
  only by committed commands through :func:`nebula.guard.apply` (S2).  Deterministic, no
  I/O; its snapshot bytes carry the high-water mark (S4).
* :class:`RaftStore` - a :class:`~nebula.state.base.SignStore` that drives the node on
  the event loop: a tick timer, the transport's messages, proposals.  ``commit`` proposes
  a SIGN command and answers with **the state machine's decision for that (term, index)**;
  a timeout, a lost leadership or a replaced entry releases nothing (S3).  For a
  threshold-BLS chain (``threshold``) the decision is a TSIGN command and the signature
  is combined from the members' shares after the commit (:mod:`nebula.state.threshold`).

Timing is in seconds in the config and in ticks for raft-rs: ``tick_interval`` (default
50 ms), ``heartbeat_interval`` and ``election_timeout_min/max`` are rounded to ticks.
PreVote and CheckQuorum are on: a member back from a pause cannot depose a healthy leader,
and a leader cut off from the majority steps down after an election timeout.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nebula.durable import ExclusiveLock
from nebula.errors import (
    BackendError,
    ConfigError,
    NotLeader,
    ReplicationError,
    StateError,
    Unavailable,
)
from nebula.guard import Decision, SignRecord, Verdict
from nebula.raft import commands
from nebula.raft.binding import BindingMismatch, check_binding
from nebula.raft.node import (
    CONF_ADD,
    CONF_REMOVE,
    LEADER,
    ROLE_NAMES,
    RaftNode,
)
from nebula.raft.storage import LOG_NAME, Loaded, RaftLog, SyncJob
from nebula.raft.syncthread import SyncThread
from nebula.raft.timing import check_timing
from nebula.raft.transport import Transport
from nebula.state.base import SignLater, SignStore, check_commit_timeout, record_to_json
from nebula.state.threshold import ThresholdShares, check_cluster, digest
from nebula.types import Resolver

if TYPE_CHECKING:
    from nebula.crypto.threshold import KeyShare

logger = logging.getLogger("nebula.raft")

__all__ = ["RaftStore", "SignStateMachine"]


def _parse_addr(addr: str, what: str) -> tuple[str, int]:
    if not isinstance(addr, str) or ":" not in addr:
        raise ConfigError(f"{what}: expected host:port, got {addr!r}")
    host, _, port_s = addr.rpartition(":")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{what}: bad port in {addr!r}") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"{what}: bad address {addr!r}")
    return host, port


class _Waiter:
    """One decision on its way, answered once: by the state machine, by an error, or by
    its deadline (then nothing is released for it, S3).  ``expired()`` is True once it
    is answered, or once whoever waited for it gave up (:meth:`RaftStore._decided`)."""

    __slots__ = ("_answer", "done")

    def __init__(self, answer: Resolver) -> None:
        self.done = False
        self._answer = answer

    def resolve(self, result: Any, err: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._answer(result, err)
        except Exception:  # the answer's own failure must not stop the Raft apply loop
            logger.exception("raft: answering a decision failed")

    def expired(self) -> bool:
        return self.done


def _timed_out(timeout: float) -> ReplicationError:
    # The entry may still commit later; its decision then stands in the state machine,
    # and nothing is released for it here.
    return ReplicationError(f"raft commit timed out after {timeout:g}s (outcome unknown)")


# ---- the state machine -----------------------------------------------------------------


class SignStateMachine:
    """The replicated state: the last sign record per chain.  Deterministic, no I/O."""

    def __init__(self) -> None:
        self.states: dict[bytes, SignRecord] = {}
        # Raft addresses of members added at run time (conf-change contexts), carried by
        # snapshots so a restarted member can reach them.
        self.members: dict[int, str] = {}
        self.on_restore: Callable[[], None] | None = None

    def apply(self, index: int, data: bytes) -> Decision | bool:
        # SIGN / TSIGN: the guard's check-and-set (TSIGN: threshold BLS, the signature is
        # combined after the decision); RAISE (an import) only ever raises the mark (S4).
        # Decoding and deciding are one compiled kernel (nebula/_fast/cmd_py.py is its
        # specification).
        return commands.apply_command(self.states, data)

    def snapshot_data(self) -> bytes:
        return commands.encode_states(self.states, self.members)

    def restore(self, data: bytes) -> None:
        self.states, self.members = commands.decode_states(data)
        if self.on_restore is not None:
            self.on_restore()


# ---- reading a stopped member's data (offline export) ---------------------------------


@dataclasses.dataclass(frozen=True)
class LogStates:
    """What one member's Raft data says about each chain's mark (chain id -> record).

    * ``applied``: the state machine after every entry this member knows is committed
      (its snapshot, then its log up to its commit index): what it would serve.
    * ``highest``: per chain, the highest (height, round, step) in any entry it holds,
      committed or not, or in ``applied``.  An entry past the commit index may have been
      committed by the others after this member stopped hearing of it, or never.
    * ``commit``: the commit index it knew; ``last_index``: its last entry's index.
    """

    applied: dict[bytes, SignRecord]
    highest: dict[bytes, SignRecord]
    commit: int
    last_index: int

    def export(self, chain: bytes) -> SignRecord | None:
        """The record to export for ``chain``: the applied one, or, when an entry not
        known to be committed is higher, a bare mark at that (height, round, step)
        without sign bytes or signature.  A bare mark refuses every request at that
        step: that entry's signature may never have left, while the cluster may have
        released another one at the same step, so a new signer must not answer there
        with this one."""
        applied, high = self.applied.get(chain), self.highest.get(chain)
        if high is None or (applied is not None and applied.hrs >= high.hrs):
            return applied
        return SignRecord(high.height, high.round, high.step)


def states_in_log(loaded: Loaded) -> LogStates:
    """:class:`LogStates` of a loaded Raft log (pure: no I/O)."""
    sm = SignStateMachine()
    if loaded.snapshot is not None:
        sm.restore(loaded.snapshot.data)
    commit = loaded.hard_state.commit
    highest: dict[bytes, SignRecord] = {}
    for e in loaded.entries:
        if e.type != 0 or not e.data:  # a conf change, or a new leader's empty entry
            continue
        if e.index <= commit:
            sm.apply(e.index, e.data)
        _, chain, rec = commands.decode_command(e.data)
        cur = highest.get(chain)
        if cur is None or rec.hrs > cur.hrs:
            highest[chain] = rec
    for chain, rec in sm.states.items():
        cur = highest.get(chain)
        if cur is None or rec.hrs >= cur.hrs:
            highest[chain] = rec
    if loaded.entries:
        last = loaded.entries[-1].index
    else:
        last = loaded.snapshot.index if loaded.snapshot is not None else 0
    return LogStates(dict(sm.states), highest, min(commit, last), last)


def read_offline(data_path: str | Path, secret: bytes) -> LogStates:
    """:class:`LogStates` of a stopped member's Raft data directory.

    Refused (StateError) while a node runs on it (the directory's lock), for a directory
    with no Raft log, or for one bound to another cluster secret.  The log is opened and
    closed as a start and a stop would (a torn tail discarded, a seal written); the
    state in it is not changed."""
    data_path = Path(data_path)
    if not (data_path / "log" / LOG_NAME).exists():
        raise StateError(f"{data_path}: no Raft log here (raft.data_path) - nothing to export")
    lock = ExclusiveLock(data_path / "raft.lock", f"raft data directory {data_path}")
    try:
        try:
            check_binding(data_path, bytes(secret), create=False)
        except BindingMismatch:
            # Not the start's advice (wipe it): this directory is what the export saves.
            raise StateError(
                f"{data_path}: written under a different secret than the cluster secret at the "
                "config's raft.secret_path (was a new secret written already?). Point "
                "secret_path at the secret this member ran with and export again; keep "
                "this directory until every chain is exported"
            ) from None
        log = RaftLog(data_path / "log")
        try:
            return states_in_log(log.load())
        finally:
            log.close()
    finally:
        lock.release()


# ---- the store -------------------------------------------------------------------------


_OLD_FORMAT_FILES = ("raft.journal", "raft.journal.meta", "raft.snapshot")


class RaftStore(SignStore):
    """A :class:`SignStore` replicated by Raft among ``peers`` (see the module docstring).

    * ``peers``: every member's node id, this one included, to the ``host:port`` it is
      dialed at; ``bind_addr``: where this node listens.  ``join``: this node is being
      added to a running cluster (``nebula cluster add``); it waits for the leader.
    * ``data_path``: the Raft log and snapshots (one process per directory: a lock).
    * ``secret``: the cluster secret (>= 16 bytes): keys the transport.
    * ``initial``: imported priv_validator_state per chain; goes through the log and only
      ever raises the high-water mark.  Give it to every node.
    * ``commit_timeout``: how long :meth:`commit` waits for the majority; after it the
      outcome is unknown and nothing is released.
    * timing: ``tick_interval``, ``heartbeat_interval``, ``election_timeout_min/max``
      (seconds, see :func:`check_timing`); ``connection_retry``, ``handshake_timeout``.
    * ``snapshot_entries``: applied entries between snapshots (and log compaction).
    * ``dynamic_membership``: allow :meth:`add_member` / :meth:`remove_member`.
    * ``threshold``: chain id -> this member's threshold-BLS share, for the chains signed
      by BLS-Raft (checked against the cluster: :func:`check_cluster`).
    * ``sync_off_loop``: as leader, run the ``fdatasync`` of a Ready that carries several
      entries (decisions of several chains) on a worker thread; the loop serves other
      requests meanwhile and the node takes up its inputs when the sync is done
      (:class:`~nebula.raft.node.RaftNode`, ``offload``).

    Call :meth:`start` (binds the Raft port) before use.
    """

    begins_commits: ClassVar[bool] = True

    def __init__(
        self,
        node_id: int,
        bind_addr: str,
        peers: Mapping[int, str],
        data_path: str | Path,
        secret: bytes,
        *,
        initial: Mapping[str, SignRecord | None] | None = None,
        commit_timeout: float = 1.0,
        tick_interval: float = 0.05,
        heartbeat_interval: float = 0.05,
        election_timeout_min: float = 0.3,
        election_timeout_max: float = 0.6,
        connection_retry: float = 0.1,
        handshake_timeout: float = 2.0,
        max_unauthenticated: int = 64,
        snapshot_entries: int = 10_000,
        dynamic_membership: bool = False,
        join: bool = False,
        threshold: Mapping[str, KeyShare] | None = None,
        sync_off_loop: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) < 16:
            raise ConfigError("raft: the cluster secret must be at least 16 bytes")
        if type(node_id) is not int or node_id <= 0:
            raise ConfigError(f"raft: node_id must be a positive int, got {node_id!r}")
        if node_id not in peers:
            raise ConfigError(f"raft: peers must include this node ({node_id})")
        check_commit_timeout(commit_timeout, "raft: commit_timeout")
        if not 2 <= snapshot_entries <= 10_000_000:
            raise ConfigError("raft: snapshot_entries must be in [2, 10000000]")
        hb, emin, emax = check_timing(
            tick_interval=tick_interval,
            heartbeat_interval=heartbeat_interval,
            election_timeout_min=election_timeout_min,
            election_timeout_max=election_timeout_max,
        )
        _parse_addr(bind_addr, "raft bind_addr")
        for pid, addr in peers.items():
            if type(pid) is not int or pid <= 0:
                raise ConfigError(f"raft: peer ids must be positive ints, got {pid!r}")
            _parse_addr(addr, f"raft peer {pid}")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise ConfigError("raft: no event loop given and none running") from None

        self.node_id = node_id
        self.commit_timeout = float(commit_timeout)
        self.dynamic_membership = dynamic_membership
        self._loop = loop
        self._addrs: dict[int, str] = dict(peers)
        self._config_peers = frozenset(peers)
        self._tick_interval = float(tick_interval)
        self._quorum_window = float(election_timeout_min)
        self._quorum_until = 0.0  # _quorum_recent holds before this (monotonic) time
        self._closed = False
        self._started = False
        self._timer: asyncio.TimerHandle | None = None
        # (deadline, waiter) of each decision in flight, in deadline order (_expire_due).
        self._deadlines: collections.deque[tuple[float, _Waiter]] = collections.deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._kicked = False
        self._sync_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._syncer: SyncThread | None = None
        self._syncer_failed = False  # could not start one: the Python thread from then on
        # Group commit: every proposal of a loop pass is queued; the pass's flush hands
        # them to raft-rs as one proposal (one Ready, one fdatasync, one append each).
        self._batch_armed = False
        self._role_callbacks: list[Callable[[bool], Any]] = []
        self._announced = False
        self._imports: dict[bytes, SignRecord] = {}
        self._import_in_flight = False
        self._threshold: dict[bytes, KeyShare] = {}
        for chain_id, share in (threshold or {}).items():
            if dynamic_membership:
                raise ConfigError(
                    "raft: threshold BLS needs a fixed membership (dynamic_membership = "
                    "false): the shares are split for exactly the configured members"
                )
            check_cluster(share, node_id, list(peers), f"chain {chain_id}")
            self._threshold[chain_id.encode()] = share
        self._share_waiters: dict[int, asyncio.Future[None]] = {}
        #: chain id -> seconds the last threshold signature took after its commit
        self._combine_s: dict[bytes, float] = {}
        # The last combined signature per threshold chain (this leader's retries).
        self._combined: dict[bytes, SignRecord] = {}
        #: called with (chain_id, member) for each share that failed verification
        self.on_bad_share: Callable[[str, int], None] | None = None
        self.tshares: ThresholdShares | None = None

        self.data_path = Path(data_path)
        try:
            self.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(f"{self.data_path}: cannot create raft data directory: {e}") from None
        old = [n for n in _OLD_FORMAT_FILES if (self.data_path / n).exists()]
        if old:
            raise StateError(
                f"{self.data_path}: holds Raft data of the pysyncobj-based release ({', '.join(old)}), "
                "which this release cannot read.  Migrate: with the old release running, "
                "`nebula state export -c <config> > state.json`; stop every member; move the old "
                'raft data directories away; set raft.initial_state_path = "state.json" on '
                "every member; start the new release"
            )
        self._lock = ExclusiveLock(
            self.data_path / "raft.lock", f"raft data directory {self.data_path}"
        )
        try:
            # Before the log is opened: a directory of another incarnation is refused.
            check_binding(self.data_path, bytes(secret))
            self._sm = SignStateMachine()
            self._log = RaftLog(self.data_path / "log")
            self._transport = Transport(
                node_id,
                bind_addr,
                {p: a for p, a in peers.items() if p != node_id},
                bytes(secret),
                on_message=self._on_message,
                on_read_done=self._on_read_done,
                loop=loop,
                handshake_timeout=handshake_timeout,
                max_unauthenticated=max_unauthenticated,
                retry_interval=connection_retry,
            )
            self._node = RaftNode(
                node_id,
                self._log,
                self._sm,
                self._transport.send,
                send_many=self._transport.send_many,
                peers=peers.keys(),
                join=join,
                election_tick=emin,
                heartbeat_tick=hb,
                min_election_tick=emin,
                max_election_tick=emax,
                snapshot_entries=snapshot_entries,
                on_authority=self._on_authority,
                on_membership=self._on_membership,
                offload=self._offload if sync_off_loop else None,
                **self._threshold_hooks(),
            )
        except BaseException:
            self._lock.release()
            raise
        # Members added at run time and known from the durable snapshot: reachable too
        # (the config's own peer list wins for the ids it names).
        self._learn_addresses()
        self._sm.on_restore = self._learn_addresses
        for chain_id, rec in (initial or {}).items():
            if rec is not None:
                self._imports[chain_id.encode()] = rec
        self._drop_satisfied_imports()

    def _offload(self, job: SyncJob, done: Callable[[], None]) -> None:
        """The node's offload hook: ``job`` (a leader's fdatasync) on the native sync
        thread (nebula.raft.syncthread), or a Python thread for a log not on the real file
        system; then ``done`` on the loop."""
        syncer = self._syncer
        if syncer is None and job.os_fd is not None and not self._syncer_failed:
            try:
                syncer = self._syncer = SyncThread(self._loop)
            except (OSError, RuntimeError) as e:  # no eventfd or thread to be had
                self._syncer_failed = True
                logger.warning(
                    "raft node %d: no native sync thread (%s); syncing on a Python thread",
                    self.node_id,
                    e,
                )
        if syncer is not None and syncer.sync(job, done):
            return
        pool = self._sync_pool
        if pool is None:
            pool = self._sync_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"raft-sync-{self.node_id}"
            )
        loop = self._loop

        def finished(_f: concurrent.futures.Future[None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                loop.call_soon_threadsafe(done)

        pool.submit(job.run).add_done_callback(finished)

    def _threshold_hooks(self) -> dict[str, Any]:
        if not self._threshold:
            return {}
        ts = self.tshares = ThresholdShares(
            self.node_id,
            self._threshold,
            lambda chain: self._sm.states.get(chain),  # (restore replaces the dict)
            lambda i: self._node.term_at(i),
            on_share=self._share_arrived,
        )
        return {"on_send": ts.on_send, "on_receive": ts.on_receive, "on_append": ts.on_append}

    def _share_arrived(self, index: int) -> None:
        fut = self._share_waiters.get(index)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _learn_addresses(self) -> None:
        changed = False
        for nid, addr in self._sm.members.items():
            if nid not in self._config_peers and self._addrs.get(nid) != addr:
                self._addrs[nid] = addr
                changed = True
        if changed:
            self._transport.set_peers(self._peer_addrs())

    def _peer_addrs(self, also: int | None = None) -> dict[int, str]:
        """The transport's peers: the known addresses of the current voters (and ``also``,
        a member being added).  A removed member stays out: re-admitted by the next
        addition, it was stepped again until that change applied (found in review).  A
        node that knows no membership yet (joining) keeps every address it knows."""
        voters = set(self._node.voters)
        return {
            p: a
            for p, a in self._addrs.items()
            if p != self.node_id and (not voters or p in voters or p == also)
        }

    async def start(self) -> None:
        """Bind the Raft port and start ticking."""
        if self._started:
            return
        try:
            await self._transport.start()
        except BaseException:
            self._lock.release()
            raise
        self._started = True
        self._node.process()  # replays committed entries of the durable log
        self._timer = self._loop.call_later(self._tick_interval, self._on_tick)
        if len(self._node.voters) == 1 and self._node.voters[0] == self.node_id:
            # A one-member cluster elects itself at once instead of after a timeout.
            self._node.campaign()
            self._node.process()

    # -- driving -----------------------------------------------------------------------

    def _on_tick(self) -> None:
        if self._closed:
            return
        self._timer = self._loop.call_later(self._tick_interval, self._on_tick)
        self._node.tick()
        if self._syncer is not None:
            self._syncer.check()
        self._run()
        self._maybe_import()
        ts = self.tshares
        if ts is not None and ts.appended_count > 256:
            # A leader appends its own TSIGN entries but never acknowledges them, and a
            # follower's acknowledgement may have been lost: keep the recent ones only.
            ts.forget_below(self._node.applied - 64)
        self._announce()

    def _on_message(self, peer: int, payload: bytes) -> None:
        if not self._closed:
            self._node.receive(peer, payload)

    def _on_read_done(self) -> None:
        # Every message of one socket read is stepped first, then one Ready handles them
        # all (one fdatasync, one acknowledgement): under many chains a follower gets
        # several appends per read.  At once, not on the next loop pass: an
        # acknowledgement or an append is on the critical path of a signature.
        if not self._closed:
            self._node.process()

    def _kick(self) -> None:
        # Everything that arrives in one loop iteration shares one Ready (one fdatasync).
        if not self._kicked:
            self._kicked = True
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._kicked = False
        if not self._closed:
            self._node.process()

    def _flush_batch(self) -> None:
        # The queued proposals of this loop pass: one raft-rs proposal, then its Ready.
        self._batch_armed = False
        if not self._closed:
            self._node.process()

    def _on_authority(self, auth: bool) -> None:
        if auth and self._imports:
            # The config's initial states go first: their chains refuse until applied.
            self._loop.call_soon(self._maybe_import)
        self._announce()

    def _announce(self) -> None:
        auth = self.is_authoritative()
        if auth != self._announced:
            self._announced = auth
            for cb in list(self._role_callbacks):
                self._loop.call_soon(cb, auth)

    def _on_membership(self, change: int, node_id: int, context: bytes, voters: list[int]) -> None:
        self._quorum_until = 0.0  # another majority: count again
        # Runs while the conf-change entry is applied, on every member alike: the address
        # book in the state machine stays deterministic and snapshots carry it.
        if change == CONF_ADD and context:
            with contextlib.suppress(UnicodeDecodeError):
                addr = context.decode()
                self._sm.members[node_id] = addr
                if node_id not in self._config_peers:
                    self._addrs[node_id] = addr
        elif change == CONF_REMOVE:
            self._sm.members.pop(node_id, None)
        members = set(voters)
        self._transport.set_peers(
            {p: a for p, a in self._addrs.items() if p in members and p != self.node_id}
        )
        logger.info("raft membership now %s", sorted(members))
        if self.node_id not in members and voters:
            logger.warning("raft node %d was removed from the cluster", self.node_id)

    # -- leadership --------------------------------------------------------------------

    def _quorum_recent(self) -> bool:
        """A majority of the voters (this node counts) was heard within the last
        ``election_timeout_min``.  Answered from ``_quorum_until`` while that holds: the
        majority last found stays recent at least until then (heard times only move
        forward), so the answer is the same as counting again (every request asks)."""
        now = time.monotonic()
        if now < self._quorum_until:
            return True
        voters = self._node.voters
        if not voters:
            return False
        since = now - self._quorum_window
        need = len(voters) // 2 + 1
        heard: list[float] = []
        for v in voters:
            if v == self.node_id:
                need -= 1
            else:
                t = self._transport.last_heard(v)
                if t is not None and t > since:
                    heard.append(t)
        if need <= 0:
            return True
        if len(heard) < need:
            return False
        heard.sort(reverse=True)
        # Recent until the need-th most recently heard peer falls out of the window.
        self._quorum_until = heard[need - 1] + self._quorum_window
        return True

    def is_authoritative(self) -> bool:
        """Leader of the current term, its first entry applied, a majority heard recently."""
        return (
            not self._closed
            and self._started
            and self._node.authoritative
            and self._quorum_recent()
        )

    def on_role_change(self, callback: Callable[[bool], Any]) -> Callable[[], None]:
        """Call ``callback(is_leader)`` on the loop whenever authority is gained or lost."""
        self._role_callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._role_callbacks.remove(callback)

        return remove

    # -- imports -----------------------------------------------------------------------

    def _maybe_import(self) -> None:
        if (
            self._imports
            and not self._import_in_flight
            and not self._closed
            and self._node.authoritative
        ):
            self._propose_imports()

    def last_for_export(self, chain_id: str) -> SignRecord | None:
        self._check_imported(chain_id.encode())
        return self.last(chain_id)

    def _check_imported(self, chain: bytes) -> None:
        """Refuse a decision for ``chain`` while the initial sign state its config names
        is not applied: decided before it, a request could be signed below or against
        what that state says was signed already (a migration's double sign).  Raises
        :class:`Unavailable` (the validator retries; the import lands within a tick)."""
        rec = self._imports.get(chain)
        if rec is None:
            return
        cur = self._sm.states.get(chain)
        if cur is not None and cur.hrs >= rec.hrs:
            del self._imports[chain]
            return
        self._maybe_import()
        raise Unavailable(
            f"chain {chain.decode(errors='replace')!r}: its initial sign state "
            f"{rec.height}/{rec.round}/{rec.step} is not imported yet"
        )

    def _drop_satisfied_imports(self) -> None:
        for chain, rec in list(self._imports.items()):
            cur = self._sm.states.get(chain)
            if cur is not None and cur.hrs >= rec.hrs:
                del self._imports[chain]

    def _propose_imports(self) -> None:
        self._drop_satisfied_imports()
        if not self._imports:
            return
        self._import_in_flight = True
        todo = len(self._imports)

        def done(result: Any, err: BaseException | None) -> None:
            nonlocal todo
            todo -= 1
            if todo == 0:
                self._import_in_flight = False
                self._drop_satisfied_imports()

        for chain, rec in list(self._imports.items()):
            logger.info(
                "raft: importing sign state %s for chain %r (only ever raises the mark)",
                rec.hrs,
                chain.decode(errors="replace"),
            )
            try:
                self._node.propose(commands.encode_command(commands.OP_RAISE, chain, rec), done)
            except (NotLeader, StateError):
                done(None, None)
        self._kick()

    # -- SignStore ---------------------------------------------------------------------

    def last(self, chain_id: str) -> SignRecord | None:
        chain = chain_id.encode()
        rec = self._sm.states.get(chain)
        if rec is not None and not rec.signature and chain in self._threshold:
            done = self._combined.get(chain)
            if done is not None and done.hrs == rec.hrs and done.sign_bytes == rec.sign_bytes:
                return done
        return rec

    def all(self) -> dict[str, SignRecord]:
        return {c.decode(errors="replace"): r for c, r in self._sm.states.items()}

    async def commit(
        self, chain_id: str, record: SignRecord, sign_later: SignLater | None = None
    ) -> Decision:
        chain = chain_id.encode()
        self._check_imported(chain)
        share = self._threshold.get(chain)
        if share is not None:
            if sign_later is not None:
                raise StateError("a threshold chain's signature is combined, not signed later")
            return await self._commit_threshold(chain, record, share)
        res = await self._decided(self._start_sign(chain, record, sign_later))
        if not isinstance(res, Decision):
            raise StateError(f"raft state machine returned {type(res).__name__}")
        return res

    def begin_commit(
        self,
        chain_id: str,
        record: SignRecord,
        sign_later: SignLater | None,
        answer: Resolver,
    ) -> bool:
        """:meth:`commit` without a coroutine: ``answer(decision, None)`` or ``answer(None,
        error)`` follows once, from a later callback (the apply of the entry, the signing
        thread's hand-back, or the deadline).  False for a threshold chain (use
        :meth:`commit`).  Raises like :meth:`commit` when nothing could be set on its way."""
        chain = chain_id.encode()
        if chain in self._threshold:
            return False
        self._check_imported(chain)
        self._wait(self._start_sign(chain, record, sign_later), answer)
        return True

    def _start_sign(
        self, chain: bytes, record: SignRecord, sign_later: SignLater | None
    ) -> Callable[[Resolver, Callable[[], bool]], None]:
        if sign_later is None:
            return self._start_propose(commands.encode_command(commands.OP_SIGN, chain, record))
        return self._start_signed(chain, record, sign_later)

    async def raise_to(self, chain_id: str, record: SignRecord) -> bool:
        """Import a sign state through the log: it only ever raises the mark (S4)."""
        return bool(
            await self._propose(
                commands.encode_command(commands.OP_RAISE, chain_id.encode(), record)
            )
        )

    async def _propose(self, data: bytes, meanwhile: Callable[[int], Any] | None = None) -> Any:
        """Propose ``data`` and return the state machine's result for it; ``meanwhile``
        (index) runs once the entry is on its way, before the wait."""
        return await self._decided(self._start_propose(data, meanwhile))

    def _start_propose(
        self, data: bytes, meanwhile: Callable[[int], Any] | None = None
    ) -> Callable[[Resolver, Callable[[], bool]], None]:
        def start(resolve: Resolver, _expired: Callable[[], bool]) -> None:
            # NotLeader / StateError propagate: nothing proposed.  Queued: every decision
            # of this loop pass (several chains' requests read together) goes to raft-rs
            # as one proposal at the end of the pass - one Ready, one fdatasync, one append
            # to each follower and one acknowledgement back (BENCHMARKS.md: proposing the
            # first one at once gave a one-entry Ready per pass and no lower single-chain
            # latency).
            _term, index = self._node.propose(data, resolve, batch=True)
            self._arm_flush()
            if meanwhile is not None:
                meanwhile(index)

        return start

    def _start_signed(
        self, chain: bytes, record: SignRecord, sign_later: SignLater
    ) -> Callable[[Resolver, Callable[[], bool]], None]:
        """Propose ``record`` once ``sign_later`` has made its signatures
        (off the loop thread; several chains' signatures come back together and their
        decisions are queued in the same pass, so they still share one Raft round).  The
        commit deadline runs from now: signing counts against it.  A failed signing, or
        a deadline passed before the signatures came back, proposes nothing."""

        def start(resolve: Resolver, expired: Callable[[], bool]) -> None:
            def signed(sigs: list[bytes] | None, err: BaseException | None) -> None:
                self._combine_s[chain] = time.perf_counter() - handed
                if expired():
                    return  # the deadline passed: nothing is proposed
                if self._closed:
                    resolve(None, ReplicationError("raft store is not running"))
                    return
                if err is not None or sigs is None:
                    if not isinstance(err, BackendError):
                        err = BackendError(f"signing failed: {err}")
                    resolve(None, err)
                    return
                data = commands.encode_signed(
                    commands.OP_SIGN,
                    chain,
                    record,
                    sigs[0],
                    sigs[1] if record.ext_sign_bytes else b"",
                )
                try:
                    self._node.propose(data, resolve, batch=True)
                except (NotLeader, StateError) as e:  # nothing proposed
                    resolve(None, e)
                    return
                self._arm_flush()

            ext = record.ext_sign_bytes
            handed = time.perf_counter()
            self._combine_s[chain] = 0.0
            sign_later((record.sign_bytes, ext) if ext else (record.sign_bytes,), signed)

        return start

    async def _decided(self, start: Callable[[Resolver, Callable[[], bool]], None]) -> Any:
        """:meth:`_wait` for ``start``'s decision and return its result (raise its error).
        A cancelled wait marks the decision expired: nothing is proposed for it from then
        on (a signature still being made is dropped)."""
        fut: asyncio.Future = self._loop.create_future()

        def answer(result: Any, err: BaseException | None) -> None:
            if not fut.done():
                fut.set_result((result, err))

        waiter = self._wait(start, answer)
        try:
            result, err = await fut
        except asyncio.CancelledError:
            waiter.done = True
            raise
        if err is not None:
            raise err
        return result

    def _wait(
        self,
        start: Callable[[Resolver, Callable[[], bool]], None],
        answer: Resolver,
    ) -> _Waiter:
        """``start(resolve, expired)`` sets a decision on its way; ``answer(result,
        error)`` is called once: with what ``resolve`` gets, or with a timeout error after
        ``commit_timeout``.  The deadline answers first; a late apply then finds
        ``expired()`` and releases nothing (S3).  (The store's deadline queue, not
        asyncio.wait_for: no extra task, no timer handle per decision.)  Raises what
        ``start`` raises (nothing is on its way then)."""
        if self._closed or not self._started:
            raise ReplicationError("raft store is not running")
        loop = self._loop
        waiter = _Waiter(answer)
        # The deadline joins the store's queue (one timer for all of them, see _expire_due).
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done:
            deadlines.popleft()  # answered ones at the head: the queue stays short
        deadlines.append((loop.time() + self.commit_timeout, waiter))
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(deadlines[0][0], self._expire_due)
        try:
            start(waiter.resolve, waiter.expired)
        except BaseException:
            waiter.done = True  # nothing on its way: the queue drops it
            raise
        return waiter

    def _expire_due(self) -> None:
        """The deadline timer: resolve every waiter whose deadline has passed (S3:
        nothing is released for it afterwards), then wait for the next one's.

        ``commit_timeout`` is the same for every decision, so the queue is in deadline
        order; one timer handle at its head replaces a timer per request (arming and
        cancelling one cost ~1.8 µs a request)."""
        self._deadline_timer = None
        deadlines = self._deadlines
        now = self._loop.time()
        while deadlines:
            at, waiter = deadlines[0]
            if not waiter.done:
                if at > now:
                    break
                waiter.resolve(None, _timed_out(self.commit_timeout))
            deadlines.popleft()
        if deadlines and not self._closed:
            self._deadline_timer = self._loop.call_at(deadlines[0][0], self._expire_due)

    def _arm_flush(self) -> None:
        if not self._batch_armed:
            self._batch_armed = True
            self._loop.call_soon(self._flush_batch)

    # -- threshold BLS (nebula.state.threshold) -----------------------------------------

    def combine_seconds(self, chain_id: str) -> float:
        return self._combine_s.get(chain_id.encode(), 0.0)

    async def _commit_threshold(self, chain: bytes, record: SignRecord, key: KeyShare) -> Decision:
        """Decide through the log (TSIGN), then combine t shares over the standing
        decision's sign bytes; nothing is released without t valid shares in time."""
        deadline = self._loop.time() + self.commit_timeout
        hashed: dict[tuple[bytes, ...], Any] = {}
        at: list[int] = []
        self._combine_s[chain] = 0.0  # (a refusal below combines nothing)

        def own(index: int) -> None:
            # While the followers append and sync: H(m) and the group key's half of the
            # verification pairing (measured: precomputing this member's own Lagrange
            # term per possible partner too costs more CPU than it saves, BENCHMARKS.md).
            # A precommit's vote and extension are prepared as one batch: their combined
            # signatures are verified with one pairing check (one Miller loop and one final
            # exponentiation less on the critical path, BENCHMARKS.md).
            at.append(index)
            assert self.tshares is not None
            self.tshares.expect(index)  # shares for this entry are pooled from now on
            msgs = tuple(m for m in (record.sign_bytes, record.ext_sign_bytes) if m)
            hashed[msgs] = key.public.prepare_batch(msgs)

        rec = dataclasses.replace(record, signature=b"", ext_signature=b"")
        try:
            res = await self._propose(
                commands.encode_command(commands.OP_TSIGN, chain, rec), meanwhile=own
            )
            if not isinstance(res, Decision):
                raise StateError(f"raft state machine returned {type(res).__name__}")
            if res.verdict == Verdict.REFUSE or res.record is None:
                return res
            index = at[0]
            stood = res.record
            items = [(stood.sign_bytes, False)]
            if record.ext_sign_bytes:
                items.append((record.ext_sign_bytes, True))
            committed = time.perf_counter()
            sigs = await self._gather(chain, index, key, items, hashed, deadline)
            self._combine_s[chain] = time.perf_counter() - committed
            sig = sigs[0]
            ext_sig = sigs[1] if record.ext_sign_bytes else b""
        finally:
            if at and self.tshares is not None:
                self.tshares.release(at[0])
        out = dataclasses.replace(
            stood,
            signature=sig,
            ext_sign_bytes=record.ext_sign_bytes,
            ext_signature=ext_sig,
        )
        self._combined[chain] = out
        return Decision(res.verdict, record=out, timestamp=res.timestamp, error=res.error)

    async def _gather(
        self,
        chain: bytes,
        index: int,
        key: KeyShare,
        items: list[tuple[bytes, bool]],
        hashed: dict[tuple[bytes, ...], Any],
        deadline: float,
    ) -> list[bytes]:
        """Combine this member's share and the followers' for entry ``index`` over each
        ``(message, is the extension)`` of ``items`` once t valid ones are there for
        every message, waiting for more until ``deadline``."""
        ts = self.tshares
        assert ts is not None
        msgs = tuple(m for m, _ in items)
        prep = hashed.get(msgs)
        if prep is None:  # a retry that differs in the timestamp: the stored bytes
            prep = hashed[msgs] = key.public.prepare_batch(msgs)
        wants = [(digest(m), ext) for m, ext in items]
        name = chain.decode(errors="replace")
        logger.debug("threshold: entry %d needs shares of message %s", index, wants[0][0][:4].hex())

        def bad(member: int) -> None:
            logger.warning(
                "threshold: member %d sent a share for chain %s entry %d that does not "
                "verify against its public share; discarded",
                member,
                name,
                index,
                extra={"event": "bad_share", "member": member, "chain_id": name},
            )
            if self.on_bad_share is not None:
                self.on_bad_share(name, member)

        def arrived() -> tuple[frozenset[int], ...]:
            return tuple(frozenset(ts.candidates(index, w, ext)) for w, ext in wants)

        tried: tuple[frozenset[int], ...] | None = None
        have = 1
        while True:
            if arrived() != tried:  # new shares arrived
                sigs, have = ts.combine_many(index, key, items, bad, prep)
                if sigs is not None:
                    return sigs
                # (after the bad ones were dropped: the next arrival makes a new set)
                tried = arrived()
            left = deadline - self._loop.time()
            if left <= 0 or self._node.role != LEADER:
                raise ReplicationError(
                    f"threshold: {have} of the {key.public.threshold} signature shares "
                    f"needed for entry {index} arrived in time; nothing released"
                )
            fut = self._share_waiters[index] = self._loop.create_future()
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                pass
            finally:
                self._share_waiters.pop(index, None)

    # -- operations --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        node = self._node
        now = time.monotonic()
        members = node.voters
        tstats = self._transport.stats()
        peers: dict[int, Any] = {}
        progress = node.progress()
        for nid in sorted(set(members) | set(self._addrs)):
            if nid == self.node_id or nid not in members:
                continue
            t = self._transport.last_heard(nid)
            st = tstats.get(nid, {})
            pr = progress.get(nid)
            peers[nid] = {
                "address": self._addrs.get(nid),
                "connected": bool(st.get("connected")),
                "last_heard_s": None if t is None else round(now - t, 3),
                "matched": None if pr is None else pr[0],
            }
        role = (
            "stopped" if self._closed or node.fatal else ROLE_NAMES.get(node.role, str(node.role))
        )
        return {
            "node_id": self.node_id,
            "role": role,
            "authoritative": self.is_authoritative(),
            "term": node.term,
            "leader_id": node.leader_id or None,
            "commit_index": node.commit_index,
            "applied_index": node.applied,
            "last_index": node.last_index,
            "snapshot_index": node.snapshot_index,
            "has_quorum": self._quorum_recent(),
            "members": sorted(members),
            "peers": peers,
            "chains": {
                c.decode(errors="replace"): record_to_json(r)
                for c, r in sorted(self._sm.states.items())
            },
            "journal": {
                **self._log.stats(),
                "syncs": node.syncs,
                "syncs_off_loop": node.syncs_offloaded,
                # Readies that appended entries / the entries (a leader's ratio: how many
                # decisions shared a Raft round)
                "appends": node.appends,
                "entries_appended": node.entries_appended,
            },
            "fatal": node.fatal,
        }

    def _check_leader(self) -> None:
        if self._closed or not self._started:
            raise ReplicationError("raft store is not running")
        if self._node.role != LEADER:
            raise NotLeader(f"node {self.node_id} is not the Raft leader")

    def _transfer_target(self, to: int | None) -> int | None:
        """A voter that is live and has every entry of the leader's log, or None."""
        progress = self._node.progress()
        last = self._node.last_index
        since = time.monotonic() - self._quorum_window
        best: int | None = None
        for nid in sorted(self._node.voters):
            if nid == self.node_id or (to is not None and nid != to):
                continue
            pr = progress.get(nid)
            heard = self._transport.last_heard(nid)
            if pr is None or heard is None or heard < since:
                continue  # unreachable, paused or failed closed: it answers nothing
            if pr[0] >= last:
                best = nid
                break
        return best

    async def transfer_leadership(self, to: int | None = None, timeout: float = 5.0) -> int:
        """Hand leadership to ``to`` (or any caught-up follower); returns the new leader.

        Never to a member that is unreachable, failed closed or behind: the transfer
        waits (up to ``timeout``) until the target holds every entry and answers."""
        if to is not None and (to == self.node_id or to not in self._node.voters):
            raise ConfigError(f"raft: cannot transfer leadership to node {to}")
        self._check_leader()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._node.role != LEADER:
                new = self._node.leader_id
                if new and new != self.node_id and (to is None or new == to):
                    return new
                await asyncio.sleep(0.01)
                continue
            target = self._transfer_target(to)
            if target is None or self._node.lead_transferee is not None:
                await asyncio.sleep(0.02)
                continue
            self._node.transfer_leader(target)
            self._kick()
            step = min(deadline, time.monotonic() + 1.5)
            while time.monotonic() < step and self._node.role == LEADER:
                await asyncio.sleep(0.01)
        raise ReplicationError(
            f"raft: leadership transfer{'' if to is None else f' to node {to}'} did not "
            f"complete within {timeout:g}s"
        )

    def _check_membership_allowed(self) -> None:
        if not self.dynamic_membership:
            raise ConfigError("raft: membership changes need dynamic_membership = true")
        self._check_leader()

    async def _conf_change(self, change: int, node_id: int, context: bytes) -> None:
        self._check_membership_allowed()
        fut: asyncio.Future = self._loop.create_future()

        def resolve(result: Any, err: BaseException | None) -> None:
            if not fut.done():
                fut.set_result((result, err))

        self._node.propose_conf_change(change, node_id, context, resolve)
        self._kick()
        try:
            result, err = await asyncio.wait_for(fut, max(self.commit_timeout, 2.0))
        except TimeoutError:
            raise ReplicationError("raft membership change: outcome unknown") from None
        if err is not None:
            raise err
        if result is None:
            raise ReplicationError(
                "raft membership change refused (another change is still pending)"
            )

    #: How long :meth:`add_member` waits for the new member's connection to come up.
    ADD_CONNECT_TIMEOUT = 3.0

    def _live_voters(self, voters: set[int]) -> int:
        """How many of ``voters`` answer now: this node, and each peer heard from within
        the quorum window (as :meth:`_quorum_recent` counts)."""
        since = time.monotonic() - self._quorum_window
        live = 0
        for v in voters:
            if v == self.node_id:
                live += 1
                continue
            t = self._transport.last_heard(v)
            if t is not None and t > since:
                live += 1
        return live

    def _check_quorum_after(self, voters: set[int], what: str, adding: int | None = None) -> None:
        """Refuse a membership change after which the voters ``voters`` (and ``adding``,
        a new member known to answer) would not have a live majority: the cluster could
        then commit nothing, not even the change that undoes it (found in review)."""
        voters = voters - {adding} if adding is not None else voters
        need = (len(voters) + (adding is not None)) // 2 + 1
        live = self._live_voters(voters) + (adding is not None)
        if adding is not None:
            voters = voters | {adding}
        if live < need:
            raise ConfigError(
                f"raft: {what} would leave members {sorted(voters)} with {live} live "
                f"(need {need} for a quorum): the cluster could commit nothing, not even "
                "the change back; bring the down members back first"
            )

    async def add_member(self, node_id: int, address: str) -> None:
        """Add a member (start it first with ``join = true``; run on the leader).

        Refused unless the new member answers at ``address`` as ``node_id`` (its Raft
        connection comes up within :attr:`ADD_CONNECT_TIMEOUT`) and the new membership
        keeps a live majority: a voter that never answers counts in every majority."""
        _parse_addr(address, f"raft member {node_id}")
        if type(node_id) is not int or node_id <= 0:
            raise ConfigError(f"raft: member ids must be positive ints, got {node_id!r}")
        if node_id in self._node.voters:
            raise ConfigError(f"raft: node {node_id} is already a member")
        self._check_membership_allowed()
        had = self._addrs.get(node_id)
        self._addrs[node_id] = address
        self._transport.set_peers(self._peer_addrs(also=node_id))
        try:
            if not await self._transport.wait_connected(node_id, self.ADD_CONNECT_TIMEOUT):
                raise ConfigError(
                    f"raft: node {node_id} is not reachable at {address} (no Raft connection "
                    f"to node {node_id} there within {self.ADD_CONNECT_TIMEOUT:g}s): start it "
                    "first with join = true, and check --id and --addr; not added"
                )
            self._check_quorum_after(
                set(self._node.voters), f"adding node {node_id}", adding=node_id
            )
        except BaseException:
            if node_id not in self._node.voters:
                if had is None:
                    self._addrs.pop(node_id, None)
                else:
                    self._addrs[node_id] = had
                self._transport.set_peers(self._peer_addrs())
            raise
        await self._conf_change(CONF_ADD, node_id, address.encode())

    async def remove_member(self, node_id: int) -> None:
        """Remove a member (not the leader itself: transfer leadership first).  Refused
        when the remaining members would not have a live majority."""
        if node_id == self.node_id:
            raise ConfigError("raft: the leader cannot remove itself; transfer leadership first")
        if node_id not in self._node.voters:
            raise ConfigError(f"raft: node {node_id} is not a member")
        self._check_membership_allowed()
        self._check_quorum_after(set(self._node.voters) - {node_id}, f"removing node {node_id}")
        await self._conf_change(CONF_REMOVE, node_id, b"")

    def compact(self) -> None:
        """Snapshot the state machine now and drop the log before it."""
        self._node.snapshot_now()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._node.fail_pending(ReplicationError("raft store closed"))
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        deadlines, self._deadlines = self._deadlines, collections.deque()
        for _at, waiter in deadlines:
            waiter.resolve(None, ReplicationError("raft store closed"))
        if self._announced:
            self._announced = False
            for cb in list(self._role_callbacks):
                self._loop.call_soon(cb, False)
        try:
            await self._transport.close()
        finally:
            syncer, self._syncer = self._syncer, None
            if syncer is not None:
                syncer.close()  # a sync in flight ends before the log closes
            pool, self._sync_pool = self._sync_pool, None
            if pool is not None:
                pool.shutdown(wait=True)
            self._node.close()
            self._lock.release()
