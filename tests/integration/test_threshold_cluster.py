"""BLS-Raft with real processes: a 3-node cluster holding a 2-of-3 split key.

No node holds the whole key; every signature that leaves the cluster goes through the
auditor, which verifies it against the group key (= the original key) and fails on two
different signatures for one (chain, height, round, step).
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from nebula import config
from nebula.aio.daemon import make_backend
from nebula.crypto.keys import Bls12381Key
from nebula.crypto.threshold import split, write_share_file
from nebula.errors import ConfigError, KeyFileError
from nebula.types import SignedMsgType, Timestamp, WireFamily
from tests.support.cluster import Auditor, ProcCluster, driver, vote_req
from tests.support.ports import free_ports

CHAIN = "tbls-chain"
SECTION = '[signing.threshold_bls]\nshare_path = "./share.json"\n'
BAD_SHARE_PATH = str(Path(__file__).resolve().parents[1] / "support" / "bad_share")


def _cluster(tmp_path: Path, t: int = 2, n: int = 3, **kw):
    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), t, n)
    addrs = [f"tcp://127.0.0.1:{p}" for p in free_ports(1)]
    cluster = ProcCluster(
        tmp_path,
        n,
        chain_id=CHAIN,
        connections=addrs,
        version="v1_0",
        signing="threshold_bls",
        extra=SECTION,
        **kw,
    )
    for d, share in zip(cluster.dirs, shares, strict=True):
        write_share_file(d.home / "share.json", share, overwrite=True)
    return whole, addrs, cluster, Auditor("bls12381", whole.public_key)


async def _heights(d, start: int, count: int) -> int:
    for h in range(start, start + count):
        await d.sign(vote_req(CHAIN, h, SignedMsgType.PREVOTE))
        # v1.0: a non-nil precommit carries an extension signature (combined too)
        r = await d.sign(vote_req(CHAIN, h, SignedMsgType.PRECOMMIT))
        assert r.vote.extension_signature
    return start + count


def test_2_of_3_signs_through_leader_kills_then_one_follower_down_then_two(tmp_path) -> None:
    whole, addrs, cluster, auditor = _cluster(tmp_path)
    failovers: list[float] = []

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V1_0, CHAIN, auditor) as d:
                h = await _heights(d, 1, 5)
                for _ in range(5):
                    leader = await cluster.wait_leader()
                    t0 = time.monotonic()
                    cluster.nodes[leader].kill()
                    h = await _heights(d, h, 1)
                    failovers.append(time.monotonic() - t0)
                    h = await _heights(d, h, 2)
                    assert await cluster.wait_leader() != leader
                    cluster.nodes[leader].start()  # back as a follower
                # Identical retry after a failover: the same (combined) signature.
                first = await d.sign(vote_req(CHAIN, h))
                leader = await cluster.wait_leader()
                cluster.nodes[leader].kill()
                again = await d.sign(vote_req(CHAIN, h, ts=Timestamp(1_700_099_999, 7)))
                assert again.vote.signature == first.vote.signature
                assert again.vote.timestamp == first.vote.timestamp
                conflicting = await d.request_once(vote_req(CHAIN, h, salt=9), timeout=5)
                assert conflicting.error is not None
                assert "conflicting" in conflicting.error.description
                h += 1
                cluster.nodes[leader].start()
                h = await _heights(d, h, 2)
                # One follower down for good: the other two still sign (2 of 3).
                leader = await cluster.wait_leader()
                gone = next(i for i in cluster.nodes if i != leader)
                cluster.nodes[gone].kill()
                h = await _heights(d, h, 5)
                # Two of three down: nothing is signed.
                leader = await cluster.wait_leader()
                cluster.nodes[leader].kill()
                for k in range(3):
                    with pytest.raises(TimeoutError):
                        await d.sign(vote_req(CHAIN, h + k), deadline=4.0)

    asyncio.run(main())
    auditor.check()
    assert auditor.count >= 2 * 24
    # (BLS signatures are unique: one that verifies against the group key is the one
    # the whole key gives.)
    logs = "".join(
        (d.home / "nebula.log").read_text(errors="replace")
        for d in cluster.dirs
        if (d.home / "nebula.log").exists()
    )
    assert "bad_share" not in logs and "does not verify" not in logs
    print(
        f"\n2-of-3 threshold: failover (kill -> next signature) {[f'{f:.2f}s' for f in failovers]}"
    )


def test_a_member_sending_wrong_shares_is_named_counted_and_excluded(tmp_path) -> None:
    """Node 3 runs with a hook that makes every share it sends wrong (its key file is
    fine).  The leader (another node) combines, sees the result fail, checks the shares
    one by one, drops node 3's, logs and counts it, and signs with the good member; with
    the good member stopped nothing is signed."""
    mark = tmp_path / "bad-share-active"

    def env(nid: int) -> dict[str, str]:
        if nid != 3:
            return {}
        return {"PYTHONPATH": BAD_SHARE_PATH, "NEBULA_BAD_SHARE_MARK": str(mark)}

    whole, addrs, cluster, auditor = _cluster(tmp_path, metrics=True, node_env=env)

    async def main() -> tuple[int, str, int]:
        with cluster:
            leader = await cluster.wait_leader()
            if leader == 3:  # its own term is computed directly: let a good node lead
                cluster.nodes[3].kill()
                leader = await cluster.wait_leader(exclude={3})
                cluster.nodes[3].start()
            async with driver(addrs, WireFamily.V1_0, CHAIN, auditor) as d:
                h = await _heights(d, 1, 10)
                assert mark.exists()  # the hook is in place in node 3
                # The good follower stopped: only node 3's (bad) shares arrive.
                good = next(i for i in cluster.nodes if i not in (leader, 3))
                cluster.nodes[good].signal(signal.SIGSTOP)
                with pytest.raises(TimeoutError):
                    await d.sign(vote_req(CHAIN, h), deadline=3.0)
                cluster.nodes[good].signal(signal.SIGCONT)
                await _heights(d, h, 2)
            port = cluster.metrics_ports[leader - 1]
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            return leader, text.decode(), h

    leader, metrics, stalled = asyncio.run(main())
    auditor.check()
    assert auditor.count >= 2 * 12
    m = re.search(
        r'nebula_threshold_bad_shares_total\{chain_id="tbls-chain",member="3"\} (\d+)', metrics
    )
    assert m is not None and int(m.group(1)) >= 1, metrics
    good_members = [i for i in (1, 2) if i != leader]
    for i in good_members:  # a good member is never blamed
        assert f'member="{i}"' not in metrics, metrics
    log = (cluster.dirs[leader - 1].home / "nebula.log").read_text(errors="replace")
    assert "member 3 sent a share for chain tbls-chain" in log
    # A bad share never cost a signature while the good member was up: the only requests
    # that went unanswered are the ones made while it was stopped.
    unanswered = re.findall(r"refused chain=tbls-chain hrs=(\d+)/\S* reason=replication", log)
    assert unanswered and set(unanswered) == {str(stalled)}, unanswered


def test_threshold_config_is_checked_against_the_cluster(tmp_path) -> None:
    whole = Bls12381Key.generate()
    _, addrs, cluster, _ = _cluster(tmp_path)
    b = make_backend(config.load(cluster.dirs[0].config_path))
    assert b.key_type == "bls12381" and len(b.public_key) == 96
    # A share file that does not match its commitments: refused at start.
    good = (cluster.dirs[0].home / "share.json").read_text()
    wrong = base64.b64encode((12345).to_bytes(32, "big")).decode()
    doctored = re.sub(r'"secret_share": "[^"]+"', f'"secret_share": "{wrong}"', good)
    (cluster.dirs[0].home / "share.json").write_text(doctored)
    with pytest.raises(KeyFileError, match="does not match the commitments"):
        make_backend(config.load(cluster.dirs[0].config_path))
    # Share 2 on node 1: refused, naming the node and the file to use.
    shares = split(whole.secret_bytes(), 2, 3)
    write_share_file(cluster.dirs[0].home / "share.json", shares[1], overwrite=True)
    with pytest.raises(ConfigError, match="holds share 2, but this is node 1"):
        make_backend(config.load(cluster.dirs[0].config_path))
    # t below the quorum: refused with the reason.
    low = split(whole.secret_bytes(), 1, 3)
    write_share_file(cluster.dirs[0].home / "share.json", low[0], overwrite=True)
    with pytest.raises(ConfigError, match="below the Raft quorum 2"):
        make_backend(config.load(cluster.dirs[0].config_path))
    # A split for another cluster size: refused.
    five = split(whole.secret_bytes(), 3, 5)
    write_share_file(cluster.dirs[0].home / "share.json", five[0], overwrite=True)
    with pytest.raises(ConfigError, match="one of 5, but the cluster has 3 members"):
        make_backend(config.load(cluster.dirs[0].config_path))
    # Not on a local store.
    text = cluster.dirs[0].config_path.read_text().replace('persist = "raft"', 'persist = "local"')
    with pytest.raises(ConfigError, match="needs persist"):
        config.loads(text, cluster.dirs[0].config_path)
