"""Changing a running cluster's membership without wiping Raft data, as the README says.

Real `nebula start` processes with ``raft.dynamic_membership = true`` on every node, the real
`nebula cluster add|remove`, `nebula leader transfer` and `nebula status --json` commands as
subprocesses, and a validator-side driver whose auditor verifies every signature and fails on
any two different signatures for one (chain, height, round, step).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from nebula.crypto.keys import generate
from nebula.types import SignedMsgType, WireFamily
from tests.support.cluster import Auditor, Driver, ProcCluster, driver, vote_req
from tests.support.nebula_proc import run_cli
from tests.support.ports import free_ports

CHAIN = "membership-chain"


async def nebula(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (off the event loop, so the driver keeps accepting connections)."""
    return await asyncio.to_thread(run_cli, *args, check=check)


def _cfgs(cluster: ProcCluster, ids: list[int]) -> list[str]:
    out: list[str] = []
    for d in cluster.dirs:
        if d.node_id in ids:
            out += ["-c", str(d.config_path)]
    return out


async def status_json(cluster: ProcCluster, ids: list[int]) -> dict[int, dict[str, Any]]:
    r = await nebula("status", "--json", *_cfgs(cluster, ids), check=False)
    return {s["node_id"]: s for s in json.loads(r.stdout) if s.get("role") != "down"}


async def wait_status(
    cluster: ProcCluster,
    ids: list[int],
    ok: Callable[[dict[int, dict[str, Any]]], bool],
    what: str,
    timeout: float = 15.0,
) -> dict[int, dict[str, Any]]:
    """Poll `nebula status --json` over ``ids`` until ``ok`` holds for the result."""
    end = time.monotonic() + timeout
    sts: dict[int, dict[str, Any]] = {}
    while time.monotonic() < end:
        sts = await status_json(cluster, ids)
        if sorted(sts) == sorted(ids) and ok(sts):
            return sts
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"{what}: not reached within {timeout}s; last status:\n{sts}\n{cluster.logs()}"
    )


def _members(ids: list[int]) -> Callable[[dict[int, dict[str, Any]]], bool]:
    def ok(sts: dict[int, dict[str, Any]]) -> bool:
        return all(s.get("members") == sorted(ids) for s in sts.values())

    return ok


def _converged(ids: list[int]) -> Callable[[dict[int, dict[str, Any]]], bool]:
    """Same membership, one leader with quorum, every node applied up to the leader's
    commit index and holding the same chains state."""

    def ok(sts: dict[int, dict[str, Any]]) -> bool:
        if not _members(ids)(sts):
            return False
        leaders = [s for s in sts.values() if s["role"] == "leader" and s["has_quorum"]]
        if len(leaders) != 1:
            return False
        lead = leaders[0]
        return all(
            s["applied_index"] >= lead["commit_index"] and s["chains"] == lead["chains"]
            for s in sts.values()
        )

    return ok


async def sign_heights(d: Driver, start: int, count: int) -> int:
    for h in range(start, start + count):
        await d.sign(vote_req(CHAIN, h, SignedMsgType.PREVOTE))
        await d.sign(vote_req(CHAIN, h, SignedMsgType.PRECOMMIT))
    return start + count


def _hrs(sts: dict[int, dict[str, Any]]) -> tuple[int, int, int]:
    """The (height, round, step) every node reports for CHAIN (they must agree)."""
    marks = {
        (int(s["chains"][CHAIN]["height"]), s["chains"][CHAIN]["round"], s["chains"][CHAIN]["step"])
        for s in sts.values()
    }
    assert len(marks) == 1, sts
    return marks.pop()


