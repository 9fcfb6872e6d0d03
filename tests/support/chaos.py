"""Seeded chaos: a 3-node Nebula cluster signs a real CometBFT chain through random faults.

Topology (everything on 127.0.0.1)::

    CometBFT (single validator, timeout_commit 200 ms)
        ^ privval
    AuditingRelay  -- records and verifies every signature that leaves the cluster
        ^ dialed by the Raft leader
    node1  node2  node3   (`nebula start` processes; every Raft link i->j through its own
                           fault-injecting Proxy; fault hooks from tests/support/faults)

A ``random.Random(seed)`` draws a sequence of faults, one at a time, each held for a
bounded time and then healed, so a Raft majority is always available:

=====================  ===============================================================
kill                   SIGKILL the leader or a follower; restart it after the hold
pause                  SIGSTOP the leader or a follower; SIGCONT after the hold
partition              cut (RST) or blackhole (silent drop) every Raft link of a node
link_delay             delay every Raft link of a node by 50-300 ms
slow_fsync             fsync/fdatasync sleep 20-250 ms on the leader, a follower or all
clock_jump             a node's wall clock jumps by +-30 s .. 2 days (kept or undone)
garbage                the validator writes garbage into the encrypted stream
disconnect             the validator closes the connection mid-request
validator_restart      SIGKILL the CometBFT node, restart it (WAL replay re-asks votes)
withhold_restart       the relay keeps the next signature from the node, which is then
                       SIGKILLed (half the time with the Nebula leader) and restarted: it
                       asks again for that step with a new timestamp or block
=====================  ===============================================================

During a node fault a validator fault (garbage/disconnect) is sometimes injected too.
After the schedule every fault is healed and the chain must commit 10 more blocks; then
the relay's auditor must hold no conflict and no violation, the chain must carry no
duplicate-vote evidence, every committed precommit must verify with the validator key
and must be one the relay saw leave the cluster.  A single-validator chain never sends
a conflicting vote, so the evidence check alone cannot fail; ``withhold_restart`` is
what makes the node ask twice for one step, and the relay's auditor is the oracle.

The seed fixes the sequence of faults (kinds, targets by role, durations, parameters);
which node is the leader at a given moment, and so the exact interleaving, depends on the
real processes.  Long run::

    python -m tests.support.chaos --seed 7 --minutes 30
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nebula.crypto.keys import generate
from nebula.devnet.cluster import config_version
from nebula.devnet.cometbft import (
    VERIFIERS,
    DevnetError,
    LocalChain,
    ValidatorKey,
    duplicate_vote_evidence,
    signed_commits,
    verify_commit_signatures,
)
from nebula.types import WireFamily
from tests.support.cluster import Auditor, ProcCluster
from tests.support.ports import free_port
from tests.support.relay import GARBAGE_KINDS, AuditingRelay, InjectedFault

__all__ = ["FAULT_WEIGHTS", "ChaosError", "FaultRecord", "Report", "main", "run_chaos"]

FAULTS_PATH = str(Path(__file__).resolve().parent / "faults")
"""Directory with the ``sitecustomize`` fault hooks (put first on a node's PYTHONPATH)."""

FAULT_WEIGHTS: dict[str, int] = {
    "kill_leader": 3,
    "kill_follower": 2,
    "pause_leader": 2,
    "pause_follower": 1,
    "partition_leader": 2,
    "partition_follower": 1,
    "link_delay": 1,
    "slow_fsync": 2,
    "clock_jump": 1,
    "garbage": 2,
    "disconnect": 2,
    "validator_restart": 1,
    "withhold_restart": 3,
}

_SIGNED_KINDS = ("prevote", "precommit", "proposal")

RECOVERY_TIMEOUT_S = 60.0
FINAL_BLOCKS = 10


class ChaosError(Exception):
    """The harness itself could not do what it must (not a finding about Nebula)."""


@dataclass
class FaultRecord:
    index: int
    kind: str
    target: str
    params: dict[str, Any]
    t_apply: float  # seconds since the schedule started
    height_apply: int
    t_heal: float | None = None
    height_heal: int | None = None
    recovery_s: float | None = None  # heal -> first new block
    stall_s: float = 0.0  # longest gap between blocks overlapping [apply, recovered]
    blocks_during: int = 0  # blocks committed between apply and heal
    latency_ms: tuple[float, float] | None = None  # (p50, max) signing latency during it
    unanswered: int = 0  # requests the relay could not answer during it
    extra: list[str] = field(default_factory=list)  # validator faults fired during it

    def line(self) -> str:
        p = " ".join(f"{k}={v}" for k, v in self.params.items())
        heal = f"{self.t_heal - self.t_apply:5.1f}s" if self.t_heal is not None else "  -  "
        rec = f"{self.recovery_s:5.2f}s" if self.recovery_s is not None else "  -  "
        lat = (
            f"{self.latency_ms[0]:6.1f}/{self.latency_ms[1]:7.1f}"
            if self.latency_ms is not None
            else "     -/      -"
        )
        s = (
            f"#{self.index:<3} {self.t_apply:6.1f}s h={self.height_apply:<5} held {heal} "
            f"blocks {self.blocks_during:<3} recovery {rec} stall {self.stall_s:5.2f}s "
            f"lat ms {lat} {self.kind} {self.target} {p}"
        )
        if self.unanswered:
            s += f" unanswered={self.unanswered}"
        for e in self.extra:
            s += f"\n       + {e}"
        return s


@dataclass
class Report:
    seed: int
    version: str
    planned_s: float
    base_dir: str
    wall_s: float = 0.0
    faults: list[FaultRecord] = field(default_factory=list)
    validator_faults: list[str] = field(default_factory=list)
    first_height: int = 0  # when the schedule started
    last_height: int = 0
    blocks: int = 0  # committed during the run (schedule + final blocks)
    signatures: int = 0  # signatures audited by the relay (all of them, from height 1)
    withheld: int = 0  # signatures kept from the node before a restart (withhold_restart)
    asked_again: int = 0  # of those, steps the restarted node asked for again
    conflicts: list[str] = field(default_factory=list)  # double signs / bad signatures
    evidence: int = 0  # DuplicateVoteEvidence in the chain
    verified_precommits: int = 0
    longest_stall_s: float = 0.0
    longest_stall_height: int = 0  # the block that ended it
    extra_rounds: dict[int, int] = field(default_factory=dict)  # height -> commit round > 0
    missed_heights: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    relay: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase

    @property
    def ok(self) -> bool:
        return not self.problems and not self.conflicts

    def format(self) -> str:
        kinds = Counter(f.kind for f in self.faults)
        out = [
            f"chaos seed={self.seed} cometbft={self.version} planned {self.planned_s:.0f}s "
            f"wall {self.wall_s:.0f}s ("
            + ", ".join(f"{k} {v:.0f}s" for k, v in self.phases.items())
            + f") dir={self.base_dir}",
            f"faults: {len(self.faults)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})",
            "  #    at      height   held     blocks  recovery       stall         lat p50/max",
            *("  " + f.line() for f in self.faults),
            f"blocks committed: {self.blocks} (heights {self.first_height}..{self.last_height})",
            f"signatures audited by the relay: {self.signatures}; conflicts: {len(self.conflicts)}; "
            f"duplicate-vote evidence: {self.evidence}; committed precommits verified: "
            f"{self.verified_precommits}",
            f"signatures withheld from the node before a restart: {self.withheld}; steps the "
            f"node asked for again (each a chance to double sign): {self.asked_again}",
            f"longest stall: {self.longest_stall_s:.2f}s (ended by height "
            f"{self.longest_stall_height})",
            f"missed heights: {self.missed_heights} (a single-validator chain cannot skip one); "
            f"heights needing extra rounds: {len(self.extra_rounds)}, extra rounds in total "
            f"{sum(self.extra_rounds.values())}"
            + (
                f" {dict(sorted(self.extra_rounds.items())[:20])}"
                + (" ..." if len(self.extra_rounds) > 20 else "")
                if self.extra_rounds
                else ""
            ),
            f"refusals forwarded to the node: {sum(self.refusals.values())}"
            + (f" {dict(self.refusals.most_common(5))}" if self.refusals else ""),
            "relay: "
            + ", ".join(
                f"{k} {v}" for k, v in self.relay.items() if k not in ("violations", "signatures")
            ),
        ]
        if self.validator_faults:
            out.append("validator faults:")
            out += [f"  {v}" for v in self.validator_faults]
        for c in self.conflicts:
            out.append(f"CONFLICT: {c}")
        for w in self.warnings:
            out.append(f"warning: {w}")
        for p in self.problems:
            out.append(f"PROBLEM: {p}")
        out.append("RESULT: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(out)


def _stopped(pid: int) -> bool:
    """Whether a process is in the stopped (SIGSTOP) state."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


class _Chaos:
    def __init__(
        self,
        seed: int,
        duration_s: float,
        base_dir: Path,
        version: str,
        log: Callable[[str], None],
        timeout_commit: str,
        kinds: Sequence[str] | None,
    ) -> None:
        unknown = set(kinds or ()) - set(FAULT_WEIGHTS)
        if unknown or (kinds is not None and not kinds):
            raise ChaosError(f"unknown fault kinds {sorted(unknown)}; known: {list(FAULT_WEIGHTS)}")
        self.kinds = list(kinds) if kinds else list(FAULT_WEIGHTS)
        self.seed = seed
        self.duration_s = duration_s
        self.base = Path(base_dir)
        self.version = version
        self._print = log
        self.timeout_commit = timeout_commit
        self.rng = random.Random(seed)
        self.report = Report(seed, version, duration_s, str(self.base))
        self.t0 = time.monotonic()
        self.seen_at: dict[int, float] = {}  # height -> monotonic time first seen
        self._stop_monitor = threading.Event()
        self.chain: LocalChain | None = None
        self.cluster: ProcCluster | None = None
        self.relay: AuditingRelay | None = None
        self.auditor: Auditor | None = None
        self.fault_dirs: dict[int, Path] = {}
        self.clock_offsets: dict[int, float] = {}
        self._pending_extra: list[InjectedFault] = []  # validator faults during node faults
        self.withheld: list[tuple[str, int, int]] = []  # steps withheld from the node

    # ---- helpers -----------------------------------------------------------------------

    def log(self, msg: str) -> None:
        self._print(f"[{time.monotonic() - self.t0:7.2f}s] {msg}")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def height(self) -> int:
        return max(self.seen_at, default=0)

    def _monitor(self) -> None:
        chain = self.chain
        last = 0
        while not self._stop_monitor.wait(0.05):
            if chain is None or not chain.is_running():
                continue
            try:
                h = chain.latest_height()
            except DevnetError:
                continue
            if h > last:
                t = time.monotonic()
                for x in range(last + 1, h + 1):
                    self.seen_at.setdefault(x, t)
                last = h

    def _wait_height(self, h: int, timeout: float) -> float | None:
        """Wait until height ``h`` is seen; the monotonic time it was, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.seen_at.get(h)
            if t is not None:
                return t
            time.sleep(0.05)
        return None

    def _knob(self, nid: int, name: str, value: float) -> None:
        path = self.fault_dirs[nid] / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{value}\n")
        tmp.replace(path)

    def _check_hooks(self, nid: int, timeout: float = 20.0) -> None:
        """The fault hooks must be live in node ``nid``'s current process."""
        assert self.cluster is not None
        node = self.cluster.nodes[nid]
        deadline = time.monotonic() + timeout
        marker = self.fault_dirs[nid] / "active"
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if int(marker.read_text()) == node.pid:
                    return
            if not node.alive():
                raise ChaosError(f"node{nid} exited:\n{node.log_tail()}")
            time.sleep(0.05)
        raise ChaosError(f"the fault hooks are not active in node{nid} (pid {node.pid})")

    def _leader(self, timeout: float = 20.0) -> int:
        assert self.cluster is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nid = self.cluster.leader()
            if nid is not None:
                return nid
            time.sleep(0.05)
        raise ChaosError(f"no Raft leader within {timeout}s\n{self.cluster.logs()}")

    def _wait_healthy(self, timeout: float = 30.0) -> bool:
        """Every node up, agreeing on one leader, and caught up to its commit index."""
        assert self.cluster is not None
        cluster = self.cluster
        deadline = time.monotonic() + timeout
        target: int | None = None
        while time.monotonic() < deadline:
            sts = [cluster.status(nid) for nid in cluster.nodes]
            up = [st for st in sts if st is not None]
            leaders = {st.get("leader_id") for st in up}
            lead = [st for st in up if st.get("role") == "leader"]
            if len(up) == len(sts) and len(leaders) == 1 and len(lead) == 1:
                if target is None:
                    target = int(lead[0]["commit_index"])
                if all(int(st["commit_index"]) >= target for st in up):
                    return True
            time.sleep(0.1)
        return False

    def _pick(self, role: str) -> int:
        assert self.cluster is not None
        leader = self._leader()
        if role == "leader":
            return leader
        return self.rng.choice(sorted(n for n in self.cluster.nodes if n != leader))

    def _links(self, nid: int):  # type: ignore[no-untyped-def]
        assert self.cluster is not None
        return [p for (i, j), p in self.cluster.proxies.items() if nid in (i, j)]

    def _validator_fault(self) -> InjectedFault:
        assert self.relay is not None
        if self.rng.random() < 0.5:
            kind = self.rng.choice(GARBAGE_KINDS)
            pos = self.rng.choice(("before", "after"))
            return self.relay.inject_garbage(kind, pos)
        return self.relay.inject_disconnect(self.rng.choice((0.0, 0.0005, 0.001, 0.003, 0.01)))

    def _wait_fired(self, f: InjectedFault, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f.fired_at is not None and ("answered" in f.outcome):
                return
            time.sleep(0.02)

    # ---- one fault ---------------------------------------------------------------------

    def _hold(self, seconds: float, rec: FaultRecord, extra_ok: bool) -> None:
        """Sleep ``seconds``; maybe inject a validator fault in the middle."""
        if extra_ok and self.rng.random() < 0.35:
            a = self.rng.uniform(0, seconds)
            time.sleep(a)
            f = self._validator_fault()
            self.log(f"  + validator fault armed during #{rec.index}: {f.kind} {f.params}")
            time.sleep(max(0.0, seconds - a))
            rec.extra.append(f.describe())
            self._pending_extra.append(f)
        else:
            time.sleep(seconds)

    def _apply(self, index: int, kind: str) -> FaultRecord:
        assert self.cluster is not None and self.relay is not None and self.chain is not None
        rng, cluster = self.rng, self.cluster
        rec = FaultRecord(index, kind, "", {}, self.now(), self.height())
        hold = 0.0
        if kind in ("kill_leader", "kill_follower"):
            nid = self._pick(kind.split("_")[1])
            hold = round(rng.uniform(0.3, 4.0), 2)
            rec.target = f"node{nid} ({kind.split('_')[1]})"
            self.log(f"fault #{index}: SIGKILL {rec.target}, restart after {hold}s")
            rec.t_apply, rec.height_apply = self.now(), self.height()
            cluster.nodes[nid].kill()
            self._hold(hold, rec, True)
            cluster.nodes[nid].start()
            self._check_hooks(nid)
        elif kind in ("pause_leader", "pause_follower"):
            nid = self._pick(kind.split("_")[1])
            hold = round(rng.uniform(0.3, 5.0), 2)
            rec.target = f"node{nid} ({kind.split('_')[1]})"
            self.log(f"fault #{index}: SIGSTOP {rec.target} for {hold}s")
            rec.t_apply, rec.height_apply = self.now(), self.height()
            cluster.nodes[nid].signal(signal.SIGSTOP)
            try:
                self._hold(hold, rec, True)
            finally:
                cluster.nodes[nid].signal(signal.SIGCONT)
        elif kind in ("partition_leader", "partition_follower"):
            nid = self._pick(kind.split("_")[1])
            mode = rng.choice(("cut", "blackhole"))
            hold = round(rng.uniform(0.5, 6.0), 2)
            rec.target = f"node{nid} ({kind.split('_')[1]})"
            rec.params = {"mode": mode}
            self.log(f"fault #{index}: partition {rec.target} from its peers ({mode}) for {hold}s")
            rec.t_apply, rec.height_apply = self.now(), self.height()
            for p in self._links(nid):
                p.cut() if mode == "cut" else p.blackhole()
            try:
                self._hold(hold, rec, True)
            finally:
                for p in self._links(nid):
                    p.heal()
        elif kind == "link_delay":
            nid = self._pick(rng.choice(("leader", "follower")))
            ms = rng.randrange(50, 301)
            hold = round(rng.uniform(1.0, 5.0), 2)
            rec.target, rec.params = f"node{nid}", {"ms": ms}
            self.log(f"fault #{index}: delay every Raft link of node{nid} by {ms} ms for {hold}s")
            rec.t_apply, rec.height_apply = self.now(), self.height()
            for p in self._links(nid):
                p.delay(ms)
            try:
                self._hold(hold, rec, True)
            finally:
                for p in self._links(nid):
                    p.heal()
        elif kind == "slow_fsync":
            who = rng.choice(("leader", "follower", "all"))
            ms = rng.randrange(20, 251)
            hold = round(rng.uniform(1.5, 6.0), 2)
            nids = sorted(cluster.nodes) if who == "all" else [self._pick(who)]
            rec.target = "all nodes" if who == "all" else f"node{nids[0]} ({who})"
            rec.params = {"ms": ms}
            self.log(f"fault #{index}: fsync +{ms} ms on {rec.target} for {hold}s")
            rec.t_apply, rec.height_apply = self.now(), self.height()
            for nid in nids:
                self._knob(nid, "fsync_delay_ms", ms)
            try:
                self._hold(hold, rec, True)
            finally:
                for nid in nids:
                    self._knob(nid, "fsync_delay_ms", 0)
        elif kind == "clock_jump":
            nid = self._pick(rng.choice(("leader", "follower")))
            offset = rng.choice((1, -1)) * round(rng.uniform(30, 2 * 86400), 1)
            keep = rng.random() < 0.5
            hold = round(rng.uniform(1.0, 4.0), 2)
            rec.target, rec.params = f"node{nid}", {"offset_s": offset, "kept": keep}
            self.log(
                f"fault #{index}: node{nid} wall clock jumps {offset:+.0f}s for {hold}s"
                + (" (left jumped)" if keep else "")
            )
            rec.t_apply, rec.height_apply = self.now(), self.height()
            self._knob(nid, "clock_offset_s", offset)
            self._hold(hold, rec, True)
            if not keep:
                self._knob(nid, "clock_offset_s", 0)
            self.clock_offsets[nid] = offset if keep else 0.0
        elif kind in ("garbage", "disconnect"):
            if kind == "garbage":
                f = self.relay.inject_garbage(
                    rng.choice(GARBAGE_KINDS), rng.choice(("before", "after"))
                )
            else:
                f = self.relay.inject_disconnect(rng.choice((0.0, 0.0005, 0.001, 0.003, 0.01)))
            rec.target, rec.params = "validator -> leader", dict(f.params)
            self.log(f"fault #{index}: validator {f.kind} {f.params}")
            rec.t_apply, rec.height_apply = self.now(), self.height()
            self._wait_fired(f)
            rec.extra.append(f.describe())
            self.report.validator_faults.append(f"#{index} {f.describe()}")
        elif kind == "validator_restart":
            hold = round(rng.uniform(0.2, 2.5), 2)
            rec.target = "cometbft"
            self.log(f"fault #{index}: SIGKILL the CometBFT node, restart after {hold}s")
            rec.t_apply, rec.height_apply = self.now(), self.height()
            self.chain.kill()
            time.sleep(hold)
            self.chain.start()
            self.chain.wait_for_rpc(timeout=60)
        elif kind == "withhold_restart":
            # The oracle's own fault: the relay keeps one signature from the node, which
            # is then killed (half the time with the Nebula leader) and restarted.  It
            # asks again for that step with a new timestamp or block; a second, different
            # signature there is a double sign the relay's auditor records.
            kinds = rng.choice((("prevote",), ("precommit",), ("proposal",), _SIGNED_KINDS))
            with_leader = rng.random() < 0.5
            hold = round(rng.uniform(0.2, 2.0), 2)
            rec.target = "cometbft" + (" and the leader" if with_leader else "")
            rec.params = {"kinds": "/".join(kinds)}
            self.log(
                f"fault #{index}: withhold the next {'/'.join(kinds)} signature, then SIGKILL "
                f"{rec.target}, restart after {hold}s"
            )
            rec.t_apply, rec.height_apply = self.now(), self.height()
            got = self.relay.withhold_next_signature(kinds)
            if not got.wait(30):
                raise ChaosError(f"no {'/'.join(kinds)} signature to withhold within 30 s")
            leader = self._leader() if with_leader else None
            self.chain.kill()
            if leader is not None:
                cluster.nodes[leader].kill()
            assert self.relay.withheld is not None
            name, hh, rr = self.relay.withheld.split()
            step = (name, int(hh[2:]), int(rr[2:]))
            self.withheld.append(step)
            rec.params["withheld"] = self.relay.withheld
            if leader is not None:
                rec.params["leader"] = f"node{leader}"
            time.sleep(hold)
            if leader is not None:
                cluster.nodes[leader].start()
                self._check_hooks(leader)
            self.chain.start()
            self.chain.wait_for_rpc(timeout=60)
        else:
            raise ChaosError(f"unknown fault kind {kind!r}")
        rec.t_heal, rec.height_heal = self.now(), self.height()
        self.log(f"  healed #{index} at height {rec.height_heal}")
        return rec

    # ---- the run -----------------------------------------------------------------------

    def run(self) -> Report:
        rep = self.report
        started = time.monotonic()
        monitor = threading.Thread(target=self._monitor, name="chaos-monitor", daemon=True)
        try:
            self._setup()
            monitor.start()
            if self._wait_height(2, 90) is None:
                raise ChaosError("the chain did not reach height 2")
            self.t0 = time.monotonic()
            rep.first_height = self.height()
            self.log(f"schedule starts at height {rep.first_height} (seed {self.seed})")
            rep.phases["setup"] = time.monotonic() - started
            self._schedule()
            rep.phases["faults"] = self.now()
            t = time.monotonic()
            self._finish()
            rep.phases["final checks"] = time.monotonic() - t
        except ChaosError as e:
            rep.problems.append(f"harness: {e}")
        finally:
            self._stop_monitor.set()
            if monitor.is_alive():
                monitor.join(5)
            t = time.monotonic()
            self._teardown()
            rep.phases["teardown"] = time.monotonic() - t
            rep.wall_s = time.monotonic() - started
        return rep

    def _setup(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        key = generate("ed25519")
        port = free_port()
        laddr = f"tcp://127.0.0.1:{port}"
        self.chain = LocalChain.create(
            self.base,
            self.version,
            validator=ValidatorKey("ed25519", key.public_key),
            priv_validator_laddr=laddr,
            timeout_commit=self.timeout_commit,
        )
        self.auditor = Auditor("ed25519", key.public_key)
        family = WireFamily.from_config(config_version(self.version))
        self.relay = AuditingRelay(
            laddr,
            self.auditor,
            family,
            rng=random.Random(self.seed * 7919 + 1),
            log=self.log,
        ).start()
        for nid in (1, 2, 3):
            d = self.base / "faults" / f"node{nid}"
            d.mkdir(parents=True, exist_ok=True)
            self.fault_dirs[nid] = d
            self._knob(nid, "fsync_delay_ms", 0)
            self._knob(nid, "clock_offset_s", 0)

        def env(nid: int) -> dict[str, str]:
            return {"PYTHONPATH": FAULTS_PATH, "NEBULA_FAULTS_DIR": str(self.fault_dirs[nid])}

        self.cluster = ProcCluster(
            self.base / "nebula",
            3,
            key=key,
            chain_id=self.chain.chain_id,
            connections=[self.relay.listen_address],
            version=config_version(self.version),
            proxied=True,
            node_env=env,
        )
        self.cluster.start()
        for nid in self.cluster.nodes:
            self._check_hooks(nid)
        self._leader(30)
        self.chain.start()
        self.log(f"cluster up, chain {self.chain.chain_id} ({self.version}) started")

    def _schedule(self) -> None:
        rep = self.report
        kinds = self.kinds
        weights = [FAULT_WEIGHTS[k] for k in kinds]
        index = 0
        while self.now() < self.duration_s:
            if not self._wait_healthy():
                rep.problems.append(
                    f"the cluster did not converge (one leader, all caught up) within 30 s "
                    f"before fault #{index + 1}"
                )
                return
            index += 1
            kind = self.rng.choices(kinds, weights)[0]
            rec = self._apply(index, kind)
            rep.faults.append(rec)
            h = rec.height_heal or 0
            t_next = self._wait_height(h + 2, RECOVERY_TIMEOUT_S)
            if t_next is None:
                rep.problems.append(
                    f"the chain did not commit 2 blocks within {RECOVERY_TIMEOUT_S:.0f}s after "
                    f"fault #{index} ({kind} {rec.target}) was healed (stuck at {self.height()})"
                )
                return
            first = self.seen_at.get(h + 1, t_next)
            rec.recovery_s = max(0.0, first - self.t0 - (rec.t_heal or 0.0))
            time.sleep(self.rng.uniform(0.3, 2.0))

    def _assert_healed(self) -> None:
        assert self.cluster is not None and self.chain is not None and self.relay is not None
        rep = self.report
        for (i, j), p in self.cluster.proxies.items():
            if p.mode != "pass" or p._delay:
                rep.problems.append(f"link {i}->{j} not healed ({p.mode}, delay {p._delay})")
        for nid, node in self.cluster.nodes.items():
            if not node.alive():
                rep.problems.append(f"node{nid} is not running")
            elif _stopped(node.pid):
                rep.problems.append(f"node{nid} is still stopped")
            if (self.fault_dirs[nid] / "fsync_delay_ms").read_text().strip() not in ("0", "0.0"):
                rep.problems.append(f"node{nid} fsync still slowed")
        if not self.chain.is_running():
            rep.problems.append("the CometBFT node is not running")
        if self.relay.pending_faults():
            rep.warnings.append(f"{self.relay.pending_faults()} validator fault(s) never fired")

    def _finish(self) -> None:
        assert self.cluster is not None and self.chain is not None and self.relay is not None
        rep, chain = self.report, self.chain
        self._assert_healed()
        kept = {n: o for n, o in self.clock_offsets.items() if o}
        self.log(
            "all faults healed"
            + (f" (clocks left jumped: {kept})" if kept else "")
            + f"; waiting for {FINAL_BLOCKS} more blocks"
        )
        h_end = self.height()
        # A chain already found stuck gets a short last chance, not another full minute.
        wait = 15.0 if rep.problems else RECOVERY_TIMEOUT_S
        if self._wait_height(h_end + FINAL_BLOCKS, wait) is None:
            rep.problems.append(
                f"after healing, the chain did not commit {FINAL_BLOCKS} blocks within "
                f"{wait:.0f}s (stuck at {self.height()})"
            )
        for f in self._pending_extra:
            rep.validator_faults.append(f"(during a node fault) {f.describe()}")
        last = chain.latest_height()
        rep.last_height = last
        rep.blocks = last - rep.first_height
        # Stalls, per fault and overall (from the monitor's first sightings).
        hs = sorted(h for h in self.seen_at if h >= rep.first_height)
        gaps = [
            (self.seen_at[a] - self.t0, self.seen_at[b] - self.t0, b)
            for a, b in itertools.pairwise(hs)
        ]
        if gaps:
            longest = max(gaps, key=lambda g: g[1] - g[0])
            rep.longest_stall_s = longest[1] - longest[0]
            rep.longest_stall_height = longest[2]
        for f in rep.faults:
            end = (f.t_heal or f.t_apply) + (f.recovery_s or 0.0)
            over = [b - a for a, b, _ in gaps if b > f.t_apply and a < end]
            f.stall_s = max(over, default=0.0)
            f.blocks_during = max(0, (f.height_heal or f.height_apply) - f.height_apply)
            reqs = self.relay.requests_between(
                self.t0 + f.t_apply, self.t0 + (f.t_heal or f.t_apply)
            )
            lat = [r.latency_s * 1000 for r in reqs if r.latency_s is not None]
            if lat:
                f.latency_ms = (statistics.median(lat), max(lat))
            f.unanswered = sum(r.latency_s is None for r in reqs)
        # The chain's view: every precommit verifies and is one the relay saw leave.
        try:
            verified = verify_commit_signatures(
                chain, self.auditor.public_key, "ed25519", range(1, last), VERIFIERS["ed25519"]
            )
            rep.verified_precommits = len(verified)
            for v in verified:
                if v.signature not in self.relay.signatures(chain.chain_id, v.height, v.round, 3):
                    rep.conflicts.append(
                        f"the precommit committed at height {v.height} round {v.round} never "
                        f"passed the relay"
                    )
        except DevnetError as e:
            rep.problems.append(f"commit signatures: {e}")
        rep.evidence = len(duplicate_vote_evidence(chain, 1, last))
        if rep.evidence:
            rep.conflicts.append(f"{rep.evidence} DuplicateVoteEvidence in the chain")
        rep.extra_rounds = {c.height: c.round for c in signed_commits(chain, 1, last) if c.round}
        rep.withheld = len(self.withheld)
        rep.asked_again = sum(len(self.relay.requests_for(*step)) >= 2 for step in self.withheld)
        snap = self.relay.snapshot()
        rep.signatures = snap["signatures"]
        rep.conflicts += snap["violations"]
        rep.relay = snap
        with self.relay._lock:
            refusals = list(self.relay.refusals)
        rep.refusals = Counter(r.split(": ", 1)[-1][:60] for r in refusals)
        for nid, node in self.cluster.nodes.items():
            text = node.log_text()
            n = text.count("Traceback")
            if n:
                rep.warnings.append(f"node{nid} log has {n} traceback(s)")
        st = [self.cluster.status(n) for n in self.cluster.nodes]
        fatal = [s.get("fatal") for s in st if s and s.get("fatal")]
        if fatal:
            rep.problems.append(f"a node reports a fatal error: {fatal}")

    def _teardown(self) -> None:
        # The node first: without its signer it would take 10 s to stop.
        if self.chain is not None:
            with contextlib.suppress(Exception):
                self.chain.stop()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                self.relay.stop()
        if self.cluster is not None:
            for nid in self.fault_dirs:
                with contextlib.suppress(OSError):
                    self._knob(nid, "fsync_delay_ms", 0)
            with contextlib.suppress(Exception):
                self.cluster.stop()


def run_chaos(
    seed: int,
    duration_s: float,
    base_dir: Path,
    version: str = "v0.38.25",
    *,
    timeout_commit: str = "200ms",
    faults: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Run the seeded fault schedule for ``duration_s`` seconds; return the report.

    ``faults`` restricts the schedule to some kinds of :data:`FAULT_WEIGHTS` (default
    all). Every process is stopped before this returns (also on failure). ``report.ok`` is
    False when a conflict was found or a check failed (``report.problems``); a
    :class:`GoToolchainMissing` from building CometBFT propagates.
    """
    return _Chaos(seed, duration_s, Path(base_dir), version, log, timeout_commit, faults).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.chaos",
        description="Seeded fault injection: a 3-node Nebula cluster signs a real CometBFT "
        "chain through kills, pauses, partitions, slow fsync, clock jumps and a hostile "
        "validator; every signature is audited.",
    )
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--version", default="v0.38.25", help="CometBFT version")
    ap.add_argument("--base-dir", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the directory even when ok")
    ap.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated fault kinds (default all): {','.join(FAULT_WEIGHTS)}",
    )
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    base = args.base_dir or Path(tempfile.mkdtemp(prefix="nebula-chaos-"))
    print(f"chaos: seed {seed}, {args.minutes} min, logs in {base}", flush=True)
    report = run_chaos(
        seed,
        args.minutes * 60,
        base,
        args.version,
        faults=args.faults.split(",") if args.faults else None,
        log=lambda s: print(s, flush=True),
    )
    print(report.format(), flush=True)
    if report.ok and not args.keep and args.base_dir is None:
        shutil.rmtree(base, ignore_errors=True)
    elif not report.ok:
        print(f"logs kept in {base}", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
