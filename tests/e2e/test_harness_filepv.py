"""Self-test of the CometBFT harness with CometBFT's OWN file signer (no Nebula involved).

Each chain signs with the node's priv_validator_key.json; the harness must then find and
verify every precommit of the first 20 blocks against that key. This proves the harness
(build, genesis/config rewriting, RPC parsing, sign-bytes reconstruction, verifiers) before
it is pointed at Nebula. The non-e2e tests pin the harness's helpers to the test vectors.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from nebula import _fast
from nebula.errors import ConfigError
from nebula.proto import vote_sign_bytes
from nebula.types import BlockID, PartSetHeader, Timestamp, Vote
from tests.support import vectors
from tests.support.cometbft import (
    BLS_DST,
    VERIFIERS,
    HarnessError,
    LocalChain,
    ValidatorKey,
    duplicate_vote_evidence,
    edit_toml,
    ensure_cometbft,
    local_chains,  # noqa: F401  (pytest fixture)
    parse_rfc3339_nano,
    read_filepv_key,
    signed_commits,
    verify_commit_signatures,
)

BLOCKS = 20


# ---- sign bytes ----------------------------------------------------------------------
# The production encoder (nebula.proto, compiled kernel when built) and its pure twin both
# rebuild the sign bytes of every real commit; a signature only verifies if they are right.

SIGN_BYTES_IMPLS = {
    "nebula.proto": vote_sign_bytes,
    "pure": _fast.load_pure("pb").vote_sign_bytes,
}


def _vote_from_vector(inputs: dict[str, Any]) -> Vote:
    bid = inputs["block_id"]
    block_id = BlockID()
    if bid is not None:
        psh = bid["part_set_header"]
        block_id = BlockID(
            hash=bytes.fromhex(bid["hash_hex"]),
            part_set_header=PartSetHeader(psh["total"], bytes.fromhex(psh["hash_hex"])),
        )
    ts = inputs["timestamp"]
    # Some vectors give only the RFC3339 text: then the harness's parser must get the
    # exact (seconds, nanos) for the bytes to match.
    if "seconds" in ts:
        timestamp = Timestamp(ts["seconds"], ts["nanos"])
    else:
        timestamp = parse_rfc3339_nano(ts["rfc3339"])
    return Vote(
        type=inputs["type"],
        height=inputs["height"],
        round=inputs["round"],
        block_id=block_id,
        timestamp=timestamp,
    )


def _canonical_vote_vectors() -> list[dict[str, Any]]:
    return [v for v in vectors.load("sign_bytes")["vectors"] if v["kind"] == "CanonicalVote"]


@pytest.mark.parametrize("impl", sorted(SIGN_BYTES_IMPLS))
@pytest.mark.parametrize("vec", _canonical_vote_vectors(), ids=lambda v: v["name"])
def test_harness_vote_conversion_matches_vectors(vec: dict[str, Any], impl: str) -> None:
    # Guards the harness's timestamp parsing on vectors given only as RFC3339 text.
    vote = _vote_from_vector(vec["inputs"])
    sign_bytes = SIGN_BYTES_IMPLS[impl](vec["inputs"]["chain_id"], vote)
    assert sign_bytes.hex() == vec["sign_bytes_hex"]


# ---- harness helpers against vectors ---------------------------------------------------


def _rfc3339_vectors() -> list[dict[str, Any]]:
    out = []
    for v in vectors.load("sign_bytes")["vectors"]:
        ts = v["inputs"].get("timestamp") or {}
        if "rfc3339" in ts and "seconds" in ts:
            out.append(ts)
    return out


@pytest.mark.parametrize("ts", _rfc3339_vectors(), ids=lambda t: t["rfc3339"])
def test_parse_rfc3339_vectors(ts: dict[str, Any]) -> None:
    assert parse_rfc3339_nano(ts["rfc3339"]) == Timestamp(ts["seconds"], ts["nanos"])


@pytest.mark.parametrize(
    ("text", "seconds", "nanos"),
    [
        ("0001-01-01T00:00:00Z", -62135596800, 0),  # Go's zero time
        ("1970-01-01T00:00:00Z", 0, 0),
        ("2026-11-22T00:13:06.562809715Z", 1795306386, 562809715),  # 9 digits, from a node
        ("2026-11-22T00:13:06.5628097Z", 1795306386, 562809700),  # Go trims trailing zeros
        ("2026-11-22T01:13:06.000000001+01:00", 1795306386, 1),
    ],
)
def test_parse_rfc3339_exact(text: str, seconds: int, nanos: int) -> None:
    assert parse_rfc3339_nano(text) == Timestamp(seconds, nanos)


@pytest.mark.parametrize("bad", ["2026-11-22 00:13:06Z", "2026-11-22T00:13:06.1234567890Z", ""])
def test_parse_rfc3339_rejects(bad: str) -> None:
    with pytest.raises(HarnessError):
        parse_rfc3339_nano(bad)


def test_verifiers_against_key_vectors() -> None:
    keys = vectors.load("signatures_and_keys")
    ed = keys["ed25519"]
    ed_pub = bytes.fromhex(ed["pub_key_hex"])
    assert ValidatorKey("ed25519", ed_pub).address.hex().upper() == ed["address_hex"]
    for s in ed["signatures"]:
        msg, sig = bytes.fromhex(s["message_hex"]), bytes.fromhex(s["signature_hex"])
        assert VERIFIERS["ed25519"](ed_pub, msg, sig)
        assert not VERIFIERS["ed25519"](ed_pub, msg + b"x", sig)

    k1 = keys["secp256k1"]
    k1_pub = bytes.fromhex(k1["pub_compressed_hex"])
    assert ValidatorKey("secp256k1", k1_pub).address.hex().upper() == k1["address_hex"]
    for s in k1["signatures"]:
        msg = bytes.fromhex(s["message_hex"]) if "message_hex" in s else s["message_utf8"].encode()
        sig = bytes.fromhex(s["signature_r_s_hex"])
        assert VERIFIERS["secp256k1"](k1_pub, msg, sig)
        assert not VERIFIERS["secp256k1"](k1_pub, msg + b"x", sig)
        # the high-S twin of a valid signature must be rejected, as CometBFT does
        n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
        high_s = sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
        assert not VERIFIERS["secp256k1"](k1_pub, msg, high_s)

    bls = keys["bls12_381"]
    pub96 = bytes.fromhex(bls["pub_key_uncompressed_96_hex"])
    assert ValidatorKey("bls12381", pub96).address.hex().upper() == bls["address_hex"]
    for s in bls["signatures"]:
        msg, sig = bytes.fromhex(s["message_hex"]), bytes.fromhex(s["signature_compressed_g2_hex"])
        assert VERIFIERS["bls12381"](pub96, msg, sig)
        assert VERIFIERS["bls12381"](bytes.fromhex(bls["pub_key_compressed_48_hex"]), msg, sig)
        assert not VERIFIERS["bls12381"](pub96, msg + b"x", sig)


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        ensure_cometbft("0.38.25")
    with pytest.raises(ConfigError):
        ensure_cometbft("v0.38.25", bls=True)
    with pytest.raises(ConfigError):
        ValidatorKey("ed25519", b"\x00" * 33)
    with pytest.raises(ConfigError):
        ValidatorKey("sr25519", b"\x00" * 32)
    with pytest.raises(ConfigError):
        LocalChain(
            Path("/nonexistent"), Path("/nonexistent"), version="v0.37.18", vote_extensions_height=1
        )
    with pytest.raises(ConfigError):
        LocalChain(
            Path("/nonexistent"),
            Path("/nonexistent"),
            version="v0.38.25",
            priv_validator_laddr="127.0.0.1:1",
        )
    with pytest.raises(HarnessError):
        edit_toml('[consensus]\ntimeout_commit = "1s"\n', {("consensus", "timeout_propose"): "1s"})
    assert edit_toml(
        'laddr = "a"\n[rpc]\nladdr = "b"\n[p2p]\nladdr = "c"\n', {("rpc", "laddr"): "x"}
    ) == ('laddr = "a"\n[rpc]\nladdr = "x"\n[p2p]\nladdr = "c"\n')


# ---- real chains -----------------------------------------------------------------------

# (version, bls build, expected key type, LocalChain.create kwargs)
SECP_PRIV = bytes.fromhex("a5" * 32)
CHAINS: list[tuple[str, bool, str, dict[str, Any]]] = [
    ("v0.34.33", False, "ed25519", {}),
    ("v0.37.18", False, "ed25519", {}),
    ("v0.38.25", False, "ed25519", {}),
    ("v1.0.1", False, "ed25519", {}),
    ("v0.34.33", False, "secp256k1", {"filepv_key": ("secp256k1", SECP_PRIV)}),
    ("v0.38.25", False, "secp256k1", {"filepv_key": ("secp256k1", SECP_PRIV)}),
    ("v1.0.1", False, "secp256k1", {"init_key_type": "secp256k1"}),
    ("v1.0.1", True, "bls12381", {"init_key_type": "bls12381"}),
    # vote extensions on: the node itself verifies the FilePV's extension signatures
    ("v0.38.25", False, "ed25519", {"vote_extensions_height": 1}),
    ("v1.0.1", True, "bls12381", {"init_key_type": "bls12381", "vote_extensions_height": 1}),
]


def _python_signature(home: Path, key_type: str, message: bytes) -> bytes:
    """Sign ``message`` with the node's FilePV private key using the Python libraries.

    All three schemes are deterministic, so this must equal the Go node's signature byte
    for byte (ed25519: RFC 8032; secp256k1: RFC 6979 + low-S; BLS: min-pk, basic DST).
    """
    doc = json.loads((home / "config" / "priv_validator_key.json").read_text())
    priv = base64.b64decode(doc["priv_key"]["value"])
    if key_type == "ed25519":
        from nacl.signing import SigningKey

        return SigningKey(priv[:32]).sign(message).signature
    if key_type == "secp256k1":
        from coincurve import PrivateKey

        return PrivateKey(priv).sign_recoverable(message)[:64]  # SHA-256 by default
    from pyblst import BlstP2Element

    scalar = int.from_bytes(priv, "big")
    return BlstP2Element().hash_to_group(message, BLS_DST).scalar_mul(scalar).compress()


def _chain_id(version: str, key_type: str, ext: bool) -> str:
    return f"selftest-{version.replace('.', '-')}-{key_type}{'-ext' if ext else ''}"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("version", "bls", "key_type", "kwargs"),
    CHAINS,
    ids=[
        f"{v}{'-bls' if b else ''}-{k}{'-ext' if kw.get('vote_extensions_height') else ''}"
        for v, b, k, kw in CHAINS
    ],
)
def test_filepv_chain_signatures_verify(
    local_chains: Any,  # noqa: F811
    version: str,
    bls: bool,
    key_type: str,
    kwargs: dict[str, Any],
) -> None:
    chain_id = _chain_id(version, key_type, "vote_extensions_height" in kwargs)
    chain: LocalChain = local_chains(
        version, bls=bls, chain_id=chain_id, timeout_commit="100ms", **kwargs
    )
    key = read_filepv_key(chain.home)
    assert key.key_type == key_type
    assert chain.validator == key

    genesis = json.loads((chain.home / "config" / "genesis.json").read_text())
    assert genesis["chain_id"] == chain_id
    assert genesis["validators"][0]["pub_key"] == key.genesis_json()
    ext = kwargs.get("vote_extensions_height")
    if ext is not None:
        table = "feature" if version.startswith("v1.") else "abci"
        assert genesis["consensus_params"][table]["vote_extensions_enable_height"] == str(ext)

    chain.wait_for_height(BLOCKS + 1, timeout=60)
    (val,) = chain.validators()
    assert ValidatorKey.from_json(val["pub_key"]) == key
    assert bytes.fromhex(val["address"]) == key.address

    verified = verify_commit_signatures(
        chain, key.pub_key, key.key_type, range(1, BLOCKS + 1), VERIFIERS[key_type]
    )
    pure = verify_commit_signatures(
        chain,
        key.pub_key,
        key.key_type,
        range(1, BLOCKS + 1),
        VERIFIERS[key_type],
        sign_bytes_fn=SIGN_BYTES_IMPLS["pure"],
    )
    assert [v.sign_bytes for v in pure] == [v.sign_bytes for v in verified]
    assert [v.height for v in verified] == list(range(1, BLOCKS + 1))
    assert len({v.signature for v in verified}) == BLOCKS
    stamps = [(v.vote.timestamp.seconds, v.vote.timestamp.nanos) for v in verified]
    assert stamps == sorted(stamps)
    assert duplicate_vote_evidence(chain, 1, BLOCKS) == []
    # Byte-identical signatures from Python's libraries and Go's (deterministic schemes).
    for v in verified[:3]:
        assert _python_signature(chain.home, key_type, v.sign_bytes) == v.signature

    # The checks must be able to fail: another chain id, another key, a wrong verifier.
    with pytest.raises(HarnessError, match="does not verify"):
        verify_commit_signatures(
            chain, key.pub_key, key_type, [BLOCKS], VERIFIERS[key_type], chain_id=chain_id + "-x"
        )
    with pytest.raises(HarnessError, match="does not verify"):
        verify_commit_signatures(chain, key.pub_key, key_type, [BLOCKS], lambda *_: False)
    other = bytearray(key.pub_key)
    other[-1] ^= 1
    with pytest.raises(HarnessError, match="no signature from validator"):
        verify_commit_signatures(chain, bytes(other), key_type, [BLOCKS], VERIFIERS[key_type])


@pytest.mark.e2e
def test_restart_kill_and_logs(local_chains: Any, tmp_path: Path) -> None:  # noqa: F811
    chain: LocalChain = local_chains(
        "v0.38.25", chain_id="selftest-restart", timeout_commit="100ms"
    )
    h1 = chain.wait_for_height(3, timeout=30)
    pid1 = chain.pid
    code = chain.stop()
    assert code is not None and not chain.is_running()
    chain.start()
    assert chain.pid != pid1
    h2 = chain.wait_for_height(h1 + 3, timeout=30)
    chain.restart()
    h3 = chain.wait_for_height(h2 + 3, timeout=30)
    assert chain.kill() == -9
    chain.start()
    h4 = chain.wait_for_height(h3 + 3, timeout=30)
    key = chain.validator
    assert key is not None
    commits = signed_commits(chain, 1, h4 - 1)
    assert [c.height for c in commits] == list(range(1, h4))
    verify_commit_signatures(
        chain,
        key.pub_key,
        key.key_type,
        range(1, h4),
        VERIFIERS[key.key_type],
    )
    assert chain.log_text().count("==== harness: starting") == 4
    chain.kill()
    with pytest.raises(HarnessError, match="exited"):
        chain.wait_for_height(h4 + 100, timeout=5)
