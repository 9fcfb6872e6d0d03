"""The multi-validator network harness without processes: genesis, node plan, config,
evidence parsing and the commit check that tolerates absent validators."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from nebula.devnet.cometbft import (
    BLOCK_ID_FLAG_ABSENT,
    BLOCK_ID_FLAG_COMMIT,
    BLOCK_ID_FLAG_NIL,
    VERIFIERS,
    DevnetError,
    GenesisValidator,
    ValidatorKey,
    build_genesis,
    edit_toml,
    filepv_public_key,
    parse_rfc3339_nano,
    verify_commit_signatures,
)
from nebula.devnet.network import (
    FAST_TIMEOUTS,
    LocalNetwork,
    ValidatorSpec,
    evidence_validator_address,
    network_config,
    persistent_peers,
    plan_nodes,
    verify_duplicate_vote_evidence,
)
from nebula.errors import ConfigError
from nebula.proto import vote_sign_bytes
from nebula.types import BlockID, PartSetHeader, SignedMsgType, Vote

CHAIN = "net-unit"
TS = "2026-01-02T03:04:05.123456789Z"


def _seed(i: int) -> bytes:
    return bytes([i]) * 32


def _key(i: int) -> ValidatorKey:
    return filepv_public_key("ed25519", _seed(i))


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


# ---- genesis -------------------------------------------------------------------------


def _init_genesis() -> dict:
    # The parts of `cometbft init`'s genesis.json that build_genesis touches or keeps.
    return {
        "genesis_time": "2020-01-01T00:00:00Z",
        "chain_id": "test-chain-x",
        "consensus_params": {"validator": {"pub_key_types": ["ed25519"]}, "block": {"x": 1}},
        "validators": [{"address": "00", "power": "10", "name": ""}],
        "app_hash": "",
    }


def test_genesis_lists_every_validator_with_its_power() -> None:
    secp = filepv_public_key("secp256k1", _seed(9))
    vals = [GenesisValidator(_key(1), 10, "A"), GenesisValidator(secp, 14, "D")]
    gen = build_genesis(
        _init_genesis(), chain_id=CHAIN, version="v0.38.25", validators=vals, genesis_time=TS
    )
    assert gen["chain_id"] == CHAIN
    assert gen["genesis_time"] == TS
    assert gen["validators"] == [
        {
            "address": _key(1).address.hex().upper(),
            "pub_key": {"type": "tendermint/PubKeyEd25519", "value": _b64(_key(1).pub_key)},
            "power": "10",
            "name": "A",
        },
        {
            "address": secp.address.hex().upper(),
            "pub_key": {"type": "tendermint/PubKeySecp256k1", "value": _b64(secp.pub_key)},
            "power": "14",
            "name": "D",
        },
    ]
    assert gen["consensus_params"]["validator"]["pub_key_types"] == ["ed25519", "secp256k1"]
    assert gen["consensus_params"]["block"] == {"x": 1}  # untouched
    assert "abci" not in gen["consensus_params"]


@pytest.mark.parametrize(("version", "table"), [("v0.38.25", "abci"), ("v1.0.1", "feature")])
def test_genesis_vote_extensions_table_follows_the_line(version: str, table: str) -> None:
    gen = build_genesis(
        _init_genesis(),
        chain_id=CHAIN,
        version=version,
        validators=[GenesisValidator(_key(1), 1)],
        vote_extensions_height=3,
    )
    assert gen["consensus_params"][table]["vote_extensions_enable_height"] == "3"
    assert gen["genesis_time"] == "2020-01-01T00:00:00Z"  # kept when none is given


def test_genesis_refusals() -> None:
    with pytest.raises(ConfigError, match="same key"):
        build_genesis(
            _init_genesis(),
            chain_id=CHAIN,
            version="v0.38.25",
            validators=[GenesisValidator(_key(1), 1), GenesisValidator(_key(1), 2)],
        )
    with pytest.raises(ConfigError, match="at least one"):
        build_genesis(_init_genesis(), chain_id=CHAIN, version="v0.38.25", validators=[])
    with pytest.raises(DevnetError, match="RFC3339"):
        build_genesis(
            _init_genesis(),
            chain_id=CHAIN,
            version="v0.38.25",
            validators=[GenesisValidator(_key(1), 1)],
            genesis_time="yesterday",
        )
    with pytest.raises(ConfigError, match="positive"):
        GenesisValidator(_key(1), 0)


# ---- node plan, peers, config --------------------------------------------------------


def test_plan_names_one_node_per_key_and_numbers_shared_keys() -> None:
    remote = ValidatorKey("ed25519", SigningKey(_seed(7)).verify_key.encode())
    specs = [
        ValidatorSpec("A", filepv_key=("ed25519", _seed(1))),
        ValidatorSpec("D", power=14, nodes=2, filepv_key=("ed25519", _seed(4))),
        ValidatorSpec("R", nodes=2, remote_key=remote, laddrs=("tcp://127.0.0.1:1", "unix:///s")),
    ]
    plans = plan_nodes(specs)
    assert [(p.name, p.validator, p.priv_validator_laddr) for p in plans] == [
        ("A", "A", None),
        ("D1", "D", None),
        ("D2", "D", None),
        ("R1", "R", "tcp://127.0.0.1:1"),
        ("R2", "R", "unix:///s"),
    ]
    # Both nodes of D run the same FilePV key; the remote nodes have none.
    assert plans[1].filepv_key == plans[2].filepv_key == ("ed25519", _seed(4))
    assert plans[3].filepv_key is None
    assert specs[1].key == _key(4)
    assert specs[2].key == remote


def test_plan_refusals() -> None:
    remote = _key(7)
    with pytest.raises(ConfigError, match="as many"):
        ValidatorSpec("R", nodes=2, remote_key=remote, laddrs=("tcp://127.0.0.1:1",))
    with pytest.raises(ConfigError, match="laddrs without"):
        ValidatorSpec("R", laddrs=("tcp://127.0.0.1:1",))
    with pytest.raises(ConfigError, match="bad priv_validator_laddr"):
        ValidatorSpec("R", remote_key=remote, laddrs=("127.0.0.1:1",))
    with pytest.raises(ConfigError, match="alphanumeric"):
        ValidatorSpec("A-1")
    with pytest.raises(ConfigError, match="distinct"):
        plan_nodes([ValidatorSpec("A", filepv_key=("ed25519", _seed(1)))] * 2)
    with pytest.raises(ConfigError, match="clash"):
        plan_nodes(
            [
                ValidatorSpec("D", nodes=2, filepv_key=("ed25519", _seed(1))),
                ValidatorSpec("D1", filepv_key=("ed25519", _seed(2))),
            ]
        )
    with pytest.raises(ConfigError, match="same key"):
        plan_nodes(
            [
                ValidatorSpec("A", filepv_key=("ed25519", _seed(1))),
                ValidatorSpec("B", filepv_key=("ed25519", _seed(1))),
            ]
        )
    with pytest.raises(ConfigError, match="no FilePV key"):
        plan_nodes([ValidatorSpec("A")])


def test_persistent_peers_are_everyone_else() -> None:
    addrs = {"A": "aa@127.0.0.1:1", "B": "bb@127.0.0.1:2", "C": "cc@127.0.0.1:3"}
    assert persistent_peers(addrs, "B") == "aa@127.0.0.1:1,cc@127.0.0.1:3"
    with pytest.raises(ConfigError):
        persistent_peers(addrs, "Z")


_CONFIG = """\
proxy_app = "tcp://127.0.0.1:26658"
[p2p]
persistent_peers = ""
flush_throttle_timeout = "100ms"
allow_duplicate_ip = false
[consensus]
timeout_propose = "3s"
timeout_propose_delta = "500ms"
timeout_prevote = "1s"
timeout_prevote_delta = "500ms"
timeout_precommit = "1s"
timeout_precommit_delta = "500ms"
timeout_commit = "1s"
peer_gossip_sleep_duration = "100ms"
"""


def test_network_config_applies_to_a_cometbft_config() -> None:
    out = edit_toml(_CONFIG, network_config())
    assert 'proxy_app = "noop"' in out
    assert "allow_duplicate_ip = true" in out
    assert 'flush_throttle_timeout = "10ms"' in out
    assert 'peer_gossip_sleep_duration = "10ms"' in out
    for k, v in FAST_TIMEOUTS.items():
        assert f'{k} = "{v}"' in out
    only = network_config({"timeout_commit": "2s"})
    assert only[("consensus", "timeout_commit")] == "2s"
    assert ("consensus", "timeout_propose") not in only


def test_network_nodes_share_genesis_and_get_their_own_settings(tmp_path: Path) -> None:
    remote = _key(7)
    specs = [
        ValidatorSpec("A"),
        ValidatorSpec("B", power=3, filepv_key=("ed25519", _seed(2))),
        ValidatorSpec(
            "D",
            power=14,
            nodes=2,
            remote_key=remote,
            laddrs=("tcp://127.0.0.1:5", "tcp://127.0.0.1:6"),
        ),
    ]
    # No process and no binary is needed to lay the network out.
    standby = {("consensus", "timeout_propose"): "5ms", ("consensus", "timeout_commit"): "2s"}
    net = LocalNetwork(
        tmp_path,
        tmp_path / "no-cometbft",
        "v0.38.25",
        specs,
        timeouts={"timeout_commit": "1s", "timeout_propose": "1s"},
        node_overrides={"D2": standby},
    )
    assert list(net.nodes) == ["A", "B", "D1", "D2"]
    assert net.reference == "A"
    a, b, d1, d2 = net.nodes.values()
    assert a.validator == net.validator("A").key  # a random key was chosen for A
    assert net.validator("A").filepv_key is not None
    assert b.validator == _key(2)
    assert d1.validator == d2.validator == remote
    assert (d1.priv_validator_laddr, d2.priv_validator_laddr) == specs[2].laddrs
    assert a.priv_validator_laddr is None
    assert len({n.genesis_time for n in net.nodes.values()}) == 1
    parse_rfc3339_nano(a.genesis_time)
    genesis = a.genesis_validator_list()
    assert [(v.name, v.power, v.key) for v in genesis] == [
        ("A", 10, net.validator("A").key),
        ("B", 3, _key(2)),
        ("D", 14, remote),
    ]
    assert all(n.genesis_validator_list() == genesis for n in net.nodes.values())
    assert a.timeout_commit == d1.timeout_commit == "1s"
    assert d2.timeout_commit == "2s"  # LocalChain's own setting, not an override
    assert all(("consensus", "timeout_commit") not in n.config_overrides for n in (a, d2))
    assert d1.config_overrides[("consensus", "timeout_propose")] == "1s"
    assert d2.config_overrides[("consensus", "timeout_propose")] == "5ms"
    with pytest.raises(ConfigError, match="unknown nodes"):
        LocalNetwork(tmp_path, tmp_path / "x", "v0.38.25", specs, node_overrides={"D": standby})
    assert a.config_overrides[("p2p", "allow_duplicate_ip")] is True
    assert [n.moniker for n in net.nodes.values()] == ["A", "B", "D1", "D2"]
    assert (
        len({n.rpc_port for n in net.nodes.values()} | {n.p2p_port for n in net.nodes.values()})
        == 8
    )
    assert [n.validator for n in net.nodes_of("D")] == [remote, remote]
    with pytest.raises(ConfigError):
        net.node("D")


def test_node_id_from_node_key(tmp_path: Path) -> None:
    net = LocalNetwork(tmp_path, tmp_path / "no-cometbft", "v0.38.25", [ValidatorSpec("A")])
    node = net.node("A")
    (node.home / "config").mkdir(parents=True)
    sk = SigningKey(_seed(5))
    pub = sk.verify_key.encode()
    (node.home / "config" / "node_key.json").write_text(
        json.dumps(
            {"priv_key": {"type": "tendermint/PrivKeyEd25519", "value": _b64(_seed(5) + pub)}}
        )
    )
    assert node.node_id == _key(5).address.hex()
    assert node.p2p_address == f"{node.node_id}@127.0.0.1:{node.p2p_port}"


# ---- evidence and commits ------------------------------------------------------------


def _block_json(tag: int) -> dict:
    return {"hash": f"{tag:02X}" * 32, "parts": {"total": 1, "hash": f"{tag + 1:02X}" * 32}}


def _block_id(tag: int) -> BlockID:
    return BlockID(bytes([tag]) * 32, PartSetHeader(1, bytes([tag + 1]) * 32))


def _signed_vote_json(seed: bytes, typ: int, h: int, r: int, tag: int | None) -> dict:
    key = filepv_public_key("ed25519", seed)
    vote = Vote(
        type=typ,
        height=h,
        round=r,
        block_id=_block_id(tag) if tag is not None else BlockID(),
        timestamp=parse_rfc3339_nano(TS),
    )
    sig = SigningKey(seed).sign(vote_sign_bytes(CHAIN, vote)).signature
    return {
        "type": typ,
        "height": str(h),
        "round": r,
        "block_id": _block_json(tag) if tag is not None else {"hash": "", "parts": {}},
        "timestamp": TS,
        "validator_address": key.address.hex().upper(),
        "validator_index": 0,
        "signature": _b64(sig),
    }


def _evidence(vote_a: dict, vote_b: dict) -> dict:
    return {
        "included_at": 6,
        "type": "tendermint/DuplicateVoteEvidence",
        "value": {"vote_a": vote_a, "vote_b": vote_b, "TotalVotingPower": "44"},
    }


def test_duplicate_vote_evidence_is_checked_against_the_key() -> None:
    seed = _seed(4)
    ev = _evidence(
        _signed_vote_json(seed, SignedMsgType.PREVOTE, 5, 0, 0x10),
        _signed_vote_json(seed, SignedMsgType.PREVOTE, 5, 0, None),  # nil
    )
    assert evidence_validator_address(ev) == _key(4).address
    a, b = verify_duplicate_vote_evidence(ev, _key(4), CHAIN)
    assert (a.height, a.block_id, b.block_id) == (5, _block_id(0x10), BlockID())
    with pytest.raises(DevnetError, match="not against"):
        verify_duplicate_vote_evidence(ev, _key(3), CHAIN)
    with pytest.raises(DevnetError, match="does not verify"):
        verify_duplicate_vote_evidence(ev, _key(4), "another-chain")
    same = _evidence(ev["value"]["vote_a"], ev["value"]["vote_a"])
    with pytest.raises(DevnetError, match="same block"):
        verify_duplicate_vote_evidence(same, _key(4), CHAIN)
    steps = _evidence(
        ev["value"]["vote_a"], _signed_vote_json(seed, SignedMsgType.PRECOMMIT, 5, 0, 0x20)
    )
    with pytest.raises(DevnetError, match="different steps"):
        verify_duplicate_vote_evidence(steps, _key(4), CHAIN)
    with pytest.raises(DevnetError, match="not a DuplicateVoteEvidence"):
        evidence_validator_address({"type": "x", "value": {}})


class _FakeChain:
    """Just enough of a LocalChain for signed_commits: ``/commit`` answers."""

    chain_id = CHAIN

    def __init__(self, commits: dict[int, dict]) -> None:
        self.commits = commits

    def rpc(self, method: str, **params: object) -> dict:
        assert method == "commit"
        return {"signed_header": {"commit": self.commits[int(params["height"])]}}


def _commit_sig(seed: bytes | None, h: int, flag: int, tag: int = 0x30) -> dict:
    if seed is None or flag == BLOCK_ID_FLAG_ABSENT:
        return {"block_id_flag": BLOCK_ID_FLAG_ABSENT, "validator_address": "", "timestamp": TS}
    v = _signed_vote_json(
        seed, SignedMsgType.PRECOMMIT, h, 0, tag if flag == BLOCK_ID_FLAG_COMMIT else None
    )
    return {
        "block_id_flag": flag,
        "validator_address": v["validator_address"],
        "timestamp": TS,
        "signature": v["signature"],
    }


def _commit(h: int, sigs: list[dict]) -> dict:
    return {"height": str(h), "round": 0, "block_id": _block_json(0x30), "signatures": sigs}


def test_commit_check_may_skip_absent_validators_but_not_bad_signatures() -> None:
    d, other = _seed(4), _seed(1)
    chain = _FakeChain(
        {
            1: _commit(1, [_commit_sig(d, 1, BLOCK_ID_FLAG_COMMIT), _commit_sig(other, 1, 2)]),
            2: _commit(2, [_commit_sig(None, 2, BLOCK_ID_FLAG_ABSENT), _commit_sig(other, 2, 2)]),
            3: _commit(3, [_commit_sig(d, 3, BLOCK_ID_FLAG_NIL), _commit_sig(other, 3, 2)]),
        }
    )
    pub, verify = _key(4).pub_key, VERIFIERS["ed25519"]
    got = verify_commit_signatures(chain, pub, "ed25519", [1, 2, 3], verify, allow_absent=True)
    assert [(s.height, s.vote.block_id) for s in got] == [(1, _block_id(0x30)), (3, BlockID())]
    # Without allow_absent, the single-validator rule: every height carries a COMMIT.
    with pytest.raises(DevnetError, match="no signature"):
        verify_commit_signatures(chain, pub, "ed25519", [1, 2], verify)
    with pytest.raises(DevnetError, match="not COMMIT"):
        verify_commit_signatures(chain, pub, "ed25519", [3], verify)
    # A signature that is there must verify, absent or not allowed.
    bad = _commit_sig(d, 4, BLOCK_ID_FLAG_COMMIT, tag=0x40)  # signed another block
    chain.commits[4] = _commit(4, [bad])
    with pytest.raises(DevnetError, match="does not verify"):
        verify_commit_signatures(chain, pub, "ed25519", [4], verify, allow_absent=True)


def test_a_network_that_fails_to_start_leaves_no_node_running(tmp_path: Path) -> None:
    """``with LocalNetwork(...)``: when a node cannot start (here: its binary is missing),
    the nodes already started are stopped before the error propagates; ``__exit__`` never
    runs for a failed ``__enter__``, so they ran on until the interpreter's exit (found in
    review). ``stop`` stops every node even when one of them fails to."""
    fake = tmp_path / "fake-cometbft"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    specs = [ValidatorSpec("A"), ValidatorSpec("B"), ValidatorSpec("C")]
    net = LocalNetwork(tmp_path / "net", fake, "v0.38.25", specs)
    for node in net.nodes.values():
        node.home.mkdir(parents=True)
        node._initialised = True  # (no `cometbft init`: only the processes matter here)
    net.node("C").binary = tmp_path / "missing"
    try:
        with pytest.raises(OSError), net:
            pass
        assert not any(n.is_running() for n in net.nodes.values())
        net.node("C").binary = fake
        net.start()
        assert all(n.is_running() for n in net.nodes.values())

        def refuse(timeout: float = 10.0) -> None:
            raise DevnetError("cannot stop")

        net.node("A").stop = refuse  # type: ignore[method-assign]
        with pytest.raises(DevnetError, match="cannot stop"):
            net.stop()
        assert not net.node("B").is_running() and not net.node("C").is_running()
    finally:
        for node in net.nodes.values():
            node.kill()
