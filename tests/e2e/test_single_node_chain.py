"""A single Nebula node signs real CometBFT chains (issue 2).

Every test starts a real `nebula start` process and a real pinned CometBFT node whose
``priv_validator_laddr`` points at it, waits for blocks, and verifies our validator's
precommit in every commit with the public key, independently of Nebula's code.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nebula.crypto.keys import generate
from nebula.state.local import read_states
from tests.support.cometbft import (
    VERIFIERS,
    LocalChain,
    ValidatorKey,
    duplicate_vote_evidence,
    verify_commit_signatures,
)
from tests.support.nebula_proc import NebulaProcess
from tests.support.ports import free_ports

pytestmark = pytest.mark.e2e

BLOCKS = 20
FAMILY = {"v0.34.33": "v0_34", "v0.37.18": "v0_37", "v0.38.25": "v0_38", "v1.0.1": "v1_0"}


def _laddr(tmp_path: Path, transport: str) -> str:
    if transport == "unix":
        return f"unix://{tmp_path}/pv.sock"
    (port,) = free_ports(1)
    return f"tcp://127.0.0.1:{port}"


def _start(
    tmp_path,
    local_chains,
    version,
    key_type="ed25519",
    transport="tcp",
    bls=False,
    chain_kwargs=None,
):
    key = generate(key_type)
    laddr = _laddr(tmp_path, transport)
    chain: LocalChain = local_chains(
        version,
        start=False,
        bls=bls,
        validator=ValidatorKey(key.key_type, key.public_key),
        priv_validator_laddr=laddr,
        **(chain_kwargs or {}),
    )
    neb = NebulaProcess(
        tmp_path / "nebula",
        chain_id=chain.chain_id,
        version=FAMILY[version],
        key=key,
        connections=[laddr],
    )
    return key, chain, neb


def _verify(chain: LocalChain, key, first: int, last: int) -> None:
    got = verify_commit_signatures(
        chain, key.public_key, key.key_type, range(first, last + 1), VERIFIERS[key.key_type]
    )
    assert len(got) == last - first + 1
    assert duplicate_vote_evidence(chain, 1, chain.latest_height()) == []


@pytest.mark.parametrize("version", ["v0.34.33", "v0.38.25", "v1.0.1"])
def test_each_wire_family_with_ed25519(tmp_path, local_chains, version) -> None:
    key, chain, neb = _start(tmp_path, local_chains, version)
    with neb:
        chain.start()
        chain.wait_for_height(BLOCKS + 2, timeout=60)
        _verify(chain, key, 1, BLOCKS + 1)
        chain.stop()


def test_v037_speaks_the_v034_family(tmp_path, local_chains) -> None:
    key, chain, neb = _start(tmp_path, local_chains, "v0.37.18")
    with neb:
        chain.start()
        chain.wait_for_height(12, timeout=60)
        _verify(chain, key, 1, 11)
        chain.stop()


def test_secp256k1(tmp_path, local_chains) -> None:
    key, chain, neb = _start(tmp_path, local_chains, "v0.38.25", key_type="secp256k1")
    with neb:
        chain.start()
        chain.wait_for_height(BLOCKS + 2, timeout=60)
        _verify(chain, key, 1, BLOCKS + 1)
        chain.stop()


def test_bls12381(tmp_path, local_chains) -> None:
    key, chain, neb = _start(tmp_path, local_chains, "v1.0.1", key_type="bls12381", bls=True)
    with neb:
        chain.start()
        chain.wait_for_height(BLOCKS + 2, timeout=90)
        _verify(chain, key, 1, BLOCKS + 1)
        chain.stop()


def test_unix_socket(tmp_path, local_chains) -> None:
    key, chain, neb = _start(tmp_path, local_chains, "v1.0.1", transport="unix")
    with neb:
        chain.start()
        chain.wait_for_height(BLOCKS + 2, timeout=60)
        _verify(chain, key, 1, BLOCKS + 1)
        chain.stop()


def test_nebula_restart_mid_chain_keeps_state(tmp_path, local_chains) -> None:
    key, chain, neb = _start(tmp_path, local_chains, "v0.38.25")
    with neb:
        chain.start()
        chain.wait_for_height(10, timeout=60)
        neb.stop()
        stopped_at = read_states(neb.home / "state.json")[chain.chain_id].height
        assert stopped_at >= 9
        time.sleep(1.0)
        neb.start()
        chain.wait_for_height(stopped_at + BLOCKS, timeout=90)
        _verify(chain, key, 1, stopped_at + BLOCKS - 1)
        chain.stop()
    assert "height regression" not in neb.log_text()


def test_node_restart_mid_chain_gets_cached_signatures(tmp_path, local_chains) -> None:
    key, chain, neb = _start(tmp_path, local_chains, "v1.0.1")
    with neb:
        chain.start()
        chain.wait_for_height(10, timeout=60)
        chain.kill()  # SIGKILL: the node replays its WAL and re-requests what it had asked
        chain.start()
        chain.wait_for_rpc(timeout=30)
        h = chain.latest_height()
        chain.wait_for_height(h + BLOCKS, timeout=90)
        _verify(chain, key, 1, h + BLOCKS - 1)
        chain.stop()
    log = neb.log_text()
    # Retries after the restart are answered from the stored signature: at most a few
    # refusals (a vote the node had not persisted and now builds differently), never a storm.
    assert log.count("refused") <= 3, log[-5000:]


def test_node_restart_after_a_withheld_signature_gets_no_second_signature(
    tmp_path, local_chains
) -> None:
    """The node is killed while a signature it asked for is on the way (an auditing relay
    keeps it from the node), so it asks again for that height, round and step after its
    restart, with a new timestamp or block: a second, different signature there is a
    double sign, which the relay's auditor catches. The test checks that the node really
    asked twice (otherwise it would prove nothing)."""
    from nebula.types import WireFamily
    from tests.support.cluster import Auditor
    from tests.support.relay import AuditingRelay, withhold_then_restart

    key = generate("ed25519")
    (port,) = free_ports(1)
    laddr = f"tcp://127.0.0.1:{port}"
    chain = local_chains(
        "v0.38.25",
        start=False,
        validator=ValidatorKey("ed25519", key.public_key),
        priv_validator_laddr=laddr,
    )
    auditor = Auditor("ed25519", key.public_key)
    with AuditingRelay(laddr, auditor, WireFamily.V0_38) as relay:
        neb = NebulaProcess(
            tmp_path / "nebula",
            chain_id=chain.chain_id,
            version="v0_38",
            key=key,
            connections=[relay.listen_address],
        )
        asked_twice = []
        with neb:
            chain.start()
            chain.wait_for_height(5, timeout=60)
            for _ in range(3):
                asked_twice.append(withhold_then_restart(relay, chain))
            last = chain.wait_for_height(chain.latest_height() + 3, timeout=60)
            _verify(chain, key, 1, last - 1)
            chain.stop()
    assert all(asked_twice), asked_twice  # the node did ask again each time
    assert relay.violations == [], relay.violations
    auditor.check()
