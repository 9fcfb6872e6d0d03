"""BLS-Raft against a real chain: CometBFT v1.0.1 built with ``-tags bls12381`` and a
3-node Nebula cluster holding a 2-of-3 split of the validator's BLS12-381 key.

No Nebula node holds the whole key.  The leader is SIGKILLed at least 5 times (and
restarted as a follower); three times the node and the leader are killed together after
a precommit's signature was kept from the node; then one follower is killed for good and
the chain must keep committing on the two members left, and with a second member down it
must stop.  Every precommit in the chain verifies against the validator's (group) key and
no duplicate-vote evidence appears.

That evidence check cannot fail on a single-validator chain (its node never sends a
conflicting vote, and BLS gives identical bytes the identical signature), so the privval
connection runs through an auditing relay (tests/support/relay.py) that verifies every
combined signature leaving the cluster with the group key, and keeps one precommit's
signature from the node before it and the Nebula leader are killed: the restarted node
asks again for that step with a new timestamp, the new leader holds the decision's sign
bytes but not its signature, and the shares it gathers must be over the stored bytes -- a
second, different signature there is a double sign the relay's auditor records.
"""

from __future__ import annotations

import time

import pytest

from nebula.crypto.keys import Bls12381Key
from nebula.crypto.threshold import split, write_share_file
from nebula.types import WireFamily
from tests.support.cluster import Auditor, ProcCluster
from tests.support.cometbft import (
    VERIFIERS,
    ValidatorKey,
    duplicate_vote_evidence,
    signed_commits,
    verify_commit_signatures,
)
from tests.support.ports import free_ports
from tests.support.relay import AuditingRelay, withhold_rounds

pytestmark = pytest.mark.e2e

VERSION = "v1.0.1"
KILLS = 5
BLOCKS_BETWEEN = 6
WITHHOLDS = 3


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
    auditor = Auditor("bls12381", whole.public_key)
    relay = AuditingRelay(laddr, auditor, WireFamily.V1_0)  # started with the cluster
    cluster = ProcCluster(
        tmp_path / "nebula",
        3,
        chain_id=chain.chain_id,
        connections=[relay.listen_address],
        version="v1_0",
        signing="threshold_bls",
        extra='[signing.threshold_bls]\nshare_path = "./share.json"\n',
    )
    for d, share in zip(cluster.dirs, shares, strict=True):
        write_share_file(d.home / "share.json", share, overwrite=True)
        assert not (d.home / "privkey").exists()  # no node holds the whole key
    failovers: list[float] = []
    with relay, cluster:
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
        # A precommit's signature kept from the node, then the node and the leader killed
        # together: the restarted node asks again for that step with a new timestamp.
        asked_twice, withheld = withhold_rounds(relay, chain, [("precommit",)] * WITHHOLDS, cluster)
        assert all(asked_twice), (asked_twice, withheld)  # the node did ask again each time
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
    assert relay.violations == [], "\n".join([*relay.violations, f"withheld: {withheld}"])
    auditor.check()
    print(
        f"\n2-of-3 threshold BLS on CometBFT {VERSION}: {KILLS} leader kills, failover "
        f"{[round(f, 2) for f in failovers]} s; {last} blocks, extra rounds {rounds}; "
        f"{WITHHOLDS} precommits withheld ({withheld}), node and leader killed, each asked "
        f"again; one follower down for good, then 8 more blocks; "
        f"{relay.snapshot()['signatures']} signatures audited by the relay"
    )
