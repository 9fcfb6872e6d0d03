"""Membership changes that would leave the cluster without a quorum are refused.

`nebula cluster add` with a typo in ``--addr`` or ``--id`` (or before the new node is
started) used to commit at once: the new voter counts in the majority from then on, so a
one-member cluster (and any cluster with no spare live member) lost its quorum for good -
no signature, no `nebula cluster remove` (it needs a leader), no `nebula state export`
(it needs a leader) - while the CLI printed the new member list as a success.  Likewise
`nebula cluster remove` of a live member while another is down (the wrong id typed when
removing the dead one) left the remaining voters without a majority (found in review).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nebula.errors import ConfigError
from nebula.guard import Verdict
from nebula.state.raft import RaftStore
from tests.integration.conftest import FAST
from tests.integration.test_raft_store import (
    CHAIN,
    SECRET,
    leader_of,
    local_cluster,
    rec,
    run,
)
from tests.support.ports import free_ports

pytestmark = pytest.mark.timeout(120)


def test_adding_an_unreachable_member_to_a_one_member_cluster_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        (port, nowhere) = free_ports(2)
        addr = f"127.0.0.1:{port}"
        store = RaftStore(
            1,
            addr,
            {1: addr},
            tmp_path / "n1",
            SECRET,
            dynamic_membership=True,
            loop=asyncio.get_running_loop(),
            **FAST,
        )
        await store.start()
        try:
            await leader_of([store])
            assert (await store.commit(CHAIN, rec(1, b"b1"))).verdict == Verdict.ACCEPT
            # No node 2 listens there: adding it as a voter would need it for every commit.
            with pytest.raises(ConfigError, match="not reachable"):
                await store.add_member(2, f"127.0.0.1:{nowhere}")
            assert store.status()["members"] == [1]
            await asyncio.sleep(2 * FAST["election_timeout_max"])
            assert store.is_authoritative()
            assert (await store.commit(CHAIN, rec(2, b"b2"))).verdict == Verdict.ACCEPT
        finally:
            await store.close()

    run(go())


def test_adding_under_a_wrong_id_is_refused(tmp_path: Path) -> None:
    """Node 3 runs at the address, but the operator typed --id 4: the handshake to it
    (addressed to node 4) is refused, so node 4 would never answer."""

    async def go() -> None:
        async with local_cluster(tmp_path, 3, common={"dynamic_membership": True}) as (
            stores,
            _,
        ):
            leader = await leader_of(stores)
            others = [s for s in stores if s is not leader]
            await others[0].close()  # one member down: no spare live voter
            with pytest.raises(ConfigError, match="not reachable"):
                await leader.add_member(4, others[1]._transport._address)
            assert leader.status()["members"] == [1, 2, 3]
            assert (await leader.commit(CHAIN, rec(1, b"b1"))).verdict == Verdict.ACCEPT

    run(go())


def test_removing_a_live_member_while_another_is_down_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with local_cluster(tmp_path, 3, common={"dynamic_membership": True}) as (
            stores,
            _,
        ):
            leader = await leader_of(stores)
            live, dead = [s for s in stores if s is not leader]
            await dead.close()
            await asyncio.sleep(2 * FAST["election_timeout_max"])  # no longer heard from
            assert (await leader.commit(CHAIN, rec(1, b"b1"))).verdict == Verdict.ACCEPT
            # Removing the live one would leave {leader, dead}: no majority, for good.
            with pytest.raises(ConfigError, match="quorum"):
                await leader.remove_member(live.node_id)
            assert leader.status()["members"] == [1, 2, 3]
            assert (await leader.commit(CHAIN, rec(2, b"b2"))).verdict == Verdict.ACCEPT
            # Removing the dead one is what the operator meant: allowed.
            await leader.remove_member(dead.node_id)
            assert sorted(leader.status()["members"]) == sorted([leader.node_id, live.node_id])
            assert (await leader.commit(CHAIN, rec(3, b"b3"))).verdict == Verdict.ACCEPT

    run(go())


def test_without_dynamic_membership_the_setting_is_named_at_once(tmp_path: Path) -> None:
    async def go() -> None:
        async with local_cluster(tmp_path, 3) as (stores, _):
            leader = await leader_of(stores)
            (nowhere,) = free_ports(1)
            with pytest.raises(ConfigError, match="dynamic_membership"):
                await leader.add_member(4, f"127.0.0.1:{nowhere}")
            with pytest.raises(ConfigError, match="dynamic_membership"):
                await leader.remove_member(next(s for s in stores if s is not leader).node_id)

    run(go())
