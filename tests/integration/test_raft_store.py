"""The Raft-replicated sign store (nebula.state.raft, raft-rs underneath) on real sockets.

Two layers:

* in-process clusters (several RaftStores on one event loop, real TCP on 127.0.0.1):
  refusals to start, commit semantics, fail closed, timeouts, concurrent conflicting
  commits, imports, leadership transfer;
* clusters of real processes (tests/support/raftnode.py) with SIGKILL, SIGSTOP, a
  fault-injecting proxy on every link and an injected fdatasync error.

Every decision that leaves a store goes through an auditor that fails on two different
signatures for one (chain, height, round, step).  The storage and transport layers have
their own tests (tests/unit/test_raft_storage.py, tests/integration/test_raft_transport.py);
the stale-frame, snapshot catch-up and flooding attacks are in test_raft_attacks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nebula.errors import (
    ConfigError,
    DoubleSignRefused,
    NotLeader,
    ReplicationError,
    StateError,
    Unavailable,
)
from nebula.guard import SignRecord, Verdict
from nebula.state.raft import RaftStore, read_offline
from tests.integration.conftest import FAST, audit
from tests.support.ports import free_ports
from tests.support.proxy import Proxy
from tests.support.raftnode import Auditor, Cluster, NodeDead, NodeProcess

pytestmark = pytest.mark.timeout(120)

SECRET = b"nebula-test-cluster-secret-0123"
CHAIN = "test-chain"
# Lenient enough for a loaded 2-core machine (event-loop stalls of 300 ms seen).


def rec(h: int, sb: bytes, r: int = 0, s: int = 2) -> SignRecord:
    return SignRecord(h, r, s, sb, b"sig:" + sb)


def run(coro: Any, timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    try:
        return asyncio.run(bounded())
    finally:
        # Closed stores sit in reference cycles; free them here, on the thread that made
        # them (see test_a_closed_store_can_be_freed_on_any_thread).
        gc.collect()


# ---- in-process clusters ---------------------------------------------------------------


class Audited:
    """``commit`` through a store, recording every released decision."""

    def __init__(self) -> None:
        self.auditor = Auditor()

    async def commit(self, store: RaftStore, r: SignRecord, chain: str = CHAIN) -> Any:
        d = await store.commit(chain, r)
        self.auditor.record(chain, d.verdict.name, d.record)
        return d


@contextlib.asynccontextmanager
async def local_cluster(
    base: Path,
    n: int = 3,
    *,
    proxied: bool = False,
    common: dict[str, Any] | None = None,
    per_node: dict[int, dict[str, Any]] | None = None,
) -> AsyncIterator[tuple[list[RaftStore], dict[tuple[int, int], Proxy]]]:
    """``n`` started stores, ids 1..n; with ``proxied`` node i dials j through a proxy."""
    ids = list(range(1, n + 1))
    ports = dict(zip(ids, free_ports(n), strict=True))
    proxies: dict[tuple[int, int], Proxy] = {}
    if proxied:
        pp = iter(free_ports(n * (n - 1)))
        for i in ids:
            for j in ids:
                if i != j:
                    proxies[(i, j)] = Proxy(next(pp), ports[j]).start()
    loop = asyncio.get_running_loop()
    stores: list[RaftStore] = []
    try:
        for i in ids:
            peers = {
                j: f"127.0.0.1:{proxies[(i, j)].listen_port if (i, j) in proxies else ports[j]}"
                for j in ids
            }
            store = RaftStore(
                i,
                f"127.0.0.1:{ports[i]}",
                peers,
                base / f"n{i}",
                SECRET,
                loop=loop,
                **{**FAST, **(common or {}), **(per_node or {}).get(i, {})},
            )
            stores.append(store)
            await store.start()
        yield stores, proxies
    finally:
        for s in stores:
            await s.close()
        for px in proxies.values():
            px.stop()


async def leader_of(stores: list[RaftStore], timeout: float = 10.0) -> RaftStore:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in stores:
            if s.is_authoritative():
                return s
        await asyncio.sleep(0.01)
    raise TimeoutError("no leader")


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


def test_refuses_to_start_without_a_secret_with_bad_ids_or_on_unsafe_state(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        (port,) = free_ports(1)
        addr = f"127.0.0.1:{port}"
        peers = {1: addr}
        d = tmp_path / "d"
        for secret in (b"", None, b"short", "a-str-secret-of-32-characters!!"):
            with pytest.raises(ConfigError, match="secret"):
                RaftStore(1, addr, peers, d, secret)  # type: ignore[arg-type]
        for nid in (0, -1, True, "1", 1.0):
            with pytest.raises(ConfigError, match="node_id must be a positive int"):
                RaftStore(nid, addr, {nid: addr}, d, SECRET)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="peer ids must be positive"):
            RaftStore(1, addr, {1: addr, 0: "127.0.0.1:1"}, d, SECRET)
        with pytest.raises(ConfigError, match="peers must include"):
            RaftStore(5, addr, peers, d, SECRET)
        with pytest.raises(ConfigError, match=r"bad port|expected host:port"):
            RaftStore(1, addr, {1: addr, 2: "127.0.0.1"}, d, SECRET)
        with pytest.raises(ConfigError, match="election_timeout_min"):
            RaftStore(1, addr, peers, d, SECRET, election_timeout_min=0.05)
        with pytest.raises(ConfigError, match="commit_timeout"):
            RaftStore(1, addr, peers, d, SECRET, commit_timeout=0)
        # nothing was created by a refused configuration
        assert not d.exists()

        # A data directory of the pysyncobj-based release: refused, naming the migration.
        old = tmp_path / "old"
        old.mkdir()
        (old / "raft.journal").write_bytes(b"\x00" * 64)
        with pytest.raises(StateError) as ei:
            RaftStore(1, addr, peers, old, SECRET)
        msg = str(ei.value)
        assert (
            "nebula state export" in msg and "initial_state_path" in msg and "raft.journal" in msg
        )

        # One process per data directory; a healthy store with a mark to lose.
        store = RaftStore(1, addr, peers, d, SECRET)
        await store.start()
        try:
            with pytest.raises(StateError, match="in use"):
                RaftStore(1, addr, peers, d, SECRET)
            for h in range(1, 11):
                assert (await store.commit(CHAIN, rec(h, b"b%d" % h))).verdict == Verdict.ACCEPT
            store.compact()
            for h in range(11, 16):
                assert (await store.commit(CHAIN, rec(h, b"b%d" % h))).verdict == Verdict.ACCEPT
        finally:
            await store.close()
        snap, log = d / "log" / "raft.snap", d / "log" / "raft.log"
        assert snap.exists() and log.exists()

        def flip(path: Path, offset: int) -> bytes:
            raw = bytearray(path.read_bytes())
            orig = bytes(raw)
            raw[offset] ^= 0x40
            path.write_bytes(bytes(raw))
            return orig

        # A bit flipped in the snapshot (which carries the high-water mark): refuse.
        good = flip(snap, len(snap.read_bytes()) - 10)
        with pytest.raises(StateError, match="checksum"):
            RaftStore(1, addr, peers, d, SECRET)
        snap.write_bytes(good)
        # A bit flipped in a synced log record: refuse (not "torn tail, discard").
        good = flip(log, 64 + 12)
        with pytest.raises(StateError, match="below the synced mark"):
            RaftStore(1, addr, peers, d, SECRET)
        log.write_bytes(good)
        # Repaired: it starts (the refusals released the directory lock) with its mark.
        store = RaftStore(1, addr, peers, d, SECRET)
        await store.start()
        try:
            await until(store.is_authoritative, 5, "one-member store leads")
            assert store.last(CHAIN) == rec(15, b"b15")
            assert (await store.commit(CHAIN, rec(12, b"b12"))).verdict == Verdict.REFUSE
        finally:
            await store.close()

    run(go())


def test_a_data_directory_of_another_incarnation_refuses_to_start(tmp_path: Path) -> None:
    """A rebuilt cluster has a new secret; a member that kept (or got back, from a backup)
    the old cluster's data directory and is given the new secret must not join with the
    old log (SECURITY.md): it refuses to start, and its directory is left as it was."""
    new_secret = b"nebula-test-cluster-secret-NEW!"

    async def go() -> None:
        (port,) = free_ports(1)
        addr = f"127.0.0.1:{port}"
        peers = {1: addr}
        d = tmp_path / "d"
        store = RaftStore(1, addr, peers, d, SECRET)
        await store.start()
        try:
            await until(store.is_authoritative, 5, "one-member store leads")
            for h in range(1, 6):
                assert (await store.commit(CHAIN, rec(h, b"b%d" % h))).verdict == Verdict.ACCEPT
        finally:
            await store.close()
        before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "raft.lock"}
        with pytest.raises(StateError) as ei:
            RaftStore(1, addr, peers, d, new_secret)
        assert "cluster.binding" in str(ei.value) and "different secret" in str(ei.value)
        after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != "raft.lock"}
        assert after == before
        # A directory written before bindings existed is bound to the secret it starts
        # with, and keeps its mark; from then on the other secret is refused.
        (d / "cluster.binding").unlink()
        store = RaftStore(1, addr, peers, d, SECRET)
        await store.start()
        try:
            await until(store.is_authoritative, 5, "one-member store leads")
            assert store.last(CHAIN) == rec(5, b"b5")
        finally:
            await store.close()
        assert (d / "cluster.binding").exists()
        with pytest.raises(StateError, match="different secret"):
            RaftStore(1, addr, peers, d, new_secret)

    run(go())


def test_offline_read_of_stopped_members_gives_the_committed_mark(tmp_path: Path) -> None:
    """``read_offline`` (``nebula state export --offline``): refused while the member
    runs; after the stop, every member's applied mark is one the cluster committed, the
    highest of them is the last commit, and nothing in the directory is bound or changed
    by the read."""
    a = Audited()

    async def go() -> None:
        async with local_cluster(tmp_path, common={"snapshot_entries": 8}) as (stores, _):
            leader = await leader_of(stores)
            for h in range(1, 21):
                assert (await a.commit(leader, rec(h, b"b%d" % h))).verdict == Verdict.ACCEPT
            with pytest.raises(StateError, match="in use"):
                read_offline(tmp_path / "n1", SECRET)

    run(go())
    marks = []
    for i in (1, 2, 3):
        st = read_offline(tmp_path / f"n{i}", SECRET)
        applied, out = st.applied.get(CHAIN.encode()), st.export(CHAIN.encode())
        if applied is None:  # a member that trailed (it may not even have been reached)
            marks.append(out.height if out is not None else 0)
            continue
        assert applied.height <= 20 and applied == rec(applied.height, b"b%d" % applied.height)
        assert out is not None and out.hrs >= applied.hrs
        if out != applied:  # a higher entry it holds but never learned was committed
            assert out == SignRecord(out.height, 0, 2) and out.height <= 20
        marks.append(out.height)
    assert max(marks) == 20 and sorted(marks)[1] == 20  # a majority holds the last commit
    with pytest.raises(StateError, match="different secret"):
        read_offline(tmp_path / "n1", b"nebula-test-cluster-secret-NEW!")
    with pytest.raises(StateError, match="no Raft log"):
        read_offline(tmp_path / "nowhere", SECRET)
    (tmp_path / "n2" / "cluster.binding").unlink()  # a directory from before bindings
    read_offline(tmp_path / "n2", SECRET)
    assert not (tmp_path / "n2" / "cluster.binding").exists()


def test_commit_semantics_and_fail_closed(tmp_path: Path) -> None:
    a = Audited()

    async def go() -> None:
        async with local_cluster(tmp_path) as (stores, _):
            leader = await leader_of(stores)
            follower = next(s for s in stores if s is not leader)
            d = await a.commit(leader, rec(10, b"block-10"))
            assert d.verdict == Verdict.ACCEPT and d.record == rec(10, b"block-10")
            # same HRS, same bytes: the stored signature comes back, not the new one
            d = await a.commit(leader, SignRecord(10, 0, 2, b"block-10", b"other-sig"))
            assert d.verdict == Verdict.SAME and d.record.signature == b"sig:block-10"
            # same HRS, different bytes; and a regression: refused by the state machine
            d = await a.commit(leader, rec(10, b"evil-10"))
            assert d.verdict == Verdict.REFUSE and isinstance(d.error, DoubleSignRefused)
            d = await a.commit(leader, rec(9, b"block-9"))
            assert d.verdict == Verdict.REFUSE
            assert leader.last(CHAIN) == rec(10, b"block-10")
            # followers hold the replicated state and refuse to decide
            await until(lambda: follower.last(CHAIN) == rec(10, b"block-10"), 3, "replicated")
            assert not follower.is_authoritative()
            with pytest.raises(NotLeader):
                await follower.commit(CHAIN, rec(11, b"block-11"))
            with pytest.raises(NotLeader):
                await follower.raise_to(CHAIN, SignRecord(11, 0, 0))
            st = leader.status()
            assert st["role"] == "leader" and st["authoritative"] and st["has_quorum"]
            assert st["leader_id"] == leader.node_id and st["members"] == [1, 2, 3]
            assert set(st["peers"]) == {1, 2, 3} - {leader.node_id}
            assert st["chains"][CHAIN]["height"] == "10" and st["journal"]["syncs"] > 0
            assert st["fatal"] is None and st["commit_index"] == st["applied_index"]
            # lost quorum: both followers gone -> nothing is decided, then it steps down
            for s in stores:
                if s is not leader:
                    await s.close()
            with pytest.raises((ReplicationError, NotLeader)):
                await a.commit(leader, rec(11, b"block-11"))
            await until(lambda: leader.status()["role"] != "leader", 3, "steps down")
            assert not leader.is_authoritative()
            with pytest.raises((NotLeader, ReplicationError)):
                await a.commit(leader, rec(11, b"block-11"))
            assert leader.last(CHAIN).height == 10
            await leader.close()
            with pytest.raises(ReplicationError, match="not running"):
                await leader.commit(CHAIN, rec(12, b"block-12"))

    run(go())
    released = a.auditor.check()
    assert set(released) == {(CHAIN, 10, 0, 2)}


def test_a_timed_out_commit_releases_nothing_even_if_it_commits_later(tmp_path: Path) -> None:
    a = Audited()

    async def go() -> None:
        async with local_cluster(tmp_path, proxied=True, common={"commit_timeout": 0.15}) as (
            stores,
            proxies,
        ):
            leader = await leader_of(stores)
            assert (await a.commit(leader, rec(1, b"b1"))).verdict == Verdict.ACCEPT
            for px in proxies.values():
                px.delay(250)
            with pytest.raises(ReplicationError, match="outcome unknown"):
                await a.commit(leader, rec(2, b"b2"))
            # The proposal did commit later; the caller never saw it.
            await until(lambda: leader.last(CHAIN) == rec(2, b"b2"), 3, "late commit")
            for px in proxies.values():
                px.heal()
            await asyncio.sleep(0.5)  # what the proxies still hold (delayed) drains
            leader = await leader_of(stores)
            # A retry with a different message for that HRS is refused (no double
            # sign); the identical message gets the stored signature back.
            assert (await a.commit(leader, rec(2, b"b2-other"))).verdict == Verdict.REFUSE
            d = await a.commit(leader, rec(2, b"b2"))
            assert d.verdict == Verdict.SAME and d.record == rec(2, b"b2")

    run(go())
    released = a.auditor.check()
    assert released[(CHAIN, 2, 0, 2)] == b"b2"


def test_each_waiting_commit_expires_at_its_own_deadline(tmp_path: Path) -> None:
    """The store keeps one timer for every decision in flight (a queue in deadline
    order): commits started at different times while the followers are unreachable each
    fail at their own commit_timeout, not before it and not all at the first one's."""
    a = Audited()
    timeout = 0.3

    async def go() -> None:
        async with local_cluster(tmp_path, proxied=True, common={"commit_timeout": timeout}) as (
            stores,
            proxies,
        ):
            leader = await leader_of(stores)
            assert (await a.commit(leader, rec(1, b"b1"))).verdict == Verdict.ACCEPT
            for px in proxies.values():
                px.delay(2000)
            loop = asyncio.get_running_loop()
            failed_after: dict[int, float] = {}

            async def one(h: int) -> None:
                t0 = loop.time()
                with pytest.raises(ReplicationError, match="outcome unknown"):
                    await a.commit(leader, rec(h, b"b%d" % h))
                failed_after[h] = loop.time() - t0

            tasks = []
            for h in (2, 3, 4):
                tasks.append(asyncio.ensure_future(one(h)))
                await asyncio.sleep(0.1)
            await asyncio.gather(*tasks)
            for h, took in failed_after.items():
                assert timeout - 0.01 <= took < timeout + 0.5, (h, took)
            for px in proxies.values():
                px.heal()

    run(go())
    assert (CHAIN, 2, 0, 2) not in a.auditor.check()


