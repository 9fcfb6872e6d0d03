"""One 3-node Nebula Raft cluster signs two real CometBFT chains of different lines at once.

Chain A runs CometBFT v0.38.25, chain B v1.0.1; each is a single-validator chain with its
own validator key, whose ``priv_validator_laddr`` the cluster's leader dials (the nodes'
config lists both as ``[[chains]]`` entries, over one shared Raft store).  The leader is
SIGKILLed 5 times and restarted each time as a follower; after every kill both chains must
commit two more heights (the second one needs signatures made after the kill, by the new
leader).  At the end every height of each chain must carry a precommit that verifies with
that chain's own key (and not with the other chain's), and neither chain may hold
duplicate-vote evidence.  That check cannot fail with one node per chain (it never sends
a conflicting vote), so each chain's privval connection also runs through an auditing
relay, and once per chain the relay keeps a precommit's signature from the node, which is
then killed together with the Nebula leader: the restarted node asks again for that step
with a new timestamp, and a second, different signature there is a double sign the
relay's auditor catches.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import pytest

from nebula.crypto.keys import SigningKey, generate
from nebula.devnet.cluster import ChainDef, config_version
from nebula.types import WireFamily
from tests.support.cluster import Auditor, ProcCluster
from tests.support.cometbft import (
    VERIFIERS,
    DevnetError,
    LocalChain,
    ValidatorKey,
    duplicate_vote_evidence,
    signed_commits,
    verify_commit_signatures,
)
from tests.support.ports import free_ports
from tests.support.relay import AuditingRelay, withhold_then_restart

pytestmark = pytest.mark.e2e

VERSIONS = ("v0.38.25", "v1.0.1")
KILLS = 5
BLOCKS_BETWEEN = 3


def _advance_all(chains: list[LocalChain], by: int, timeout: float = 30.0) -> list[int]:
    """Wait until every chain is ``by`` heights past where it is now; the heights reached."""
    targets = [c.latest_height() + by for c in chains]
    return [c.wait_for_height(t, timeout=timeout) for c, t in zip(chains, targets, strict=True)]


def test_one_cluster_signs_two_chains_through_leader_kills(tmp_path, local_chains) -> None:
    keys: list[SigningKey] = [generate("ed25519") for _ in VERSIONS]
    ports = free_ports(len(VERSIONS))
    chains: list[LocalChain] = []
    defs: list[ChainDef] = []
    relays: list[AuditingRelay] = []
    auditors: list[Auditor] = []
    with contextlib.ExitStack() as stack:
        for i, (version, key, port) in enumerate(zip(VERSIONS, keys, ports, strict=True)):
            laddr = f"tcp://127.0.0.1:{port}"
            chain = local_chains(
                version,
                start=False,
                chain_id=f"multi-{i}-{config_version(version)}",
                validator=ValidatorKey("ed25519", key.public_key),
                priv_validator_laddr=laddr,
            )
            chains.append(chain)
            auditors.append(Auditor("ed25519", key.public_key))
            family = WireFamily.from_config(config_version(version))
            relays.append(stack.enter_context(AuditingRelay(laddr, auditors[-1], family)))
            defs.append(
                ChainDef(chain.chain_id, config_version(version), key, [relays[-1].listen_address])
            )
        _run(tmp_path, chains, keys, defs, relays)
    for relay in relays:
        assert relay.violations == [], relay.violations
    for auditor in auditors:
        auditor.check()


def _run(
    tmp_path,
    chains: list[LocalChain],
    keys: list[SigningKey],
    defs: list[ChainDef],
    relays: list[AuditingRelay],
) -> None:
    assert len({c.chain_id for c in chains}) == len(chains)
    assert len({k.public_key for k in keys}) == len(keys)

    cluster = ProcCluster(tmp_path / "nebula", 3, chains=defs)
    with cluster:
        leader = cluster.wait_leader_sync()
        served = cluster.status(leader)["served"]
        assert set(served) == {c.chain_id for c in chains}, served
        for chain, key in zip(chains, keys, strict=True):
            assert served[chain.chain_id]["address"] == key.address.hex().upper(), served
            # Two chains with native Ed25519 keys: signed on the native signing thread.
            assert served[chain.chain_id]["signs_on"] == "worker", served
        for chain in chains:
            chain.start()
        for chain in chains:
            chain.wait_for_height(2, timeout=60)

        failovers: list[float] = []
        killed: list[int] = []
        for _ in range(KILLS):
            _advance_all(chains, BLOCKS_BETWEEN)
            leader = cluster.wait_leader_sync()
            # The leader alone holds the validator connections, one per chain.
            st = cluster.status(leader)
            assert st is not None, cluster.logs()
            assert {c: s["validators_connected"] for c, s in st["served"].items()} == {
                c.chain_id: 1 for c in chains
            }, st["served"]
            before = [c.latest_height() for c in chains]
            t_kill = time.monotonic()
            cluster.nodes[leader].kill()
            # Two heights on each chain: the second needs votes signed after the kill.
            after = [
                c.wait_for_height(h + 2, timeout=30) for c, h in zip(chains, before, strict=True)
            ]
            failovers.append(time.monotonic() - t_kill)
            assert all(a >= b + 2 for a, b in zip(after, before, strict=True))
            new_leader = cluster.wait_leader_sync()
            assert new_leader != leader
            killed.append(leader)
            cluster.nodes[leader].start()  # back as a follower
            cluster.wait_caught_up(leader)

        # Once per chain: a precommit's signature kept from its node, then the node and
        # the Nebula leader killed together; the restarted node asks again for that step
        # (with a new timestamp) and the new leader answers from the replicated state.
        for chain, relay in zip(chains, relays, strict=True):
            _advance_all(chains, 2)
            assert withhold_then_restart(relay, chain, cluster, ("precommit",)), relay.withheld

        last = _advance_all(chains, 3)
        rounds = []
        for chain, key, other, top in zip(chains, keys, reversed(keys), last, strict=True):
            # Every height carries this chain's own key's precommit ...
            sigs = verify_commit_signatures(
                chain, key.public_key, "ed25519", range(1, top), VERIFIERS["ed25519"]
            )
            assert [s.height for s in sigs] == list(range(1, top))
            # ... and not the other chain's key (the check tells the keys apart).
            with pytest.raises(DevnetError, match="no signature from validator"):
                verify_commit_signatures(
                    chain, other.public_key, "ed25519", [top - 1], VERIFIERS["ed25519"]
                )
            assert duplicate_vote_evidence(chain, 1, top) == []
            rounds.append(sum(c.round for c in signed_commits(chain, 1, top - 1)))
        for chain in chains:
            chain.stop()
    assert len(killed) == KILLS
    print(
        f"\ntwo chains ({', '.join(VERSIONS)}) on one 3-node cluster: {KILLS} leader SIGKILLs "
        f"(nodes {killed}); kill -> two more heights on both chains: median "
        f"{statistics.median(failovers):.2f}s, max {max(failovers):.2f}s; heights "
        f"{dict(zip(VERSIONS, last, strict=True))} all signed by their own key, extra rounds "
        f"{dict(zip(VERSIONS, rounds, strict=True))}"
    )
