"""Attacks on a Raft cluster of real processes (issue 11), audited for double signs.

* the stale-frame attack through a frame-holding proxy (tests/support/frameproxy.py):
  hold one leader -> follower frame, close only the leader's side of that connection,
  commit X with the follower on the new connection, deliver the stale frame on the old
  one, pause the leader and let the lagging third node ask for votes: X stays, and a
  conflicting Y for X's height/round/step is never accepted;
* a follower that missed 5,000+ entries catches up from the leader's snapshot and can
  then lead;
* 1,000 idle unauthenticated connections to one member whose descriptor limit makes
  ``accept()`` fail with EMFILE: the cluster keeps committing, and afterwards the
  member still accepts and authenticates its peers;
* garbage, a wrong secret and oversized lengths on the Raft port: refused, the cluster
  keeps committing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

from nebula.raft.transport import MAGIC
from tests.integration.conftest import audit
from tests.support.frameproxy import FrameProxy, hello_bytes, raw_exchange
from tests.support.raftnode import Cluster, NodeDead, NodeProcess

pytestmark = pytest.mark.timeout(150)

CHAIN = "test-chain"


def wait(cond: Any, timeout: float, what: str, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(every)


def state(p: NodeProcess) -> tuple[int, bytes] | None:
    """(height, sign bytes) of the chain in ``p``'s state machine."""
    st = p.status().get("chains", {}).get(CHAIN)
    return None if st is None else (int(st["height"]), bytes.fromhex(st["signbytes"]))


# ---- a) the stale frame on a superseded connection -------------------------------------


def test_a_stale_frame_on_a_superseded_connection_cannot_undo_a_committed_decision(
    cluster_factory,  # type: ignore[no-untyped-def]
) -> None:
    # L = node 1, F = node 2, G = node 3.  F's election timeout is long, so once L is
    # paused G's (pre-)vote requests reach F before F campaigns itself.
    c = cluster_factory(3, proxies=FrameProxy)
    slow = {"election_timeout_min": 1.5, "election_timeout_max": 2.0}
    for i in c.ids:
        c.start(i, wait=False, store=slow if i == 2 else None)
    for p in c.nodes.values():
        p.wait_ready()
    leader = c.wait_leader()
    if leader.node_id != 1:
        assert leader.request("transfer", to=1, timeout=10).get("leader") == 1
        leader = c.wait_leader()
    assert leader.node_id == 1
    f, g = c.nodes[2], c.nodes[3]
    for h in range(1, 4):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    pad = bytes(300)  # entries large enough to tell an append from a heartbeat by size
    px: FrameProxy = c.proxies[(leader.node_id, f.node_id)]

    # 1. Hold the L -> F append of W (it commits with G), close only L's side.
    held = px.hold_next(min_len=len(pad))
    assert leader.commit(9, b"W" + pad)["verdict"] == "ACCEPT"
    assert held.wait(3), "no append to F was caught"
    assert held.conn is not None and not held.conn.upstream_closed.is_set()
    px.close_dialer_side(held.conn)

    # 2. G lags from now on; L reconnects to F and commits X with F (ACCEPT released).
    c.isolate(g.node_id)
    x = b"X" + pad
    xr = leader.commit(10, x, timeout=10)
    assert xr["verdict"] == "ACCEPT", xr
    x_index = leader.status()["commit_index"]
    assert state(g) != (10, x)  # G really lags: it never saw X

    # 3. The stale frame, delivered to F on the old connection.
    released = px.release(held)
    wait(lambda: state(f) == (10, x), 3, "F applies X")
    fst = f.status()
    assert fst["fatal"] is None and fst["last_index"] >= x_index and fst["commit_index"] >= x_index

    # 4. Pause L, let G back: G asks F for votes.  Y is queued at the paused L too.
    y = b"Y" + pad
    leader.signal(signal.SIGSTOP)
    late: list[Any] = []
    sender = threading.Thread(
        target=lambda: late.append(_try(lambda: leader.commit(10, y, timeout=15))), daemon=True
    )
    sender.start()
    c.heal()
    observed: list[tuple[int, str, Any]] = []
    deadline = time.monotonic() + 10
    new = None
    while time.monotonic() < deadline:
        for p in (f, g):
            with contextlib.suppress(TimeoutError, NodeDead):
                st = p.status(0.5)
                ch = st["chains"].get(CHAIN)
                observed.append((p.node_id, st["role"], ch and int(ch["height"])))
                if st["authoritative"]:
                    new = p
        if new is not None:
            break
        time.sleep(0.02)
    assert new is not None, observed
    # G asked for votes, and no node ever led without X.
    assert any(nid == g.node_id and "candidate" in role for nid, role, _h in observed), observed
    assert all(h == 10 for _nid, role, h in observed if role == "leader"), observed
    assert state(new) == (10, x)
    # 5. Y at X's height/round/step, on whoever leads: refused.
    yr = new.commit(10, y)
    assert yr["verdict"] == "REFUSE" and yr["refusal"] == "DoubleSignRefused", yr
    assert new.commit(11, b"b11")["verdict"] == "ACCEPT"

    # L wakes up: its queued Y is not accepted, it follows the new leader.
    leader.signal(signal.SIGCONT)
    sender.join(20)
    assert late and (not isinstance(late[0], dict) or late[0].get("verdict") != "ACCEPT"), late
    lead = c.wait_leader()
    assert lead.commit(10, y)["verdict"] == "REFUSE"
    rel = audit(c)
    assert rel[(CHAIN, 10, 0, 2)] == x
    wait(lambda: all(state(p) == (11, b"b11") for p in c.nodes.values()), 10, "converged")
    # F, the node the stale frame was aimed at, still holds X at its index.
    assert f.status()["fatal"] is None
    print(f"\nstale frame released on the old connection: {released}")


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:
        return e