def test_add_remove_transfer_and_full_restart_keep_raft_data(tmp_path) -> None:
    key = generate("ed25519")
    addrs = [f"tcp://127.0.0.1:{p}" for p in free_ports(1)]
    auditor = Auditor("ed25519", key.public_key)
    cluster = ProcCluster(
        tmp_path,
        3,
        key=key,
        chain_id=CHAIN,
        connections=addrs,
        raft_extra={"dynamic_membership": True},
    )
    for d in cluster.dirs:
        assert "dynamic_membership = true" in d.config_path.read_text()

    async def main() -> None:
        async with driver(addrs, WireFamily.V0_38, CHAIN, auditor) as d:
            with cluster:
                h = await sign_heights(d, 1, 5)

                # -- add node 4: empty data dir, peers = the whole new membership -------
                new = cluster.add_node()
                assert new.node_id == 4 and new.raft_addr is not None
                assert (new.home / "cluster_secret").read_bytes() == (
                    cluster.dirs[0].home / "cluster_secret"
                ).read_bytes()
                assert not (new.home / "raft_data").exists()
                cluster.nodes[4].start()
                r = await nebula(
                    "cluster", "add", *_cfgs(cluster, [1, 2, 3]), "--id", "4",
                    "--addr", new.raft_addr,
                )  # fmt: skip
                assert "members: [1, 2, 3, 4]" in r.stdout, r.stdout
                members = [1, 2, 3, 4]
                sts = await wait_status(cluster, members, _converged(members), "node 4 caught up")
                assert _hrs(sts) == (5, 0, 3)
                h = await sign_heights(d, h, 5)
                sts = await wait_status(cluster, members, _converged(members), "4 nodes converged")
                assert _hrs(sts) == (10, 0, 3)

                # -- remove a follower (not the new node), then stop it ---------------
                leader = await cluster.wait_leader()
                follower = next(i for i in (1, 2, 3) if i != leader)
                r = await nebula(
                    "cluster", "remove", *_cfgs(cluster, members), "--id", str(follower)
                )
                members.remove(follower)
                assert f"members: {members}" in r.stdout, r.stdout
                cluster.nodes[follower].stop()
                h = await sign_heights(d, h, 5)
                await wait_status(cluster, members, _converged(members), f"{follower} removed")

                # -- move leadership away, then remove the old leader -----------------
                old = await cluster.wait_leader()
                r = await nebula("leader", "transfer", *_cfgs(cluster, members))
                new_leader = int(r.stdout.strip().rsplit(" ", 1)[-1])
                assert new_leader != old and new_leader in members, r.stdout
                r = await nebula("cluster", "remove", *_cfgs(cluster, members), "--id", str(old))
                members.remove(old)
                assert f"members: {members}" in r.stdout, r.stdout
                cluster.nodes[old].stop()
                h = await sign_heights(d, h, 5)
                sts = await wait_status(cluster, members, _converged(members), f"{old} removed")
                assert _hrs(sts) == (h - 1, 0, 3)
                last_req = vote_req(CHAIN, h, SignedMsgType.PREVOTE)
                last = await d.sign(last_req)
                assert len(members) == 2

                # -- full restart of the current membership, Raft data kept -----------
                # The configs are left as written (node 4's still lists all four peers):
                # the membership after the restart must come from the Raft data.
                assert all(f"id = {i}" in new.config_path.read_text() for i in (1, 2, 3, 4))
                for nid in members:
                    cluster.nodes[nid].stop()
                d.current[0] = None
                for nid in members:
                    cluster.nodes[nid].start()
                sts = await wait_status(cluster, members, _converged(members), "after restart")
                assert _hrs(sts) == (h, 0, 2)
                for s in sts.values():  # JSON object keys: the peer ids as strings
                    assert set(s["peers"]) == {str(i) for i in members if i != s["node_id"]}
                again = await d.sign(last_req)  # an identical retry: the cached signature
                assert again.vote.signature == last.vote.signature
                old_req = await d.request_once(vote_req(CHAIN, 3))
                assert old_req.error is not None and "regression" in old_req.error.description
                await d.sign(vote_req(CHAIN, h, SignedMsgType.PRECOMMIT))
                h = await sign_heights(d, h + 1, 5)
                await wait_status(cluster, members, _converged(members), "signing after restart")
                for nid in set(cluster.nodes) - set(members):
                    assert not cluster.nodes[nid].alive()

    t0 = time.monotonic()
    asyncio.run(main())
    auditor.check()
    # 5 + 5 + 5 + 5 heights of prevote+precommit, the restart height, 5 more heights.
    assert auditor.count >= 2 * 20 + 2 + 2 * 5
    print(f"\nmembership scenario: {time.monotonic() - t0:.1f}s, {auditor.count} signatures")
