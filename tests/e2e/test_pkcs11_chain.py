"""Real CometBFT chains whose validator key lives in a SoftHSM2 token, signed by Nebula
through PKCS#11 (issue 14).

Every key here is **generated inside a token** (``nebula hsm generate``): the genesis
validator is written from the public key the token reports, and the private key never
exists outside a token.

* v0.38.25, Ed25519, a 3-node Nebula cluster whose members each sign from their own
  SoftHSM2 installation (own ``SOFTHSM2_CONF``, own token directory).  The key is
  generated in member 1's token; members 2 and 3 get clones of that token directory
  (SoftHSM2 keeps private objects encrypted under the user PIN: the stand-in for an
  HSM's cloning or wrapped backup).  Each member pins the public key, loads the key from
  its own token at start, and the leader is SIGKILLed 5 times (restarted each time as a
  follower): the chain keeps committing, every height carries a precommit that verifies
  with the token's key, and there is no duplicate-vote evidence.  Then three times a
  vote's signature is kept from the node, which is killed together with the leader.
* v1.0.1, secp256k1, one Nebula node: the genesis validator is a ``PubKeySecp256k1`` and
  the consensus params allow only ``secp256k1`` keys; every precommit verifies (low-S,
  as CometBFT requires) with the token's key.  Three times a precommit's signature is
  kept from the node, which is killed.

The duplicate-vote evidence check cannot fail on a single-validator chain (its node never
sends a conflicting vote), so in both tests the privval connection runs through an
auditing relay (tests/support/relay.py) that verifies every signature reaching the node
with the token's public key.  A node killed while a signature it asked for was withheld
asks again for that height, round and step after its restart, with a new timestamp: the
signer must answer with the stored signature, and a second, different one is a double
sign the relay's auditor records.  (With SoftHSM2's ECDSA, whose nonces are random, even
signing the same bytes twice would give a second signature.)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest

from nebula.devnet.cluster import NebulaNode, config_version, write_node_dir
from nebula.devnet.softhsm import SoftHSM, pkcs11_toml
from nebula.types import WireFamily
from tests.support.cluster import Auditor, ProcCluster
from tests.support.cometbft import (
    VERIFIERS,
    LocalChain,
    duplicate_vote_evidence,
    signed_commits,
    verify_commit_signatures,
)
from tests.support.ports import free_ports
from tests.support.relay import AuditingRelay, withhold_rounds

pytestmark = pytest.mark.e2e

TOKEN = "validator-token"
KILLS = 5
BLOCKS_BETWEEN = 3
#: What the relay keeps from the node, one round each (a vote always gets a new timestamp).
WITHHOLD_V038 = (("prevote",), ("precommit",), ("prevote",))
WITHHOLD_V1 = (("precommit",),) * 3


def _no_key_files(*dirs: Path) -> None:
    """No Nebula directory holds a key file: the key is only in the tokens."""
    for d in dirs:
        found = [p.name for p in d.rglob("*") if p.name in ("privkey", "priv_validator_key.json")]
        assert found == [], f"{d}: {found}"


def test_cluster_members_sign_a_v038_chain_from_their_own_tokens(tmp_path, local_chains):
    version = "v0.38.25"
    hsm1 = SoftHSM(tmp_path / "hsm1")
    hsm1.init_token(TOKEN)
    validator = hsm1.generate_key(TOKEN, key_type="ed25519")
    hsms = [hsm1, hsm1.clone(tmp_path / "hsm2"), hsm1.clone(tmp_path / "hsm3")]
    assert len({h.conf for h in hsms}) == 3 and len({h.tokens for h in hsms}) == 3

    (port,) = free_ports(1)
    laddr = f"tcp://127.0.0.1:{port}"
    chain = local_chains(version, start=False, validator=validator, priv_validator_laddr=laddr)
    genesis = json.loads((chain.home / "config" / "genesis.json").read_text())
    assert genesis["validators"][0]["address"] == validator.address.hex().upper()

    auditor = Auditor(validator.key_type, validator.pub_key)
    relay = AuditingRelay(laddr, auditor, WireFamily.V0_38)  # started with the cluster
    cluster = ProcCluster(
        tmp_path / "nebula",
        3,
        key=None,
        chain_id=chain.chain_id,
        connections=[relay.listen_address],
        version=config_version(version),
        signing="pkcs11",
        extra=pkcs11_toml(hsm1.module, TOKEN, public_key=validator.pub_key),
        node_env=lambda nid: hsms[nid - 1].env,
    )
    for d, h in zip(cluster.dirs, hsms, strict=True):
        h.pin_file(d.home)
    _no_key_files(tmp_path / "nebula")
    with relay, cluster:
        cluster.wait_leader_sync(timeout=30)
        # Every member logged in to its own token and found the pinned key there.
        for nid in (1, 2, 3):
            st = cluster.status(nid)
            assert st is not None, cluster.logs()
            served = st["served"][chain.chain_id]
            assert served["signing_mode"] == "pkcs11", served
            assert served["address"] == validator.address.hex().upper(), served
        chain.start()
        chain.wait_for_height(2, timeout=60)

        failovers: list[float] = []
        killed: list[int] = []
        for _ in range(KILLS):
            chain.wait_for_height(chain.latest_height() + BLOCKS_BETWEEN, timeout=30)
            leader = cluster.wait_leader_sync()
            before = chain.latest_height()
            t_kill = time.monotonic()
            cluster.nodes[leader].kill()
            # Two heights: the second needs votes signed after the kill, by the new leader.
            chain.wait_for_height(before + 2, timeout=30)
            failovers.append(time.monotonic() - t_kill)
            new_leader = cluster.wait_leader_sync()
            assert new_leader != leader
            killed.append(leader)
            cluster.nodes[leader].start()  # back as a follower, on its own token again
            cluster.wait_caught_up(leader)

        # A vote's signature kept from the node, then the node and the leader killed
        # together: the restarted node asks again for that step with a new timestamp.
        asked_twice, withheld = withhold_rounds(relay, chain, WITHHOLD_V038, cluster)
        assert all(asked_twice), (asked_twice, withheld)  # the node did ask again each time

        last = chain.wait_for_height(chain.latest_height() + 3, timeout=30)
        sigs = verify_commit_signatures(
            chain, validator.pub_key, "ed25519", range(1, last), VERIFIERS["ed25519"]
        )
        assert [s.height for s in sigs] == list(range(1, last))
        assert duplicate_vote_evidence(chain, 1, last) == []
        rounds = sum(c.round for c in signed_commits(chain, 1, last - 1))
        led = {n for n in (1, 2, 3) if "is the leader" in cluster.nodes[n].log_text()}
        chain.stop()
    assert relay.violations == [], "\n".join([*relay.violations, f"withheld: {withheld}"])
    auditor.check()
    _no_key_files(tmp_path / "nebula")
    assert len(killed) == KILLS
    print(
        f"\n{version} chain, Ed25519 key generated in SoftHSM2, 3 members each on its own "
        f"token: {KILLS} leader SIGKILLs (nodes {killed}); kill -> two more heights median "
        f"{statistics.median(failovers):.2f}s, max {max(failovers):.2f}s; heights 1..{last - 1} "
        f"all signed by the token's key, extra rounds {rounds}; members that led and signed: "
        f"{sorted(led)}; withheld {withheld} (node and leader killed, each asked again), "
        f"{relay.snapshot()['signatures']} signatures audited by the relay"
    )
    assert len(led) >= 2


def test_v1_chain_with_a_secp256k1_key_in_softhsm(tmp_path, local_chains) -> None:
    version = "v1.0.1"
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token(TOKEN)
    validator = hsm.generate_key(TOKEN, key_type="secp256k1")
    assert validator.key_type == "secp256k1" and len(validator.pub_key) == 33

    (port,) = free_ports(1)
    laddr = f"tcp://127.0.0.1:{port}"
    chain: LocalChain = local_chains(
        version, start=False, validator=validator, priv_validator_laddr=laddr
    )
    genesis = json.loads((chain.home / "config" / "genesis.json").read_text())
    (gv,) = genesis["validators"]
    assert gv["pub_key"]["type"] == "tendermint/PubKeySecp256k1"
    assert gv["address"] == validator.address.hex().upper()
    assert genesis["consensus_params"]["validator"]["pub_key_types"] == ["secp256k1"]

    auditor = Auditor(validator.key_type, validator.pub_key)
    relay = AuditingRelay(laddr, auditor, WireFamily.V1_0)  # started with the node
    d = write_node_dir(
        tmp_path / "nebula",
        chain_id=chain.chain_id,
        version=config_version(version),
        connections=[relay.listen_address],
        signing="pkcs11",
        extra=pkcs11_toml(hsm.module, TOKEN, key_type="secp256k1", public_key=validator.pub_key),
    )
    hsm.pin_file(d.home)
    _no_key_files(d.home)
    node = NebulaNode(d.config_path, log_path=d.log_path, cwd=d.home, env=hsm.env)
    asked_twice, withheld = [], []
    with relay, node:
        chain.start()
        chain.wait_for_height(4, timeout=60)
        # A precommit's signature kept from the node, which is killed: after its restart
        # it asks again for that step with a new timestamp.
        asked_twice, withheld = withhold_rounds(relay, chain, WITHHOLD_V1)
        assert all(asked_twice), (asked_twice, withheld)  # the node did ask again each time
        last = chain.wait_for_height(max(16, chain.latest_height() + 2), timeout=90)
        # CometBFT accepted every one; check them again independently (low-S included).
        sigs = verify_commit_signatures(
            chain, validator.pub_key, "secp256k1", range(1, last), VERIFIERS["secp256k1"]
        )
        assert [s.height for s in sigs] == list(range(1, last))
        assert duplicate_vote_evidence(chain, 1, last) == []
        chain.stop()
    assert relay.violations == [], "\n".join([*relay.violations, f"withheld: {withheld}"])
    auditor.check()
    print(
        f"\n{version} chain, secp256k1 key generated in SoftHSM2, one Nebula node: heights "
        f"1..{last - 1} signed by the token's key; withheld {withheld} (node killed, each "
        f"asked again), {relay.snapshot()['signatures']} signatures audited by the relay"
    )
