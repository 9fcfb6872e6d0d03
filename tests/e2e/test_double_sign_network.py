"""One validator key on two CometBFT nodes: the chain itself is the double-sign oracle.

Every other chain test runs a single-validator chain, where "no DuplicateVoteEvidence"
cannot fail (no peer ever sees a conflicting vote). Here validators A, B, C (FilePV keys,
power 10 each) and D (power 14, so 14/44 < 1/3 and the chain commits without D) form a
network in which D's key runs on TWO nodes, D1 and D2 -- the active/standby pair both left
running, or two sentries asking one signer. Both nodes follow consensus and ask for D's
signature at every step.

To make the two nodes ask for conflicting votes at most heights, honestly, D2 is a standby
with another timeout: it waits only ``D2_TIMEOUT_PROPOSE`` (5 ms) for a proposal, so it
usually prevotes nil while D1 prevotes the proposed block.

* Positive control: D's key is a FilePV on both nodes. The nil/block prevotes above are
  a double sign; even without D2's short timeout the nodes double-sign the first time D
  proposes (from height 2 on): each node precommits with its own timestamp, so each
  proposes a block whose LastCommit differs (in D's precommit signature) from the
  other's, and prevotes its own proposal. A, B and C commit DuplicateVoteEvidence
  against D within a few heights; the test checks both of its votes against D's key.
* The real test: D's key lives in a 3-node Nebula Raft cluster whose leader dials both
  D1's and D2's ``priv_validator_laddr`` (each through an auditing relay sharing one
  auditor, so a second signature at one height/round/step on either connection is a
  violation). The run lasts twice as many heights as the control may need, with two
  SIGKILLs of the Nebula leader; the chain must keep committing, hold no evidence at all,
  carry D's precommits (verified against D's key), and Nebula must have refused
  conflicting requests as double signs (the guard was exercised: whichever node asks
  second at a step gets a conflicting vote refused, an older step refused as a
  regression, and the same vote answered with the stored signature).

Both run on CometBFT v0.38.25 and v1.0.1 (Nebula speaks the matching wire family, from
``config_version``). Proof that the real test can fail: with ``return _ACCEPT`` as the
first line of ``nebula.guard.check``, D's two nodes get conflicting votes signed, the
relays record ~110 double signs and ~30 DuplicateVoteEvidence against D are committed,
the first within a few heights. That holds with ``NEBULA_PURE=1`` and without it: the
compiled state-machine kernel (``_cmd.pyx``) decides only the strictly-higher case
itself and calls ``nebula.guard.apply`` for every other one.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter

import pytest

from nebula.crypto.keys import generate
from nebula.devnet.cluster import config_version
from nebula.types import WireFamily
from tests.support.cluster import Auditor, ProcCluster
from tests.support.cometbft import (
    VERIFIERS,
    LocalNetwork,
    ValidatorKey,
    ValidatorSpec,
    signed_commits,
    verify_commit_signatures,
    verify_duplicate_vote_evidence,
)
from tests.support.ports import free_ports
from tests.support.relay import AuditingRelay

pytestmark = pytest.mark.e2e

VERSIONS = ("v0.38.25", "v1.0.1")
D_POWER = 14  # of 44: below 1/3, so A, B and C commit on their own
#: The control must see evidence against D committed by this height; the real test runs
#: at least twice as long.
EVIDENCE_WITHIN = 20
REAL_HEIGHTS = 2 * EVIDENCE_WITHIN
KILLS = 2
#: D2 waits only this long for a proposal, so it often prevotes nil where D1 prevotes the
#: block: conflicting requests at most heights (see the module docstring).
D2_TIMEOUT_PROPOSE = "5ms"


def _validators(d: ValidatorSpec) -> list[ValidatorSpec]:
    return [ValidatorSpec("A"), ValidatorSpec("B"), ValidatorSpec("C"), d]


def _network(local_networks, version: str, d: ValidatorSpec) -> LocalNetwork:
    return local_networks(
        version,
        _validators(d),
        node_overrides={"D2": {("consensus", "timeout_propose"): D2_TIMEOUT_PROPOSE}},
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_filepv_key_on_two_nodes_yields_evidence(local_networks, version: str) -> None:
    net = _network(local_networks, version, ValidatorSpec("D", power=D_POWER, nodes=2))
    t0 = time.monotonic()
    net.start()
    net.wait_for_height(2, timeout=60)
    found = net.wait_for_evidence("D", timeout=60)
    seconds = time.monotonic() - t0
    ev = found[0]
    a, b = verify_duplicate_vote_evidence(ev, net.validator("D").key, net.chain_id)
    assert ev["included_at"] <= EVIDENCE_WITHIN, ev
    # Both of D's nodes are still up: nothing crashed, D simply signed twice.
    assert all(n.is_running() for n in net.nodes_of("D"))
    print(
        f"\nFilePV control ({version}): DuplicateVoteEvidence against D committed at height "
        f"{ev['included_at']} after {seconds:.1f}s: type {a.type} votes at height {a.height} "
        f"round {a.round} for blocks {a.block_id.hash.hex()[:12]} / {b.block_id.hash.hex()[:12]}"
    )


_REFUSED_RE = re.compile(r"refused chain=\S+ hrs=\S+ reason=(\S+)")


@pytest.mark.parametrize("version", VERSIONS)
def test_nebula_key_on_two_nodes_never_double_signs(tmp_path, local_networks, version: str) -> None:
    key = generate("ed25519")
    laddrs = tuple(f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    net = _network(
        local_networks,
        version,
        ValidatorSpec(
            "D",
            power=D_POWER,
            nodes=2,
            remote_key=ValidatorKey("ed25519", key.public_key),
            laddrs=laddrs,
        ),
    )
    # One auditor behind both relays: two different signatures for one step, whichever
    # node asked for them, are a double sign.
    auditor = Auditor("ed25519", key.public_key)
    family = WireFamily.from_config(config_version(version))
    killed: list[int] = []
    failovers: list[float] = []
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        relays = [stack.enter_context(AuditingRelay(a, auditor, family)) for a in laddrs]
        cluster = ProcCluster(
            tmp_path / "nebula",
            3,
            key=key,
            chain_id=net.chain_id,
            connections=[r.listen_address for r in relays],
            version=config_version(version),
        )
        stack.enter_context(cluster)
        stack.callback(net.stop)  # the nodes stop before the cluster and the relays
        cluster.wait_leader_sync()
        net.start()
        net.wait_for_height(2, timeout=60)
        between = REAL_HEIGHTS // (KILLS + 1)
        for _ in range(KILLS):
            net.wait_for_height(net.latest_height() + between, timeout=60)
            leader = cluster.wait_leader_sync()
            st = cluster.status(leader)
            assert st is not None, cluster.logs()
            # The leader serves both of D's nodes.
            assert st["served"][net.chain_id]["validators_connected"] == 2, st["served"]
            h_kill = net.latest_height()
            t_kill = time.monotonic()
            cluster.nodes[leader].kill()
            net.wait_for_height(h_kill + 2, timeout=30)
            failovers.append(time.monotonic() - t_kill)
            assert cluster.wait_leader_sync() != leader
            killed.append(leader)
            cluster.nodes[leader].start()  # back as a follower
            cluster.wait_caught_up(leader)
        # D signs again after the last kill: its precommit is in a commit made since.
        h_last_kill = net.latest_height()
        top = net.wait_for_height(max(REAL_HEIGHTS, h_last_kill + between), timeout=60)
        # Both of D's nodes follow the chain: the one refused now and then recovers.
        for node in net.nodes_of("D"):
            node.wait_for_height(top, timeout=30)
        ref = net.node(net.reference)
        evidence = net.evidence(1, top)
        verified = verify_commit_signatures(
            ref, key.public_key, "ed25519", range(1, top), VERIFIERS["ed25519"], allow_absent=True
        )
        rounds = sum(c.round for c in signed_commits(ref, 1, top - 1))
        logs = "\n".join(n.log_text() for n in net.nodes_of("D")).lower()
        nebula_logs = "".join(
            d.log_path.read_text(errors="replace") for d in cluster.dirs if d.log_path.exists()
        )
    seconds = time.monotonic() - t0
    heights = [s.height for s in verified]
    violations = [v for relay in relays for v in relay.violations]
    relay_refusals = [r for relay in relays for r in relay.refusals]
    reasons = Counter(_REFUSED_RE.findall(nebula_logs))
    print(
        f"\nNebula-held key on two nodes ({version}): {top} heights in {seconds:.1f}s, "
        f"{len(killed)} leader SIGKILLs (nodes {killed}, kill -> two heights "
        f"{[round(f, 2) for f in failovers]}s); evidence {len(evidence)} (first at "
        f"{[e['included_at'] for e in evidence[:1]]}); relay violations {len(violations)} "
        f"{violations[:2]}; D's precommit verified in {len(heights)}/{top - 1} commits; "
        f"extra rounds {rounds}; {auditor.count} signatures audited; refusals seen by the "
        f"relays {len(relay_refusals)}, by reason in Nebula's logs {dict(reasons)}; "
        f"'failed signing' lines in D1/D2 logs {logs.count('failed signing')}; e.g. "
        f"{relay_refusals[:3]}"
    )

    assert evidence == [], evidence
    assert violations == [], violations
    auditor.check()
    assert len(killed) == KILLS
    # D's precommits made it into commits, before and after the leader kills.
    assert len(heights) >= (top - 1) // 2, heights
    assert max(heights) > h_last_kill, (heights, h_last_kill)
    # The guard was exercised: Nebula refused conflicting requests of the node that asked
    # second (seen on the wire by the relays and in Nebula's own logs).
    assert any("conflicting data" in r for r in relay_refusals), relay_refusals
    assert reasons["double_sign"] > 0, reasons
