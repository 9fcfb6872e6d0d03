"""A Nebula Raft cluster of real processes on 127.0.0.1, driven from the validator side.

Every signature that leaves the cluster goes through the auditor, which verifies it and
fails on any two different signatures for one (chain, height, round, step).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nebula.crypto.keys import generate
from nebula.errors import NebulaError
from nebula.types import SignedMsgType, Timestamp, WireFamily
from tests.support.cluster import Auditor, ProcCluster, driver, vote_req
from tests.support.ports import free_ports

CHAIN = "raft-chain"


def _addrs(n: int = 1) -> list[str]:
    return [f"tcp://127.0.0.1:{p}" for p in free_ports(n)]


def _setup(tmp_path, n, *, proxied=False, sentries=1):
    key = generate("ed25519")
    addrs = _addrs(sentries)
    cluster = ProcCluster(tmp_path, n, key=key, chain_id=CHAIN, connections=addrs, proxied=proxied)
    return key, addrs, cluster, Auditor("ed25519", key.public_key)


async def _sign_heights(d, start: int, count: int) -> int:
    for h in range(start, start + count):
        await d.sign(vote_req(CHAIN, h, SignedMsgType.PREVOTE))
        await d.sign(vote_req(CHAIN, h, SignedMsgType.PRECOMMIT))
    return start + count


@pytest.mark.parametrize("n", [3, 5])
def test_leader_sigkill_during_continuous_signing(tmp_path, n) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, n)

    async def main() -> list[float]:
        failovers = []
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                h = await _sign_heights(d, 1, 10)
                for _ in range(2):
                    leader = await cluster.wait_leader()
                    killed_at = time.monotonic()
                    cluster.nodes[leader].kill()
                    h = await _sign_heights(d, h, 1)
                    failovers.append(time.monotonic() - killed_at)
                    h = await _sign_heights(d, h, 5)
                    new = await cluster.wait_leader()
                    assert new != leader
                    cluster.nodes[leader].start()  # it rejoins as a follower
                h = await _sign_heights(d, h, 5)
        return failovers

    failovers = asyncio.run(main())
    auditor.check()
    assert auditor.count >= 2 * 27
    print(f"\n{n} nodes: failover (kill -> next signature) {[f'{f:.2f}s' for f in failovers]}")


def test_leader_sigstop_then_sigcont(tmp_path) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, 3)

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                h = await _sign_heights(d, 1, 5)
                leader = await cluster.wait_leader()
                old_conn = await d.connection()
                cluster.nodes[leader].signal(signal.SIGSTOP)
                try:
                    # The validator gives up on the silent connection; a new leader dials.
                    old_conn.close()
                    d.current[0] = None
                    h = await _sign_heights(d, h, 5)
                    new = await cluster.wait_leader(exclude={leader})
                    assert new != leader
                    # `nebula status` over every member answers although one is paused:
                    # members are asked at once, each with its own deadline.
                    cfgs = [a for dd in cluster.dirs for a in ("-c", str(dd.config_path))]
                    t0 = time.monotonic()
                    r = await asyncio.to_thread(
                        subprocess.run,
                        [sys.executable, "-m", "nebula.cli.main", "status", "--json",
                         "--timeout", "1", *cfgs],
                        capture_output=True, text=True, timeout=30,
                    )  # fmt: skip
                    took = time.monotonic() - t0
                    sts = {s["config"]: s for s in json.loads(r.stdout)}
                    paused = str(next(x for x in cluster.dirs if x.node_id == leader).config_path)
                    assert sts[paused]["role"] == "unreachable", sts[paused]
                    assert r.returncode == 1  # not every member answered
                    assert sum(s["role"] == "leader" for s in sts.values()) == 1
                    # bounded: one 1 s deadline (asked concurrently) plus process start-up
                    assert took < 10, took
                finally:
                    cluster.nodes[leader].signal(signal.SIGCONT)
                # The old leader wakes up: it must step down and sign nothing.
                h = await _sign_heights(d, h, 5)
                await asyncio.sleep(1.5)
                st = cluster.status(leader)
                assert st is not None and st["role"] != "leader"
                assert not any(v["connected"] for v in st["validators"])

    asyncio.run(main())
    auditor.check()


def test_partitioned_leader_signs_nothing_and_majority_continues(tmp_path) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, 3, proxied=True)

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                h = await _sign_heights(d, 1, 5)
                leader = await cluster.wait_leader()
                conn = await d.connection()
                cluster.cut(leader)
                # The isolated leader cannot commit: it must refuse (or drop), never sign.
                # It is asked for another block (salt=1) than the majority signs below at
                # the same heights: anything it released would be a conflict the auditor
                # sees (the assertion stays outside the handler that ends the loop).
                for k in range(3):
                    try:
                        r = await d.request_once(vote_req(CHAIN, h + k, salt=1), timeout=3)
                    except (TimeoutError, OSError, asyncio.IncompleteReadError, NebulaError):
                        break  # dropped, or no answer: nothing released
                    assert r.error is not None, "an isolated leader released a signature"
                conn.close()
                d.current[0] = None
                new = await cluster.wait_leader(exclude={leader}, timeout=15)
                assert new != leader
                # The majority signs the same heights, for the other block.
                h = await _sign_heights(d, h, 5)
                cluster.heal()
                h = await _sign_heights(d, h, 5)
                await asyncio.sleep(2)
                st = cluster.status(leader)
                assert st is not None and (
                    st["role"] != "leader" or leader == await cluster.wait_leader()
                )

    asyncio.run(main())
    auditor.check()


def test_two_validators_same_hrs_exactly_one_signature(tmp_path) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, 3, sentries=2)

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                await d.sign(vote_req(CHAIN, 1), i=0)
                await d.connection(1)
                for h in range(2, 12):
                    a = vote_req(CHAIN, h, salt=1)
                    b = vote_req(CHAIN, h, salt=2)  # a conflicting block at the same HRS
                    ra, rb = await asyncio.gather(d.request_once(a, 0), d.request_once(b, 1))
                    signed = [r for r in (ra, rb) if r.error is None]
                    assert len(signed) == 1, (ra.error, rb.error)

    asyncio.run(main())
    auditor.check()


def test_identical_retry_after_failover_gets_the_cached_signature(tmp_path) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, 3)

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                await _sign_heights(d, 1, 3)
                first = await d.sign(vote_req(CHAIN, 4))
                leader = await cluster.wait_leader()
                cluster.nodes[leader].kill()
                # The node retries after failover; its clock moved on, the vote did not.
                retry = vote_req(CHAIN, 4, ts=Timestamp(1_700_009_999, 5))
                again = await d.sign(retry)
                assert again.vote.signature == first.vote.signature
                assert again.vote.timestamp == first.vote.timestamp  # the stored one
                conflicting = await d.request_once(vote_req(CHAIN, 4, salt=9))
                assert (
                    conflicting.error is not None and "conflicting" in conflicting.error.description
                )

    asyncio.run(main())
    auditor.check()


def test_full_cluster_restart_keeps_state(tmp_path) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, 3)

    async def main() -> None:
        async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
            with cluster:
                await _sign_heights(d, 1, 10)
                last = await d.sign(vote_req(CHAIN, 11))
            d.current[0] = None
            cluster.start()
            try:
                again = await d.sign(vote_req(CHAIN, 11))
                assert again.vote.signature == last.vote.signature
                r = await d.sign(vote_req(CHAIN, 12))
                assert r.error is None
                old = await d.request_once(vote_req(CHAIN, 5))
                assert old.error is not None and "regression" in old.error.description
            finally:
                cluster.stop()

    asyncio.run(main())
    auditor.check()


def test_followers_never_answer_validators(tmp_path) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, 3)

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                await _sign_heights(d, 1, 5)
                leader = await cluster.wait_leader()
                await asyncio.sleep(0.5)
                assert len(d.listeners[0].all_connections) == 1
                for nid in cluster.nodes:
                    st = cluster.status(nid)
                    assert st is not None
                    connected = any(v["connected"] for v in st["validators"])
                    assert connected == (nid == leader), (nid, st["role"])
                # Moving leadership moves the connection: the old leader closes at once.
                new = (
                    await asyncio.get_running_loop().run_in_executor(
                        None,
                        lambda: __import__("nebula.aio.admin", fromlist=["x"]).request(
                            cluster._sockets[leader], "transfer", timeout=15
                        ),
                    )
                )["leader_id"]
                assert new != leader
                await _sign_heights(d, 6, 3)
                st_old = cluster.status(leader)
                assert not any(v["connected"] for v in st_old["validators"])

    asyncio.run(main())
    auditor.check()


def test_no_secret_no_start(tmp_path) -> None:
    key, addrs, cluster, auditor = _setup(tmp_path, 3)
    d = cluster.dirs[0]
    (d.home / "cluster_secret").write_bytes(b"")
    node = cluster.nodes[d.node_id]
    node.start()
    deadline = time.monotonic() + 15
    while node.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not node.alive()
    assert "secret" in node.log_text().lower()
    (d.home / "cluster_secret").chmod(0o644)
    os.chmod(d.home / "cluster_secret", 0o644)


def test_raft_metrics_and_readiness(tmp_path) -> None:
    import urllib.request

    key = generate("ed25519")
    addrs = _addrs(1)
    cluster = ProcCluster(tmp_path, 3, key=key, chain_id=CHAIN, connections=addrs, metrics=True)
    auditor = Auditor("ed25519", key.public_key)

    def scrape(nid: int, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{cluster.metrics_ports[nid - 1]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def observe() -> dict[int, tuple[dict, str, int, str]] | None:
        """Every node's /metrics and /readyz, each between two admin status reads that
        agree on role, term and leader, all in one term with one leader; None if an
        election ran meanwhile (then there is no single truth to compare against)."""
        out = {}
        for nid in cluster.nodes:
            st0 = cluster.status(nid)
            code, body = scrape(nid, "/metrics")
            rcode, rtext = scrape(nid, "/readyz")
            st1 = cluster.status(nid)
            key = ("role", "term", "leader_id")
            if st0 is None or st1 is None or any(st0[k] != st1[k] for k in key):
                return None
            assert code == 200
            out[nid] = (st1, body, rcode, rtext)
        sts = [o[0] for o in out.values()]
        if len({(st["term"], st["leader_id"]) for st in sts}) != 1:
            return None
        if sorted(st["role"] for st in sts) != ["follower", "follower", "leader"]:
            return None
        return out

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                loop = asyncio.get_running_loop()
                leader0 = await cluster.wait_leader()
                term0 = cluster.status(leader0)["term"]
                await _sign_heights(d, 1, 5)
                deadline = time.monotonic() + 30
                seen = None
                while seen is None and time.monotonic() < deadline:
                    seen = await loop.run_in_executor(None, observe)
                assert seen is not None, "the cluster never held still for one observation"
                # The gauges are read from the store as they are scraped: what /metrics
                # says is what the node said just before and just after.
                any_st = next(iter(seen.values()))[0]
                leader, term = any_st["leader_id"], any_st["term"]
                commits = 0.0
                for st, body, rcode, rtext in seen.values():
                    role = 2.0 if st["role"] == "leader" else 0.0
                    assert f"nebula_raft_role {role}" in body
                    assert f"nebula_raft_term {float(st['term'])}" in body
                    assert f"nebula_raft_leader_id {float(leader)}" in body
                    assert rcode == 200, rtext
                    assert st["role"] in rtext
                    for line in body.splitlines():
                        if line.startswith("nebula_raft_commit_seconds_count "):
                            commits += float(line.split()[1])
                # Every decision is observed once, by the leader that committed it: all 10
                # by one node if no election ran since before the first; never more.
                if term == term0:
                    assert "nebula_raft_commit_seconds_count 10.0" in seen[leader][1]
                    assert commits == 10.0
                else:
                    assert 0 < commits <= 10.0
                follower = next(n for n in cluster.nodes if n != leader)
                others = [n for n in cluster.nodes if n != follower]
                for n in others:
                    cluster.nodes[n].kill()
                await asyncio.sleep(3)
                code, text = await loop.run_in_executor(None, scrape, follower, "/readyz")
                assert code == 503, text
                code, _ = await loop.run_in_executor(None, scrape, follower, "/healthz")
                assert code == 200

    asyncio.run(main())
    auditor.check()


class _Evil:
    """Unpickling this runs a shell command: what an unauthenticated Raft peer would send."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_raft_port_never_accepts_an_unauthenticated_peer(tmp_path) -> None:
    """Pickles (what pysyncobj's port unpickled), garbage and a wrong secret, sent to the
    Raft transport of every member: nothing runs, every connection is refused, the
    cluster keeps signing."""
    import pickle
    import struct
    import zlib

    from tests.support.frameproxy import hello_bytes, raw_exchange

    _key, addrs, cluster, auditor = _setup(tmp_path, 3)
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(str(marker)))
    assert b"system" in evil  # a real exploit: loading it would create the marker

    def attack(me: int, port: int) -> list[str]:
        peer = 1 if me != 1 else 2
        hello = hello_bytes(peer, me, os.urandom(32))
        wrong = b"not-the-cluster-secret-0123456789"
        exchanges = {
            # pysyncobj's wire: i32 length + zlib(pickle), no password
            "pysyncobj pickle": raw_exchange(
                port, hello=struct.pack("i", len(z := zlib.compress(evil, 3))) + z
            ),
            "bare pickle": raw_exchange(port, hello=evil),
            # a good hello, then the pickle where the authenticator belongs
            "pickle as a frame": raw_exchange(
                port, hello=hello, then=[struct.pack(">I", len(evil)) + evil]
            ),
            # the pickle sealed under a wrong secret, after a wrong authenticator
            "pickle under a wrong secret": raw_exchange(
                port, hello=hello, secret=wrong, ids=(peer, me),
                then=[("auth",), ("frame", b"\x01" + evil)],
            ),
            "garbage": raw_exchange(port, hello=os.urandom(300)),
        }  # fmt: skip
        kept_open = [what for what, ex in exchanges.items() if not ex.closed]
        # nothing but the listener's nonce ever comes back
        talked = [what for what, ex in exchanges.items() if len(ex.received) not in (0, 32)]
        return kept_open + talked

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
                await _sign_heights(d, 1, 3)
                loop = asyncio.get_running_loop()
                for me, port in enumerate(cluster.ports, start=1):
                    bad = await loop.run_in_executor(None, attack, me, port)
                    assert bad == [], f"node {me}: not refused: {bad}"
                await _sign_heights(d, 4, 3)  # the cluster did not notice
                for nid in cluster.nodes:
                    assert cluster.nodes[nid].alive()
                    st = cluster.status(nid)
                    assert st is not None

    asyncio.run(main())
    auditor.check()
    assert auditor.count >= 12
    assert not marker.exists(), "an unauthenticated peer got code executed"
