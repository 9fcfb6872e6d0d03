"""`nebula keys dkg` as an operator runs it: three members, three directories, real
processes, public files carried between them; the shares then run a real 2-of-3 cluster.

No process in the ceremony ever holds the whole key; the cluster signs with the group
key that only the ceremony's public data names, and the auditor verifies every
signature against it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
from pathlib import Path

from nebula.crypto.keys import verify_signature
from nebula.crypto.threshold import load_share_file, same_split
from nebula.types import SignedMsgType, WireFamily
from tests.support.cluster import Auditor, ProcCluster, driver, vote_req
from tests.support.dkg import CliCeremony, cli_ceremony, nebula
from tests.support.ports import free_ports

CHAIN = "dkg-chain"


def test_three_members_make_one_2_of_3_key_and_a_cluster_signs_with_it(tmp_path: Path) -> None:
    c = cli_ceremony(tmp_path / "ceremony", 2, 3)
    # Every member saw the same ceremony id before dealing, and the same group key,
    # address and transcript after finish.
    assert len({d["ceremony"] for d in c.deal.values()}) == 1
    for key in ("ceremony", "transcript", "address", "pub_key"):
        assert len({json.dumps(f[key]) for f in c.finish.values()}) == 1, key
    f1 = c.finish[1]
    assert f1["threshold"] == 2 and f1["shares"] == 3
    group_key = base64.b64decode(f1["pub_key"]["value"])
    assert len(group_key) == 96 and f1["pub_key"]["type"] == "cometbft/PubKeyBls12_381"

    # What each member's machine holds: its secret ceremony file and its share (0600),
    # public files, and no other member's secrets.
    for i, d in c.dirs.items():
        names = sorted(p.name for p in d.iterdir())
        assert names == sorted(
            [f"member-{i}.secret.json", f"share-{i}.json"]
            + [f"member-{j}.pub.json" for j in (1, 2, 3)]
            + [f"deal-{j}.json" for j in (1, 2, 3)]
        )
        assert (d / f"member-{i}.secret.json").stat().st_mode & 0o777 == 0o600
        assert c.share(i).stat().st_mode & 0o777 == 0o600
    carried = [p.name for p in c.operator.iterdir()]  # the operator saw public files only
    assert sorted(carried) == sorted(
        [f"member-{j}.pub.json" for j in (1, 2, 3)] + [f"deal-{j}.json" for j in (1, 2, 3)]
    )

    # The three share files form one valid 2-of-3 key.
    shares = [load_share_file(c.share(i)) for i in (1, 2, 3)]
    assert same_split(shares) and all(s.check() for s in shares)
    pub = shares[0].public
    assert pub.group_public_key == group_key and pub.address.hex().upper() == f1["address"]
    msg = b"sign bytes"
    sigs = {s.index: s.sign_share(msg) for s in shares}
    combined = {pub.combine(msg, {i: sigs[i] for i in p}) for p in itertools.combinations(sigs, 2)}
    assert len(combined) == 1
    (sig,) = combined
    assert sig is not None and verify_signature("bls12381", group_key, msg, sig)
    assert all(not pub.verify(msg, s) for s in sigs.values())  # one share signs nothing

    # A real 3-node threshold cluster, each node given only its share file.
    addrs = [f"tcp://127.0.0.1:{p}" for p in free_ports(1)]
    cluster = ProcCluster(
        tmp_path / "nebula",
        3,
        chain_id=CHAIN,
        connections=addrs,
        version="v1_0",
        signing="threshold_bls",
        extra='[signing.threshold_bls]\nshare_path = "./share.json"\n',
    )
    for d in cluster.dirs:
        shutil.copy(c.share(d.node_id), d.home / "share.json")
        assert not (d.home / "privkey").exists()
    auditor = Auditor("bls12381", group_key)

    async def main() -> None:
        with cluster:
            async with driver(addrs, WireFamily.V1_0, CHAIN, auditor) as drv:
                for h in range(1, 4):
                    await drv.sign(vote_req(CHAIN, h, SignedMsgType.PREVOTE))
                    r = await drv.sign(vote_req(CHAIN, h, SignedMsgType.PRECOMMIT))
                    assert r.vote.extension_signature
                # One member down: the other two shares still sign.
                leader = await cluster.wait_leader()
                gone = next(i for i in cluster.nodes if i != leader)
                cluster.nodes[gone].kill()
                for h in range(4, 6):
                    await drv.sign(vote_req(CHAIN, h, SignedMsgType.PREVOTE))

    asyncio.run(main())
    auditor.check()  # every signature verified against the DKG's group key
    assert auditor.count >= 8


def test_a_bad_deal_stops_finish_naming_the_dealer_and_nothing_is_written(tmp_path: Path) -> None:
    c = CliCeremony(tmp_path, 2, 3)
    c.run_init()
    c.run_deal()
    # In transit, someone replaces member 2's value for member 1 in deal 2.
    p = c.dirs[1] / "deal-2.json"
    doc = json.loads(p.read_text())
    doc["ciphertexts"][0] = json.loads((c.dirs[1] / "deal-3.json").read_text())["ciphertexts"][0]
    p.write_text(json.dumps(doc))
    r = nebula(*c.finish_args(1), check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "dealer 2" in r.stderr and "Nothing was written" in r.stderr
    assert not c.share(1).exists()
    # A member whose own identity file was swapped by the operator refuses to deal.
    fake = tmp_path / "fake"
    nebula("keys", "dkg", "init", "--index", "3", "--dir", str(fake))
    shutil.copy(fake / "member-3.pub.json", c.dirs[3] / "member-3.pub.json")
    r = nebula(
        "keys", "dkg", "deal", "--index", "3", "-t", "2", "--members", *c.members(3),
        "--dir", str(c.dirs[3]), "--out", str(tmp_path / "again.json"), check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "not this member's ceremony identity" in r.stderr
    assert not (tmp_path / "again.json").exists()
    # The other members, whose deals and files are intact, finish.
    nebula(*c.finish_args(2))
    assert load_share_file(c.share(2)).index == 2
