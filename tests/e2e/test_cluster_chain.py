"""A 3-node Nebula cluster signs a real CometBFT chain while its leader is killed.

The leader is SIGKILLed about every 10 blocks (and restarted as a follower once a new
leader signs), at least 5 times; the chain must keep committing, every precommit must
verify with the validator key, and no duplicate-vote evidence may appear.  Failover time
(kill to the next committed block) and rounds lost per failover are reported.

The transit variant signs through a real OpenBao server (issue 4): all three nodes share
one Vault transit key, and the key never touches a Nebula disk.
"""

from __future__ import annotations

import statistics
import time

import pytest

from nebula.crypto.keys import generate, write_private_file
from nebula.devnet.cluster import config_version
from tests.support.cluster import ProcCluster
from tests.support.cometbft import (
    VERIFIERS,
    ValidatorKey,
    duplicate_vote_evidence,
    signed_commits,
    verify_commit_signatures,
)
from tests.support.openbao import OpenBao
from tests.support.ports import free_ports

pytestmark = pytest.mark.e2e

KILLS = 5
BLOCKS_BETWEEN = 10


def _run_failovers(chain, cluster: ProcCluster, kills: int) -> list[dict]:
    report = []
    for _ in range(kills):
        h0 = chain.latest_height()
        chain.wait_for_height(h0 + BLOCKS_BETWEEN, timeout=60)
        leader = cluster.leader()
        assert leader is not None, cluster.logs()
        h_kill = chain.latest_height()
        t_kill = time.monotonic()
        cluster.nodes[leader].kill()
        chain.wait_for_height(h_kill + 1, timeout=30)
        t_next = time.monotonic()
        report.append({"killed": leader, "height": h_kill, "failover_s": t_next - t_kill})
        cluster.nodes[leader].start()  # back as a follower, for the next round
    return report


def _rounds_lost(chain, first: int, last: int) -> int:
    return sum(c.round for c in signed_commits(chain, first, last))


def _print_report(label: str, report: list[dict], rounds: int, blocks: int) -> None:
    fo = [r["failover_s"] for r in report]
    print(
        f"\n{label}: {len(fo)} leader kills over {blocks} blocks; failover (kill -> next block) "
        f"median {statistics.median(fo):.2f}s, max {max(fo):.2f}s, each "
        f"{[round(x, 2) for x in fo]}; heights missed 0 (a single-validator chain cannot skip "
        f"one), extra rounds needed in total: {rounds}"
    )


@pytest.mark.parametrize("version", ["v0.38.25", "v1.0.1"])
def test_cluster_signs_chain_through_leader_kills(tmp_path, local_chains, version) -> None:
    key = generate("ed25519")
    (port,) = free_ports(1)
    laddr = f"tcp://127.0.0.1:{port}"
    chain = local_chains(
        version,
        start=False,
        validator=ValidatorKey("ed25519", key.public_key),
        priv_validator_laddr=laddr,
    )
    cluster = ProcCluster(
        tmp_path / "nebula",
        3,
        key=key,
        chain_id=chain.chain_id,
        connections=[laddr],
        version=config_version(version),
    )
    with cluster:
        cluster.wait_leader_sync()
        chain.start()
        chain.wait_for_height(2, timeout=60)
        report = _run_failovers(chain, cluster, KILLS)
        last = chain.wait_for_height(chain.latest_height() + 5, timeout=30)
        verify_commit_signatures(
            chain, key.public_key, "ed25519", range(1, last), VERIFIERS["ed25519"]
        )
        assert duplicate_vote_evidence(chain, 1, last) == []
        rounds = _rounds_lost(chain, 1, last - 1)
        chain.stop()
    _print_report(f"{version} 3-node cluster", report, rounds, last)
    assert len(report) == KILLS


def test_transit_cluster_signs_chain_with_failover(tmp_path, local_chains) -> None:
    version = "v0.38.25"
    with OpenBao() as bao:
        bao.client().secrets.transit.create_key(
            "validator", key_type="ed25519", mount_point="transit"
        )
        pub = bao.client().secrets.transit.read_key("validator", mount_point="transit")
        import base64

        pub_key = base64.b64decode(pub["data"]["keys"]["1"]["public_key"])
        token = bao.create_token()
        (port,) = free_ports(1)
        laddr = f"tcp://127.0.0.1:{port}"
        chain = local_chains(
            version,
            start=False,
            validator=ValidatorKey("ed25519", pub_key),
            priv_validator_laddr=laddr,
        )
        extra = "\n".join(
            [
                "[signing.vault_transit]",
                f'address = "{bao.address}"',
                'mount = "transit"',
                'key_name = "validator"',
                'token_path = "./vault_token"',
                "timeout = 1.0",
            ]
        )
        cluster = ProcCluster(
            tmp_path / "nebula",
            3,
            key=None,
            chain_id=chain.chain_id,
            connections=[laddr],
            version=config_version(version),
            signing="vault_transit",
            extra=extra,
        )
        for d in cluster.dirs:
            write_private_file(d.home / "vault_token", token.encode() + b"\n")
            assert not (d.home / "privkey").exists()  # the key never touches a Nebula disk
        with cluster:
            cluster.wait_leader_sync()
            chain.start()
            chain.wait_for_height(2, timeout=60)
            report = _run_failovers(chain, cluster, 1)
            last = chain.wait_for_height(chain.latest_height() + 10, timeout=60)
            verify_commit_signatures(
                chain, pub_key, "ed25519", range(1, last), VERIFIERS["ed25519"]
            )
            assert duplicate_vote_evidence(chain, 1, last) == []
            rounds = _rounds_lost(chain, 1, last - 1)
            chain.stop()
    _print_report("transit 3-node cluster", report, rounds, last)