def test_two_concurrent_conflicting_commits_exactly_one_accept(tmp_path: Path) -> None:
    a = Audited()

    async def go() -> None:
        async with local_cluster(tmp_path) as (stores, _):
            leader = await leader_of(stores)
            for h in range(1, 21):
                x, y = await asyncio.gather(
                    a.commit(leader, rec(h, b"A%d" % h)), a.commit(leader, rec(h, b"B%d" % h))
                )
                assert sorted([x.verdict, y.verdict]) == [Verdict.ACCEPT, Verdict.REFUSE], (h, x, y)
                winner, loser = (x, y) if x.verdict == Verdict.ACCEPT else (y, x)
                assert isinstance(loser.error, DoubleSignRefused), loser
                assert leader.last(CHAIN) == winner.record

    run(go())
    assert len(a.auditor.check()) == 20


def test_initial_state_only_raises_the_mark_and_reaches_every_node(tmp_path: Path) -> None:
    a = Audited()
    imported = {CHAIN: SignRecord(100, 2, 3, b"old-signer", b"old-sig")}

    async def go() -> None:
        async with local_cluster(tmp_path, common={"initial": imported}) as (stores, _):
            leader = await leader_of(stores)
            await until(lambda: all(s.last(CHAIN) == imported[CHAIN] for s in stores), 5, "import")
            assert (await a.commit(leader, rec(100, b"x", r=2, s=2))).verdict == Verdict.REFUSE
            assert (await a.commit(leader, rec(101, b"b101"))).verdict == Verdict.ACCEPT
            # The runtime import (daemon admin "import") goes through the log too.
            assert not await leader.raise_to(CHAIN, SignRecord(50, 0, 3, b"", b""))
            assert await leader.raise_to(CHAIN, SignRecord(200, 0, 1, b"", b""))
            assert (await a.commit(leader, rec(200, b"b200", s=1))).verdict == Verdict.REFUSE
            assert (await a.commit(leader, rec(200, b"b200", s=2))).verdict == Verdict.ACCEPT
            await until(lambda: all(s.last(CHAIN) == rec(200, b"b200") for s in stores), 3, "all")
        # Restarting every node with an older import changes nothing.
        older = {CHAIN: SignRecord(90, 0, 3, b"older", b"sig")}
        async with local_cluster(tmp_path, common={"initial": older}) as (stores, _):
            await leader_of(stores)
            await asyncio.sleep(0.5)
            assert all(s.last(CHAIN) == rec(200, b"b200") for s in stores)
        # ... and a higher one raises the mark on every node, through the log.
        higher = {CHAIN: SignRecord(300, 0, 1, b"", b"")}
        async with local_cluster(tmp_path, common={"initial": higher}) as (stores, _):
            leader = await leader_of(stores)
            await until(lambda: all(s.last(CHAIN).height == 300 for s in stores), 5, "raised")
            assert (await a.commit(leader, rec(299, b"b299"))).verdict == Verdict.REFUSE

    run(go())
    a.auditor.check()


