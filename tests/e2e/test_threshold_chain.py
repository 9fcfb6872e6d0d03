"""BLS-Raft against a real chain: CometBFT v1.0.1 built with ``-tags bls12381`` and a
3-node Nebula cluster holding a 2-of-3 split of the validator's BLS12-381 key.

No Nebula node holds the whole key.  The leader is SIGKILLed at least 5 times (and
restarted as a follower), then one follower is killed for good and the chain must keep
committing on the two members left, and with a second member down it must stop; every
precommit verifies against the validator's
(group) key and no duplicate-vote evidence appears.
"""

from __future__ import annotations

import time

import pytest

from nebula.crypto.keys import Bls12381Key
from nebula.crypto.threshold import split, write_share_file
from tests.support.cluster import ProcCluster
from tests.support.cometbft import (
    VERIFIERS,
    ValidatorKey,
    duplicate_vote_evidence,
    signed_commits,
    verify_commit_signatures,
)
from tests.support.ports import free_ports

pytestmark = pytest.mark.e2e

VERSION = "v1.0.1"
KILLS = 5
BLOCKS_BETWEEN = 6


def test_2_of_3_threshold_cluster_signs_a_bls_chain_through_kills(tmp_path, local_chains) -> None:
    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), 2, 3)
    (port,) = free_ports(1)
    laddr = f"tcp://127.0.0.1:{port}"
    chain = local_chains(
        VERSION,
        start=False,
        bls=True,
        validator=ValidatorKey("bls12381", whole.public_key),
        priv_validator_laddr=laddr,
    )
    cluster = ProcCluster(
        tmp_path / "nebula",
        3,
        chain_id=chain.chain_id,
        connections=[laddr],
        version="v1_0",
        signing="threshold_bls",
        extra='[signing.threshold_bls]\nshare_path = "./share.json"\n',
    )
    for d, share in zip(cluster.dirs, shares, strict=True):
        write_share_file(d.home / "share.json", share, overwrite=True)
        assert not (d.home / "privkey").exists()  # no node holds the whole key
    failovers: list[float] = []
    with cluster:
        cluster.wait_leader_sync()
        chain.start()
        chain.wait_for_height(2, timeout=90)
        for _ in range(KILLS):
            h0 = chain.latest_height()
            chain.wait_for_height(h0 + BLOCKS_BETWEEN, timeout=60)
            leader = cluster.leader()
            assert leader is not None, cluster.logs()
            h_kill = chain.latest_height()
            t_kill = time.monotonic()
            cluster.nodes[leader].kill()
            chain.wait_for_height(h_kill + 1, timeout=30)
            failovers.append(time.monotonic() - t_kill)
            cluster.nodes[leader].start()
        # One follower down for good: the leader and the other member still sign.
        leader = cluster.leader()
        assert leader is not None
        gone = next(i for i in cluster.nodes if i != leader)
        cluster.nodes[gone].kill()
        h = chain.latest_height()
        last = chain.wait_for_height(h + 8, timeout=60)
        verify_commit_signatures(
            chain, whole.public_key, "bls12381", range(1, last), VERIFIERS["bls12381"]
        )
        assert duplicate_vote_evidence(chain, 1, last) == []
        rounds = sum(c.round for c in signed_commits(chain, 1, last - 1))
        # Two of three down: one share is not enough, the chain stops.
        cluster.nodes[leader].kill()
        stalled_at = chain.latest_height()
        time.sleep(6)
        assert chain.latest_height() <= stalled_at + 1
        chain.stop()
    print(
        f"\n2-of-3 threshold BLS on CometBFT {VERSION}: {KILLS} leader kills, failover "
        f"{[round(f, 2) for f in failovers]} s; {last} blocks, extra rounds {rounds}; "
        f"one follower down for good, then 8 more blocks"
    )