# ---- b) catch-up by snapshot, then lead ------------------------------------------------


def test_a_follower_that_missed_5000_entries_catches_up_by_snapshot_and_can_lead(
    cluster_factory,  # type: ignore[no-untyped-def]
) -> None:
    # Snapshots every 1,000 entries: 5,200 entries later the leader's log has dropped
    # what the lagging member needs.
    c = cluster_factory(3, store={"snapshot_entries": 1000})
    c.start()
    leader = c.wait_leader()
    assert leader.commit(1, b"b1")["verdict"] == "ACCEPT"
    lag = next(p for p in c.nodes.values() if p is not leader)
    behind = wait(lambda: lag.status()["applied_index"] >= 3 and lag.status(), 3, "lag applied")
    lag.kill()
    n = 5200
    out = leader.request("bench", n=n, start=2, chain=CHAIN, timeout=120)
    assert out.get("not_accepted") == 0, out
    top = n + 1
    st = leader.status()
    assert st["chains"][CHAIN]["height"] == str(top)
    # The leader's log no longer holds what the follower needs: only a snapshot helps.
    assert st["journal"]["first_index"] > behind["last_index"] + 4000, st["journal"]
    c.start(lag.node_id)
    lag = c.nodes[lag.node_id]
    lst = wait(
        lambda: (s := lag.status())["applied_index"] >= st["commit_index"] and s,
        20,
        "the lagging node catches up",
    )
    assert lst["fatal"] is None and lst["role"] == "follower"
    assert lst["snapshot_index"] >= st["snapshot_index"] > behind["last_index"] + 4000, lst
    assert lst["chains"][CHAIN]["height"] == str(top)
    # It can lead: leadership moves to it and it commits.
    assert leader.request("transfer", to=lag.node_id, timeout=10).get("leader") == lag.node_id
    new = c.wait_leader()
    assert new is lag
    assert lag.commit(top, b"conflict")["verdict"] == "REFUSE"
    assert lag.commit(top - 100, b"old")["verdict"] == "REFUSE"
    for h in range(top + 1, top + 21):
        assert lag.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    wait(
        lambda: (
            all(s["chains"][CHAIN]["height"] == str(top + 20) for s in c.statuses().values())
            and len(c.statuses()) == 3
        ),
        10,
        "all nodes follow the new leader",
    )
    assert all(s["fatal"] is None for s in c.statuses().values())
    audit(c)


# ---- c) idle connections and descriptor pressure ---------------------------------------