def test_no_decision_for_a_chain_before_its_initial_state_is_applied(tmp_path: Path) -> None:
    """The config's initial sign state (a migration: the old signer's export) is proposed
    by a new leader, but a validator's request can reach that leader first.  Decided
    before the import, a precommit for another block at the imported height/round/step
    was signed - a double sign (found in review).  The chain now refuses (Unavailable:
    the validator retries) until its import is applied; then the state machine refuses
    the conflict.  Asked at the moment authority is gained, on whichever node gains it."""
    imported = {CHAIN: SignRecord(100, 0, 3, b"old-block", b"old-sig")}
    conflicting = rec(100, b"new-block", s=3)

    async def go() -> None:
        outcomes: list[object] = []
        exports: list[object] = []
        async with local_cluster(tmp_path, common={"initial": imported}) as (stores, _):
            for store in stores:

                def gained(auth: bool, store: RaftStore = store) -> None:
                    if not auth or outcomes:
                        return
                    try:
                        store.begin_commit(CHAIN, conflicting, None, lambda d, e: None)
                    except Unavailable as e:
                        outcomes.append(e)
                    else:
                        outcomes.append("started")
                    # An export then would be lower than the file the config names.
                    try:
                        exports.append(store.last_for_export(CHAIN))
                    except Unavailable as e:
                        exports.append(e)

                store.on_role_change(gained)
            leader = await leader_of(stores)
            await until(lambda: bool(outcomes), 5, "a request at the first authority")
            assert isinstance(outcomes[0], Unavailable), outcomes
            assert "not imported yet" in str(outcomes[0])
            assert isinstance(exports[0], Unavailable), exports
            await until(lambda: leader.last(CHAIN) == imported[CHAIN], 5, "import")
            assert leader.last_for_export(CHAIN) == imported[CHAIN]
            assert (await leader.commit(CHAIN, conflicting)).verdict == Verdict.REFUSE
            assert leader.last(CHAIN) == imported[CHAIN]
            nxt = rec(101, b"b101", s=1)
            assert (await leader.commit(CHAIN, nxt)).verdict == Verdict.ACCEPT

    run(go())


