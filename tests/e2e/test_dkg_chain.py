"""A real CometBFT v1.0.1 BLS chain signed by shares no machine ever held together:
`nebula keys dkg` run by three members in three directories (real processes, files
carried between them), then a 3-node Nebula cluster holding the three share files signs
the chain, through a leader kill; every precommit verifies against the group key the
ceremony printed, which is the validator key in the chain's genesis.

The duplicate-vote evidence check cannot fail on a single-validator chain, so the privval
connection runs through an auditing relay (tests/support/relay.py) that verifies every
signature leaving the cluster with the group key; twice it keeps a precommit's signature
from the node, which is then killed together with the Nebula leader: the restarted node
asks again for that step with a new timestamp, and a second, different signature there
is a double sign the relay's auditor records."""

from __future__ import annotations

import base64
import shutil

import pytest

from nebula.types import WireFamily
from tests.support.cluster import Auditor, ProcCluster
from tests.support.cometbft import (
    VERIFIERS,
    ValidatorKey,
    duplicate_vote_evidence,
    verify_commit_signatures,
)
from tests.support.dkg import cli_ceremony
from tests.support.ports import free_ports
from tests.support.relay import AuditingRelay, withhold_rounds

pytestmark = pytest.mark.e2e

VERSION = "v1.0.1"
WITHHOLDS = 2


def test_a_dkg_made_2_of_3_key_signs_a_real_bls_chain(tmp_path, local_chains) -> None:
    ceremony = cli_ceremony(tmp_path / "ceremony", 2, 3)
    assert len({f["transcript"] for f in ceremony.finish.values()}) == 1
    group_key = base64.b64decode(ceremony.finish[1]["pub_key"]["value"])
    (port,) = free_ports(1)
    laddr = f"tcp://127.0.0.1:{port}"
    chain = local_chains(
        VERSION,
        start=False,
        bls=True,
        validator=ValidatorKey("bls12381", group_key),
        priv_validator_laddr=laddr,
    )
    auditor = Auditor("bls12381", group_key)
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
    for d in cluster.dirs:
        shutil.copy(ceremony.share(d.node_id), d.home / "share.json")
        assert not (d.home / "privkey").exists()
    with relay, cluster:
        cluster.wait_leader_sync()
        chain.start()
        chain.wait_for_height(4, timeout=60)
        leader = cluster.leader()
        assert leader is not None, cluster.logs()
        cluster.nodes[leader].kill()  # the other two shares carry on
        h = chain.latest_height()
        chain.wait_for_height(h + 4, timeout=45)
        cluster.nodes[leader].start()
        cluster.wait_caught_up(leader)
        # A precommit's signature kept from the node, then the node and the leader killed
        # together: the restarted node asks again for that step with a new timestamp.
        asked_twice, withheld = withhold_rounds(relay, chain, [("precommit",)] * WITHHOLDS, cluster)
        assert all(asked_twice), (asked_twice, withheld)  # the node did ask again each time
        last = chain.wait_for_height(chain.latest_height() + 2, timeout=30)
        verify_commit_signatures(
            chain, group_key, "bls12381", range(1, last), VERIFIERS["bls12381"]
        )
        assert duplicate_vote_evidence(chain, 1, last) == []
        chain.stop()
    assert relay.violations == [], "\n".join([*relay.violations, f"withheld: {withheld}"])
    auditor.check()
    print(
        f"\nDKG 2-of-3 key on CometBFT {VERSION}: {last} blocks, through a leader kill and "
        f"{WITHHOLDS} withheld precommits ({withheld}), each asked again after the node and "
        f"the leader were killed; {relay.snapshot()['signatures']} signatures audited"
    )