class Committer(threading.Thread):
    """Commits increasing heights on whichever node leads, ``pace`` seconds apart."""

    def __init__(self, cluster: Cluster, pace: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.pace = pace
        self.done = threading.Event()
        self.accepted: list[float] = []
        self.height = 1
        self.leader: NodeProcess | None = None

    def run(self) -> None:
        attempt = 0
        while not self.done.is_set():
            if self.leader is None:
                for p in self.cluster.live():
                    with contextlib.suppress(TimeoutError, NodeDead):
                        if p.status(0.5)["authoritative"]:
                            self.leader = p
                            break
                if self.leader is None:
                    time.sleep(0.05)
                    continue
            try:
                r = self.leader.commit(self.height, b"h%d-a%d" % (self.height, attempt), timeout=2)
            except (TimeoutError, NodeDead):
                self.leader, attempt = None, attempt + 1
                continue
            if r.get("verdict") in ("ACCEPT", "REFUSE"):
                if r["verdict"] == "ACCEPT":
                    self.accepted.append(time.monotonic())
                self.height, attempt = self.height + 1, 0
                time.sleep(self.pace)
            else:
                self.leader, attempt = None, attempt + 1

    def stop(self) -> None:
        self.done.set()
        self.join(10)

    def gaps(self, t0: float, t1: float) -> float:
        """The longest time without an accepted commit in [t0, t1]."""
        ts = [t0, *(t for t in self.accepted if t0 <= t <= t1), t1]
        return max(b - a for a, b in itertools.pairwise(ts))


def _flood(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connections_and_descriptor_pressure_do_not_stop_the_cluster(
    cluster_factory,  # type: ignore[no-untyped-def]
) -> None:
    pressured = 1
    limit = 48
    c = cluster_factory(
        3,
        proxies=True,
        store={"handshake_timeout": 1.0, "snapshot_entries": 1000},
        nofile={pressured: limit},
    )
    c.start()
    p = c.nodes[pressured]
    leader = c.wait_leader()
    if leader is p:  # flood a follower: cutting its links below must not stall commits
        assert "error" not in p.request("transfer", timeout=10)
        leader = c.wait_leader(exclude={pressured})
    base = _fds(p.proc.pid)
    assert base < limit - 10, f"node uses {base} descriptors already (limit {limit})"
    # Paced: fewer than snapshot_entries (1000) commits in the whole test, so the
    # pressured member takes no snapshot while flooded (that one fails it for good:
    # test_a_snapshot_during_descriptor_pressure_does_not_stop_the_member_for_good).
    committer = Committer(c, pace=0.02)
    committer.start()
    socks: list[socket.socket] = []
    try:
        wait(lambda: len(committer.accepted) >= 10, 10, "commits before the flood")
        t0 = time.monotonic()
        socks = _flood(c.ports[pressured], 1000)
        # Under the flood, the pressured member's peers reconnect (its links are cut
        # and healed): they must get through the accept queue and authenticate.
        time.sleep(1.0)
        for (a, b), px in c.proxies.items():
            if pressured in (a, b):
                px.cut()
        time.sleep(0.3)
        c.heal()
        time.sleep(2.5)
        t1 = time.monotonic()
        during = [t for t in committer.accepted if t0 <= t <= t1]
        lst = p.request("transport")["listener"]
    finally:
        for s in socks:
            s.close()
    try:
        assert len(during) >= 20, f"{len(during)} commits during the flood"
        assert committer.gaps(t0, t1) < 2.5, f"no commit for {committer.gaps(t0, t1):.2f}s"
        # The pressure was real: accept() failed for want of descriptors, the listener
        # stayed up and kept evicting idle connections.
        assert lst["accept_pauses"] > 0 and lst["listening"], lst
        assert lst["accepted"] >= 50 and lst["evicted"] + lst["handshake_timeouts"] > 0, lst
        # After the flood: the third node isolated, the pressured one is a required
        # member of every majority - its peers must connect to it and authenticate.
        third = next(i for i in c.ids if i != pressured and c.nodes[i].alive)
        for (a, b), px in c.proxies.items():
            if pressured in (a, b):
                px.cut()
        time.sleep(0.3)
        c.heal()
        c.isolate(third)
        t2 = time.monotonic()
        n0 = len(committer.accepted)
        wait(lambda: len(committer.accepted) >= n0 + 20, 20, "commits with the pressured member")
        print(
            f"\nflood: {len(during)} commits in {t1 - t0:.1f}s, longest gap "
            f"{committer.gaps(t0, t1):.2f}s; listener {lst}; "
            f"after: 20 commits with node {pressured} required in {time.monotonic() - t2:.2f}s"
        )
        st = p.status()
        assert st["fatal"] is None and st["peers"], st
        c.heal()
    finally:
        committer.stop()
    audit(c)


# ---- d) garbage, wrong secret, oversized lengths ---------------------------------------


def test_garbage_wrong_secret_and_oversized_lengths_are_refused(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3, store={"handshake_timeout": 1.0})
    c.start()
    leader = c.wait_leader()
    height = 1
    assert leader.commit(height, b"b1")["verdict"] == "ACCEPT"
    wrong = b"not-the-cluster-secret-0123456789"
    for me in c.ids:
        port = c.ports[me]
        peer = next(i for i in c.ids if i != me)
        before = c.nodes[me].request("transport")["listener"]
        nonce = os.urandom(32)
        refused = {
            "garbage": raw_exchange(port, hello=os.urandom(300)),
            "bad magic": raw_exchange(port, hello=b"XXXX" + hello_bytes(peer, me, nonce)[4:]),
            "not addressed to it": raw_exchange(port, hello=hello_bytes(peer, me + 100, nonce)),
            "not a peer": raw_exchange(port, hello=hello_bytes(77, me, nonce)),
            "wrong secret": raw_exchange(
                port, hello=hello_bytes(peer, me, nonce), secret=wrong, ids=(peer, me),
                then=[("auth",), ("frame", b"\x01" + os.urandom(40))],
            ),
            "oversized length before authentication": raw_exchange(
                port, hello=hello_bytes(peer, me, nonce),
                then=[b"\xff\xff\xff\xff" + os.urandom(1000)],
            ),
            "authenticator of the wrong size": raw_exchange(
                port, hello=hello_bytes(peer, me, nonce), then=[b"\x00\x00\x01\x00" + bytes(256)]
            ),
        }  # fmt: skip
        for what, ex in refused.items():
            assert ex.closed, f"{what}: connection kept open"
            # a hello that is not for it gets nothing; a good hello gets the nonce only
            assert len(ex.received) in (0, 32), (what, ex)
        assert refused["garbage"].received == b"" and refused["not a peer"].received == b""
        assert len(refused["wrong secret"].received) == 32
        # Silence after the hello: closed at the handshake deadline.
        idle = raw_exchange(port, hello=hello_bytes(peer, me, nonce), timeout=5)
        assert idle.closed and 0.8 < idle.seconds < 4.0, idle
        # A version it does not speak: told which it does, then closed.
        v9 = raw_exchange(port, hello=hello_bytes(peer, me, nonce, version=9))
        assert v9.closed and v9.received == MAGIC + b"\x01", v9
        # A member with the secret but a broken frame (longer than max_frame, 16 MiB):
        # its connection is dropped (the real peer reconnects).
        big = raw_exchange(
            port, hello=hello_bytes(peer, me, nonce), secret=c.secret, ids=(peer, me),
            then=[("auth",), b"\x7f\xff\xff\xff" + os.urandom(64)],
        )  # fmt: skip
        assert big.closed, big
        after = c.nodes[me].request("transport")["listener"]
        assert after["refused"] - before["refused"] >= len(refused) + 1, (before, after)
        assert after["handshake_timeouts"] > before["handshake_timeouts"]
        # The cluster did not notice.
        leader = c.wait_leader()
        height += 1
        assert leader.commit(height, b"b%d" % height)["verdict"] == "ACCEPT"
    sts = c.statuses()
    assert len(sts) == 3 and all(s["fatal"] is None for s in sts.values())
    audit(c)


def test_a_snapshot_during_descriptor_pressure_does_not_stop_the_member_for_good(
    cluster_factory,  # type: ignore[no-untyped-def]
) -> None:
    """Found while writing the flood test (bug, open): idle unauthenticated connections
    hold the spare descriptors of a member with a low RLIMIT_NOFILE; the periodic
    snapshot then fails to open its files (EMFILE) and the node fails closed *for good*
    ("log rewrite failed: [Errno 24] Too many open files"), although nothing was lost and
    the shortage ends with the flood.  Flooding two members of three this way stops the
    cluster until an operator restarts them.  Expected: a snapshot that cannot be taken
    now is retried later (or the shortage is kept from the store's files)."""
    c = cluster_factory(1, store={"snapshot_entries": 50, "handshake_timeout": 5.0}, nofile={1: 40})
    c.start()
    node = c.wait_leader()
    socks = _flood(c.ports[1], 200)
    try:
        wait(
            lambda: node.request("transport")["listener"]["accept_pauses"] > 0,
            5,
            "accept() hits EMFILE",
        )
        out = node.request("bench", n=100, start=1, chain=CHAIN, timeout=30)
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    st = node.status()
    assert st["fatal"] is None, st["fatal"]
    assert out.get("not_accepted") == 0, out
    assert node.commit(101, b"b101")["verdict"] == "ACCEPT"