def test_a_removed_members_address_is_not_a_transport_peer_again(tmp_path: Path) -> None:
    """The transport admits the current voters (and a member being added).  A removed
    member's learned address used to come back with the next addition, and its messages
    were stepped until that change applied (found in review)."""

    async def go() -> None:
        p1, p2, p3 = free_ports(3)
        peers = {1: f"127.0.0.1:{p1}", 2: f"127.0.0.1:{p2}", 3: f"127.0.0.1:{p3}"}
        store = RaftStore(
            1, peers[1], peers, tmp_path / "n1", SECRET, loop=asyncio.get_running_loop()
        )
        try:
            store._addrs[4] = "127.0.0.1:1"  # learned when 4 was added; 4 since removed
            assert set(store._peer_addrs()) == {2, 3}
            assert set(store._peer_addrs(also=5)) == {2, 3}  # 5: no address known yet
            store._addrs[5] = "127.0.0.1:2"
            assert set(store._peer_addrs(also=5)) == {2, 3, 5}
        finally:
            await store.close()

    run(go())


def test_leadership_transfer_and_role_callbacks(tmp_path: Path) -> None:
    a = Audited()

    async def go() -> None:
        async with local_cluster(tmp_path) as (stores, _):
            events: list[tuple[int, bool]] = []
            for s in stores:
                s.on_role_change(lambda leader, nid=s.node_id: events.append((nid, leader)))
            old = await leader_of(stores)
            await until(lambda: (old.node_id, True) in events, 2, "leader callback")
            await a.commit(old, rec(1, b"b1"))
            target = next(s for s in stores if s is not old)
            assert await old.transfer_leadership(target.node_id) == target.node_id
            new = await leader_of(stores)
            assert new is target and not old.is_authoritative()
            await until(
                lambda: {(old.node_id, False), (target.node_id, True)} <= set(events),
                2,
                f"role callbacks (got {events})",
            )
            assert (await a.commit(new, rec(2, b"b2"))).verdict == Verdict.ACCEPT
            with pytest.raises(NotLeader):
                await old.commit(CHAIN, rec(3, b"b3"))
            with pytest.raises(NotLeader):
                await old.transfer_leadership(None)
            # automatic target
            third = await new.transfer_leadership(None)
            assert third != new.node_id
            leader = await leader_of(stores)
            assert leader.node_id == third
            with pytest.raises(ConfigError):
                await leader.transfer_leadership(99)
            with pytest.raises(ConfigError):
                await leader.transfer_leadership(leader.node_id)
            # never to a member that is gone: the transfer fails, leadership stays
            gone = next(s for s in stores if s is not leader)
            await gone.close()
            with pytest.raises(ReplicationError, match="did not complete"):
                await leader.transfer_leadership(gone.node_id, timeout=1.0)
            assert leader.is_authoritative()
            assert (await a.commit(leader, rec(3, b"b3"))).verdict == Verdict.ACCEPT

    run(go())
    a.auditor.check()


def test_a_one_member_cluster_commits_without_waiting_for_a_timer(tmp_path: Path) -> None:
    tick = 0.1
    n = 200

    async def go() -> tuple[float, float]:
        (port,) = free_ports(1)
        addr = f"127.0.0.1:{port}"
        store = RaftStore(
            1, addr, {1: addr}, tmp_path / "one", SECRET, tick_interval=tick,
            heartbeat_interval=tick, election_timeout_min=10 * tick, election_timeout_max=20 * tick,
        )  # fmt: skip
        t0 = time.monotonic()
        await store.start()
        try:
            await until(store.is_authoritative, 5, "one-member leader")
            elected = time.monotonic() - t0
            assert elected < 10 * tick, f"elected after {elected:.3f}s (an election timeout)"
            lat = []
            t_all = time.perf_counter()
            for h in range(1, n + 1):
                t = time.perf_counter()
                d = await store.commit(CHAIN, rec(h, b"b%d" % h))
                lat.append(time.perf_counter() - t)
                assert d.verdict == Verdict.ACCEPT
            total = time.perf_counter() - t_all
            assert store.status()["journal"]["syncs"] >= n  # each one fsync'ed
        finally:
            await store.close()
        lat.sort()
        return lat[n // 2], total

    p50, total = run(go())
    print(f"\none-member cluster: p50 {p50 * 1e3:.3f} ms, {n} commits in {total:.3f}s")
    # Waiting for the tick timer would cost ~tick/2 per commit (10 s for all of them).
    assert p50 < tick / 10, f"p50 {p50 * 1e3:.1f} ms: waits for the {tick * 1e3:.0f} ms tick?"
    assert total < n * tick / 10, f"{n} commits took {total:.2f}s"


@pytest.mark.parametrize("off_loop", [True, False], ids=["sync-off-loop", "sync-inline"])
def test_decisions_of_many_chains_in_one_pass_share_a_raft_round(
    tmp_path: Path, off_loop: bool
) -> None:
    """Group commit: concurrent decisions of different chains share one Ready (one
    fdatasync per member, one append per follower), each with its own outcome; with
    ``sync_off_loop`` the leader's sync of that Ready runs on its worker thread."""
    chains = [f"chain-{i}" for i in range(16)]

    async def go() -> None:
        async with local_cluster(tmp_path, 3, common={"sync_off_loop": off_loop}) as (
            stores,
            _,
        ):
            leader = await leader_of(stores)
            aud = Audited()
            for c in chains:  # a first decision per chain
                await aud.commit(leader, rec(1, b"a"), c)
            journal0 = leader.status()["journal"]
            outs = await asyncio.gather(
                *(aud.commit(leader, rec(2, b"b" + c.encode()), c) for c in chains),
                # the same decision twice in one pass: the second is answered SAME
                aud.commit(leader, rec(2, b"b" + chains[0].encode()), chains[0]),
                aud.commit(leader, rec(2, b"conflict"), chains[1]),  # refused
                return_exceptions=True,
            )
            journal = leader.status()["journal"]
            syncs = journal["syncs"] - journal0["syncs"]
            off = journal["syncs_off_loop"] - journal0["syncs_off_loop"]
            assert off >= 1 if off_loop else off == 0, (off, journal)
            # off the loop: on the native sync thread (the log is on the real disk)
            assert (leader._syncer is not None) == off_loop
            verdicts = [getattr(o, "verdict", o) for o in outs]
            assert verdicts[:16] == [Verdict.ACCEPT] * 16, verdicts
            assert verdicts[16] == Verdict.SAME
            # the conflicting one lost to the accepted one of the same pass, or was
            # refused by the guard's pre-check; either way no second signature.
            assert isinstance(outs[17], DoubleSignRefused) or verdicts[17] == Verdict.REFUSE
            # 18 proposals of one pass: one raft-rs proposal, one Ready, one sync here.
            rounds = journal["appends"] - journal0["appends"]
            entries = journal["entries_appended"] - journal0["entries_appended"]
            assert (rounds, entries) == (1, 18), journal
            assert syncs <= 2, f"{syncs} fdatasyncs for one pass of 18 decisions"
            for s in stores:
                await until(
                    lambda s=s: all(
                        s.last(c) is not None and s.last(c).height == 2 for c in chains
                    ),
                    10,
                    "followers apply the group",
                )

    run(go())


def test_without_a_native_sync_thread_the_leader_syncs_on_a_python_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No eventfd or thread to be had for the native sync thread (EMFILE, injected): the
    leader says so once and syncs its multi-decision Readies on a Python thread; nothing
    fails and every decision commits."""
    import errno

    import nebula.state.raft as raft_store

    tries: list[int] = []

    def no_thread(loop: object) -> None:
        tries.append(1)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(raft_store, "SyncThread", no_thread)
    chains = [f"chain-{i}" for i in range(8)]

    async def go() -> None:
        async with local_cluster(tmp_path, 3, common={"sync_off_loop": True}) as (stores, _):
            leader = await leader_of(stores)
            aud = Audited()
            for h in (1, 2, 3):
                outs = await asyncio.gather(
                    *(aud.commit(leader, rec(h, b"%d" % h + c.encode()), c) for c in chains)
                )
                assert [o.verdict for o in outs] == [Verdict.ACCEPT] * len(chains)
            journal = leader.status()["journal"]
            assert journal["syncs_off_loop"] >= 1, journal
            assert leader._syncer is None and leader._sync_pool is not None
            assert len(tries) == 1  # tried once, not at every Ready

    run(go())


def test_a_closed_store_can_be_freed_on_any_thread(tmp_path: Path) -> None:
    """Found while writing these tests (bug, open): a closed RaftStore is only freed by
    the cyclic garbage collector (store <-> node callbacks), which runs on whichever
    thread allocates at that moment; the pyo3 ``_core.Node`` is ``unsendable``, so a
    collection on another thread raises "_core::Node is unsendable, but is being dropped
    on another thread" (unraisable) and leaks the node.  Seen as a
    PytestUnraisableExceptionWarning in a later test's harness thread.  Expected: close()
    releases the core on the loop thread, or the core is Send."""
    import sys

    errors: list[str] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: errors.append(repr(u.exc_value))
    gc.disable()
    try:

        async def make_and_close() -> None:
            (port,) = free_ports(1)
            addr = f"127.0.0.1:{port}"
            store = RaftStore(1, addr, {1: addr}, tmp_path / "d", SECRET)
            await store.start()
            await store.close()

        asyncio.run(make_and_close())
        collector = threading.Thread(target=gc.collect)
        collector.start()
        collector.join(10)
    finally:
        gc.enable()
        sys.unraisablehook = hook
    assert errors == []


# ---- process clusters ------------------------------------------------------------------


class Driver(threading.Thread):
    """Commits increasing heights to whichever node leads, like a validator would;
    a retry after an unknown outcome uses *different* sign bytes (adversarial)."""

    def __init__(self, cluster: Cluster, client_timeout: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.client_timeout = client_timeout
        self.height = 1
        self.done = threading.Event()
        self.accepted: list[tuple[int, int, float]] = []  # (height, node, time)
        self.refused: list[int] = []  # heights whose retry was refused
        self.errors: list[str] = []
        self.leader: NodeProcess | None = None

    def find_leader(self) -> NodeProcess | None:
        for p in self.cluster.live():
            with contextlib.suppress(TimeoutError, NodeDead):
                if p.status(0.5)["authoritative"]:
                    return p
        return None

    def run(self) -> None:
        attempt = 0
        while not self.done.is_set():
            if self.leader is None or not self.leader.alive or self.leader.stopped:
                self.leader = self.find_leader()
                if self.leader is None:
                    time.sleep(0.05)
                    continue
            sb = b"height-%d-attempt-%d" % (self.height, attempt)
            try:
                resp = self.leader.commit(self.height, sb, timeout=self.client_timeout)
            except (TimeoutError, NodeDead):
                self.leader, attempt = None, attempt + 1
                continue
            verdict = resp.get("verdict")
            if verdict in ("ACCEPT", "SAME"):
                self.accepted.append((self.height, self.leader.node_id, time.monotonic()))
                self.height, attempt = self.height + 1, 0
            elif verdict == "REFUSE":
                # an earlier attempt (outcome unknown to us) committed: move on
                if attempt == 0:
                    self.errors.append(f"first attempt at {self.height} refused: {resp}")
                self.refused.append(self.height)
                self.height, attempt = self.height + 1, 0
            else:
                self.leader, attempt = None, attempt + 1
                time.sleep(0.02)

    def wait_for(self, n: int, timeout: float) -> None:
        target = len(self.accepted) + n
        deadline = time.monotonic() + timeout
        while len(self.accepted) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.accepted)}/{target} commits in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        assert not self.errors, self.errors


def converge(cluster: Cluster, released: dict, timeout: float = 10.0) -> None:
    """Every live node ends with the highest released record for the chain."""
    top = max((k for k in released if k[0] == CHAIN), key=lambda k: k[1:])
    want = {"height": str(top[1]), "signbytes": released[top].hex().upper()}
    deadline = time.monotonic() + timeout
    while True:
        states = {nid: st["chains"].get(CHAIN) for nid, st in cluster.statuses().items()}
        ok = all(
            s is not None and s["height"] == want["height"] and s["signbytes"] == want["signbytes"]
            for s in states.values()
        )
        if ok and len(states) == len(cluster.live()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"nodes did not converge on {want}: {states}")
        time.sleep(0.1)


def test_leader_sigkill_during_continuous_commits(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3)
    c.start()
    first = c.wait_leader()
    drv = Driver(c)
    drv.start()
    try:
        drv.wait_for(30, timeout=15)
        t_kill = time.monotonic()
        first.kill()  # returns once the process is gone and its output drained
        t_dead = time.monotonic()
        drv.wait_for(30, timeout=20)
        others = [(h, nid, t) for h, nid, t in drv.accepted if nid != first.node_id]
        assert len(others) >= 29
        # (an answer the dead leader gave just before dying may be recorded late)
        assert all(nid != first.node_id for _, nid, t in drv.accepted if t > t_dead + 0.2)
        failover = others[0][2] - t_kill
        # it comes back as a follower and catches up
        c.start(first.node_id)
        drv.wait_for(10, timeout=15)
    finally:
        drv.stop()
    released = audit(c)
    heights = {k[1] for k in released}
    # A height may be missing from what was released only if an attempt at it was
    # in flight when the leader died (committed, never answered): the retry with
    # different bytes was refused.  At most one such height per failover.
    skipped = set(range(1, max(heights) + 1)) - heights
    assert len(skipped) <= 1 and skipped <= set(drv.refused), (skipped, drv.refused)
    converge(c, released)
    print(f"\nfailover (SIGKILL -> next commit): {failover:.2f}s")
    assert failover < 5.0, f"failover took {failover:.2f}s"


def test_leader_sigstop_then_sigcont(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3)
    c.start()
    first = c.wait_leader()
    drv = Driver(c, client_timeout=1.5)
    drv.start()
    try:
        drv.wait_for(20, timeout=15)
        first.signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        # A request that sits in the paused leader's input, for a height the others
        # are about to sign with different bytes.
        h = drv.height + 2
        late: list[Any] = []
        sender = threading.Thread(
            target=lambda: late.append(
                _try(lambda: first.commit(h, b"from-the-paused-leader", timeout=10))
            ),
            daemon=True,
        )
        sender.start()
        drv.wait_for(20, timeout=20)
        second = c.wait_leader(exclude={first.node_id})
        before = second.status()
        first.signal(signal.SIGCONT)
        drv.wait_for(10, timeout=15)
        sender.join(12)
        time.sleep(1.0)  # several election timeouts of the woken node
        after = second.status()
    finally:
        drv.stop()
        first.signal(signal.SIGCONT)
    assert any(nid != first.node_id and t > t_stop for _, nid, t in drv.accepted)
    # PreVote + CheckQuorum: the woken node learns the new term and follows; it does not
    # depose the new leader, and the term does not keep climbing.
    assert after["role"] == "leader" and after["term"] == before["term"], (before, after)
    st = first.status()
    assert st["role"] == "follower" and not st["authoritative"]
    assert st["term"] == after["term"] and st["leader_id"] == second.node_id
    # The paused node answered after it woke up - and whatever it answered, nothing
    # conflicting left the cluster.
    assert late and isinstance(late[0], dict), late
    released = audit(c)
    if late[0].get("verdict") == "ACCEPT":
        assert released[(CHAIN, h, 0, 2)] == b"from-the-paused-leader"
    converge(c, released)


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        return e


@pytest.mark.parametrize("mode", ["cut", "blackhole"])
def test_partitioned_leader_commits_nothing_and_majority_continues(cluster_factory, mode) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3, proxies=True)
    c.start()
    old = c.wait_leader()
    for h in range(1, 6):
        assert old.commit(h, b"pre-%d" % h)["verdict"] == "ACCEPT"
    c.isolate(old.node_id, mode)
    t_cut = time.monotonic()
    # The isolated leader cannot commit: every attempt fails, none is released.
    isolated = [old.commit(6, b"isolated-%d" % i, timeout=5) for i in range(3)]
    assert all("error" in r for r in isolated), isolated
    assert {r["error"] for r in isolated} <= {"ReplicationError", "NotLeader"}
    new = c.wait_leader(timeout=10, exclude={old.node_id})
    assert new.commit(6, b"majority-6")["verdict"] == "ACCEPT"
    for h in range(7, 12):
        assert new.commit(h, b"majority-%d" % h)["verdict"] == "ACCEPT"
    # ... and it stepped down by itself (CheckQuorum)
    deadline = t_cut + 6
    while old.status()["role"] == "leader" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert old.status()["role"] != "leader"
    assert "error" in old.commit(12, b"isolated-12", timeout=5)
    c.heal()
    released = audit(c)
    assert released[(CHAIN, 6, 0, 2)] == b"majority-6"
    converge(c, released, timeout=20)
    leader = c.wait_leader()
    assert leader.commit(12, b"after-heal-12")["verdict"] == "ACCEPT"
    assert not any(sb.startswith(b"isolated") for sb in audit(c).values())


def test_full_cluster_restart_keeps_state(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3)
    c.start()
    leader = c.wait_leader()
    for h in range(1, 31):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    # Two validators' connections racing with conflicting messages for one HRS.
    for h in range(31, 36):
        out: list[dict] = []
        racers = [
            threading.Thread(target=lambda sb=sb, h=h, out=out: out.append(leader.commit(h, sb)))
            for sb in (b"A%d" % h, b"B%d" % h)
        ]
        for t in racers:
            t.start()
        for t in racers:
            t.join(10)
        assert sorted(r["verdict"] for r in out) == ["ACCEPT", "REFUSE"], out
        assert next(r for r in out if r["verdict"] == "REFUSE")["refusal"] == "DoubleSignRefused"
    for h in range(31, 36):
        assert leader.commit(h, b"C%d" % h)["verdict"] == "REFUSE"
    for i in c.ids:
        c.kill(i)
    c.start()
    leader = c.wait_leader()
    released = audit(c)
    assert leader.status()["chains"][CHAIN]["height"] == "35"
    assert leader.commit(35, b"conflict-35")["verdict"] == "REFUSE"
    assert leader.commit(29, b"b29")["verdict"] == "REFUSE"
    assert leader.commit(35, released[(CHAIN, 35, 0, 2)])["verdict"] == "SAME"
    assert leader.commit(36, b"b36")["verdict"] == "ACCEPT"
    converge(c, audit(c))


def test_compaction_snapshot_install_and_restart_keep_the_high_water_mark(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3, store={"snapshot_entries": 20})
    c.start()
    leader = c.wait_leader()
    lagging = next(p for p in c.nodes.values() if p is not leader)
    behind = lagging.status()["last_index"]
    lagging.kill()
    for h in range(1, 101):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    st = leader.status()
    assert st["journal"]["entries"] < 40 and st["journal"]["first_index"] > behind + 50, st
    assert st["snapshot_index"] > behind + 50
    # The lagging node comes back behind the leader's first log entry: it can only
    # catch up from the snapshot.
    c.start(lagging.node_id)
    released = audit(c)
    converge(c, released, timeout=15)
    lst = c.nodes[lagging.node_id].status()
    assert lst["snapshot_index"] > behind + 50 and lst["fatal"] is None, lst
    # An operator compaction on a follower, then the whole cluster down and up again:
    # the mark survives snapshots and compaction.
    assert "error" not in c.nodes[lagging.node_id].request("compact")
    for i in c.ids:
        c.kill(i)
    c.start()
    leader = c.wait_leader()
    assert leader.status()["chains"][CHAIN]["height"] == "100"
    assert leader.commit(100, b"conflict")["verdict"] == "REFUSE"
    assert leader.commit(60, b"b60")["verdict"] == "REFUSE"
    assert leader.commit(101, b"b101")["verdict"] == "ACCEPT"
    converge(c, audit(c))
    assert all(st["chains"][CHAIN]["height"] == "101" for st in c.statuses().values())


def test_five_node_cluster_survives_two_failures_not_three(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(5)
    c.start()
    leader = c.wait_leader()
    for h in range(1, 11):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    # lose the leader and one follower
    victims = [leader.node_id, next(i for i in c.nodes if i != leader.node_id)]
    for i in victims:
        c.kill(i)
    leader = c.wait_leader(timeout=10)
    for h in range(11, 21):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    # a third failure: no majority, nothing commits
    c.kill(next(i for i in c.nodes if i not in victims and i != leader.node_id))
    answers = [leader.commit(21, b"no-quorum-%d" % i, timeout=5) for i in range(2)]
    assert all("error" in a for a in answers), answers
    # one node back: a majority again
    c.start(victims[1])
    leader = c.wait_leader(timeout=15)
    r21 = leader.commit(21, b"b21")
    if r21["verdict"] == "REFUSE":
        # A proposal that timed out without quorum committed once the majority was
        # back (its outcome was "unknown", never "failed"): it holds height 21 and
        # was never released.
        state = leader.status()["chains"][CHAIN]
        assert state["height"] == "21"
        assert bytes.fromhex(state["signbytes"]) in (b"no-quorum-0", b"no-quorum-1")
    else:
        assert r21["verdict"] == "ACCEPT"
    assert leader.commit(22, b"b22")["verdict"] == "ACCEPT"
    released = audit(c)
    assert not any(sb.startswith(b"no-quorum") for sb in released.values())
    converge(c, released, timeout=15)


def test_dynamic_membership_add_and_remove(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(4, store={"dynamic_membership": True})
    c.start(members=[1, 2, 3])
    leader = c.wait_leader()
    for h in range(1, 11):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    # The new node starts empty with join=True, configured with the new membership.
    c.start(4, members=[1, 2, 3, 4], store={"join": True})
    assert c.nodes[4].status()["role"] == "follower"
    assert "error" not in leader.request("add_member", node=4, addr=f"127.0.0.1:{c.ports[4]}")
    r = leader.request("add_member", node=4, addr=f"127.0.0.1:{c.ports[4]}")
    assert r.get("error") == "ConfigError", r  # already a member
    for h in range(11, 21):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    released = audit(c)
    converge(c, released)
    assert all(st["members"] == [1, 2, 3, 4] for st in c.statuses().values())
    # The new member counts in the majority: with a founder down, 4 is needed.
    down = [i for i in (1, 2, 3) if i != leader.node_id][:1]
    for i in down:
        c.kill(i)
    assert leader.commit(21, b"b21")["verdict"] == "ACCEPT"
    # An old member restarted with its old static config learns the change from its log.
    for i in down:
        c.start(i, members=[1, 2, 3])
    converge(c, audit(c))
    assert all(c.statuses()[i]["members"] == [1, 2, 3, 4] for i in down)
    # It can lead: move leadership to the new node, commit through it.
    if leader.node_id != 4:
        assert leader.request("transfer", to=4, timeout=10).get("leader") == 4
    leader = c.wait_leader()
    assert leader.node_id == 4
    assert leader.commit(22, b"b22")["verdict"] == "ACCEPT"
    # Remove it again (not the leader itself: hand leadership back first).
    r = leader.request("remove_member", node=4)
    assert r.get("error") == "ConfigError", r
    assert leader.request("transfer", to=1, timeout=10).get("leader") == 1
    leader = c.wait_leader(exclude={4})
    assert "error" not in leader.request("remove_member", node=4)
    for h in range(23, 31):
        assert leader.commit(h, b"b%d" % h)["verdict"] == "ACCEPT"
    deadline = time.monotonic() + 5
    while not all(st["members"] == [1, 2, 3] for nid, st in c.statuses().items() if nid != 4):
        assert time.monotonic() < deadline, c.statuses()
        time.sleep(0.05)
    # the removed node decides nothing any more
    assert "error" in c.nodes[4].commit(31, b"from-the-removed-node", timeout=3)
    c.kill(4)
    # Full restart with the original configs: state and membership come from the log.
    for i in (1, 2, 3):
        c.kill(i)
    c.start(members=[1, 2, 3])
    leader = c.wait_leader()
    deadline = time.monotonic() + 5
    while not all(st["members"] == [1, 2, 3] for st in c.statuses().values()):
        assert time.monotonic() < deadline, c.statuses()
        time.sleep(0.05)
    assert leader.commit(30, b"other")["verdict"] == "REFUSE"
    assert leader.commit(31, b"b31")["verdict"] == "ACCEPT"
    converge(c, audit(c))


def test_a_log_io_error_takes_the_node_out_and_the_cluster_continues(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3, faults=True)
    c.start()
    leader = c.wait_leader()
    assert leader.commit(1, b"b1")["verdict"] == "ACCEPT"
    c.fault(leader.node_id, "fdatasync_eio")
    r = leader.commit(2, b"b2", timeout=5)
    assert r.get("error") in ("StateError", "ReplicationError", "NotLeader"), r
    st = leader.status()
    assert st["role"] == "stopped" and st["fatal"] and not st["authoritative"], st
    # Fail closed for good: the disk "recovers", the node stays out until restarted.
    c.fault(leader.node_id, "fdatasync_eio", on=False)
    r = leader.commit(2, b"b2-again", timeout=5)
    assert r.get("error") == "StateError", r
    others = c.wait_leader(exclude={leader.node_id}, timeout=10)
    d = others.commit(2, b"b2-new")
    # b2 may have been replicated before the leader's own fsync failed (then the new
    # leader commits it and refuses b2-new); either way one message holds height 2.
    assert d["verdict"] in ("ACCEPT", "REFUSE"), d
    assert others.commit(3, b"b3")["verdict"] == "ACCEPT"
    assert leader.status()["role"] == "stopped"
    # Leadership is never handed to a member that failed closed.
    r = others.request("transfer", to=leader.node_id, timeout=10)
    assert r.get("error") == "ReplicationError", r
    assert c.wait_leader() is others
    assert others.commit(4, b"b4")["verdict"] == "ACCEPT"
    # The operator restarts it: it catches up.
    c.kill(leader.node_id)
    c.start(leader.node_id)
    released = audit(c)
    # nothing the failed node was asked went out; height 2 went out once at most
    want = b"b2-new" if d["verdict"] == "ACCEPT" else None
    assert released.get((CHAIN, 2, 0, 2)) == want, released
    converge(c, released)
    assert c.nodes[leader.node_id].status()["fatal"] is None


def test_decisions_signed_off_the_loop_share_a_raft_round_and_fail_closed(
    tmp_path: Path,
) -> None:
    """``commit(..., sign_later)`` (several chains with native Ed25519 keys): the store has
    the signatures made on the signing thread and decides the signed records; a pass of
    16 chains still takes one Raft round.  A failed signing, or a deadline that passes
    before the signatures come back, proposes nothing."""
    import nacl.bindings

    from nebula.crypto.signworker import SignWorker
    from nebula.errors import BackendError

    chains = [f"chain-{i}" for i in range(16)]
    seeds = {c: bytes([i + 1]) * 32 for i, c in enumerate(chains)}

    def sodium(c: str, msg: bytes) -> bytes:
        return nacl.bindings.crypto_sign(msg, nacl.bindings.crypto_sign_seed_keypair(seeds[c])[1])[
            :64
        ]

    async def go() -> None:
        async with local_cluster(tmp_path, 3, common={"commit_timeout": 2.0}) as (stores, _):
            leader = await leader_of(stores)
            worker = SignWorker()
            keys = {c: worker.key(s) for c, s in seeds.items()}
            try:
                for c in chains:
                    await leader.commit(c, rec(1, b"a"))
                j0 = leader.status()["journal"]

                def unsigned(c: str, ext: bool) -> SignRecord:
                    return SignRecord(2, 0, 3, b"vote-" + c.encode(), b"", b"ext" if ext else b"")

                def later(c: str):
                    return lambda msgs, done: worker.sign(keys[c], msgs, done)

                outs = await asyncio.gather(
                    *(
                        leader.commit(c, unsigned(c, k % 2 == 0), later(c))
                        for k, c in enumerate(chains)
                    )
                )
                j1 = leader.status()["journal"]
                # Sixteen decisions signed off the loop share Raft rounds: the worker
                # hands back what it has once its queue is empty, so a pass's decisions
                # are proposed together (two rounds when it drained its queue once while
                # the loop was still handing over).
                rounds = j1["appends"] - j0["appends"]
                assert j1["entries_appended"] - j0["entries_appended"] == 16, j1
                assert rounds <= 2, j1
                for k, (c, d) in enumerate(zip(chains, outs, strict=True)):
                    assert d.verdict == Verdict.ACCEPT
                    assert leader.combine_seconds(c) > 0  # the "sign" phase of the request
                    assert d.record.signature == sodium(c, b"vote-" + c.encode())
                    if k % 2 == 0:
                        assert d.record.ext_signature == sodium(c, b"ext")
                    else:
                        assert d.record.ext_signature == b""
                    for s in stores:  # the signed record is what every member holds
                        await until(lambda s=s, c=c, d=d: s.last(c) == d.record, 10, "applied")

                # A signing that fails: refused, nothing proposed.
                def failing(msgs, done) -> None:
                    asyncio.get_running_loop().call_soon(done, None, OSError("HSM gone"))

                with pytest.raises(BackendError, match="HSM gone"):
                    await leader.commit(chains[0], SignRecord(3, 0, 2, b"x", b""), failing)
                # A signing slower than the deadline: refused, and its late signatures
                # propose nothing.
                late: list = []
                with pytest.raises(ReplicationError, match="outcome unknown"):
                    await leader.commit(
                        chains[1], SignRecord(3, 0, 2, b"y", b""), lambda m, d: late.append(d)
                    )
                late[0]([b"s" * 64], None)
                await asyncio.sleep(0.2)
                j2 = leader.status()["journal"]
                assert j2["entries_appended"] == j1["entries_appended"], j2
                assert leader.last(chains[0]).height == 2 and leader.last(chains[1]).height == 2
                # Leadership lost while the signatures were being made: NotLeader, and
                # nothing proposed anywhere.
                held: list = []
                waiting = asyncio.ensure_future(
                    leader.commit(
                        chains[2], SignRecord(3, 0, 2, b"z", b""), lambda m, d: held.append(d)
                    )
                )
                await until(lambda: bool(held), 2, "handed over for signing")
                target = next(s for s in stores if s is not leader)
                assert await leader.transfer_leadership(target.node_id) == target.node_id
                held[0]([sodium(chains[2], b"z")], None)
                with pytest.raises(NotLeader):
                    await waiting
                await asyncio.sleep(0.2)
                for s in stores:
                    assert s.last(chains[2]).height == 2
            finally:
                worker.close()

    run(go())
