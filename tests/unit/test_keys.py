"""Keys, addresses, signatures and key files (protocol.md §7), and the native backend."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from nebula.backends.base import Backend
from nebula.backends.native import NativeBackend
from nebula.crypto import _ripemd160, keys
from nebula.crypto.keys import (
    BLS_COMETBFT_V1_0_0_DST,
    BLS_DEFAULT_DST,
    KEY_TYPES,
    Bls12381Key,
    Ed25519Key,
    Secp256k1Key,
    SigningKey,
)
from nebula.errors import ConfigError, KeyFileError, NebulaError
from tests.support.vectors import h, load

V = load("signatures_and_keys")
ED = V["ed25519"]
SECP = V["secp256k1"]
BLS = V["bls12_381"]


def _secp_message(entry: dict[str, Any]) -> bytes:
    if "message_utf8" in entry:
        return entry["message_utf8"].encode()
    return h(entry["message_hex"])


@pytest.fixture(params=["openssl", "pure"])
def ripemd_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run address tests with OpenSSL's RIPEMD-160 and with the pure fallback."""
    if request.param == "openssl":
        if not _ripemd160.HAVE_OPENSSL_RIPEMD160:
            pytest.skip("OpenSSL has no RIPEMD-160 here")
    else:
        monkeypatch.setattr(_ripemd160, "HAVE_OPENSSL_RIPEMD160", False)
    return request.param


@pytest.fixture(params=KEY_TYPES)
def key_type(request: pytest.FixtureRequest) -> str:
    return request.param


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- ed25519


def test_ed25519_vector_key() -> None:
    key = Ed25519Key.from_seed(h(ED["seed_hex"]))
    assert key.public_key == h(ED["pub_key_hex"])
    assert key.address == h(ED["address_hex"])
    assert key.secret_bytes() + key.public_key == h(ED["priv_key_64_hex"])
    assert keys.address_of("ed25519", key.public_key) == h(ED["address_hex"])
    assert key.key_type == "ed25519"


@pytest.mark.parametrize("entry", ED["signatures"], ids=lambda e: e["sign_bytes_name"])
def test_ed25519_vector_signatures(entry: dict[str, Any]) -> None:
    key = Ed25519Key.from_seed(h(ED["seed_hex"]))
    msg, sig = h(entry["message_hex"]), h(entry["signature_hex"])
    assert key.sign(msg) == sig
    assert key.verify(msg, sig)
    assert keys.verify_signature("ed25519", key.public_key, msg, sig)
    assert not key.verify(msg + b"\x00", sig)
    assert not key.verify(msg, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not key.verify(msg, sig[:63])


def test_ed25519_docs_example() -> None:
    ex = V["ed25519_docs_example"]
    priv = base64.b64decode(ex["priv_key_b64"])
    key = Ed25519Key(priv[:32])
    assert key.public_key == priv[32:] == base64.b64decode(ex["pub_key_b64"])
    assert key.address == h(ex["address"])


# --------------------------------------------------------------------------- secp256k1


def test_secp256k1_vector_key(ripemd_impl: str) -> None:
    key = Secp256k1Key(h(SECP["priv_hex"]))
    assert key.public_key == h(SECP["pub_compressed_hex"])
    assert key.address == h(SECP["address_hex"])
    assert keys.address_of("secp256k1", key.public_key) == h(SECP["address_hex"])
    assert key.secret_bytes() == h(SECP["priv_hex"])


@pytest.mark.parametrize("entry", SECP["signatures"], ids=lambda e: e.get("message_name", "utf8"))
def test_secp256k1_vector_signatures(entry: dict[str, Any]) -> None:
    key = Secp256k1Key(h(SECP["priv_hex"]))
    msg, sig = _secp_message(entry), h(entry["signature_r_s_hex"])
    assert key.sign(msg) == sig
    assert key.verify(msg, sig)
    assert keys.verify_signature("secp256k1", key.public_key, msg, sig)
    assert not key.verify(msg + b"\x00", sig)
    assert not key.verify(msg, sig + b"\x00")


def test_secp256k1_docs_example(ripemd_impl: str) -> None:
    ex = V["secp256k1_docs_example"]
    key = Secp256k1Key(base64.b64decode(ex["priv_key_b64"]))
    assert key.public_key == base64.b64decode(ex["pub_key_b64"])
    assert key.address == h(ex["address"])


def test_secp256k1_verify_rejects_high_s() -> None:
    key = Secp256k1Key(h(SECP["priv_hex"]))
    for entry in SECP["signatures"]:
        msg, sig = _secp_message(entry), h(entry["signature_r_s_hex"])
        r, s = sig[:32], int.from_bytes(sig[32:], "big")
        high = r + (keys.SECP256K1_N - s).to_bytes(32, "big")
        assert s <= keys.SECP256K1_N // 2
        assert key.verify(msg, sig)
        assert not key.verify(msg, high)
        assert not keys.verify_signature("secp256k1", key.public_key, msg, high)


def test_secp256k1_signatures_are_low_s_and_deterministic() -> None:
    key = Secp256k1Key.generate()
    for i in range(64):
        msg = os.urandom(i * 3)
        sig = key.sign(msg)
        assert len(sig) == 64 and sig == key.sign(msg)
        assert int.from_bytes(sig[32:], "big") <= keys.SECP256K1_N // 2
        assert key.verify(msg, sig)


# --------------------------------------------------------------------------- BLS12-381


def test_bls_vector_key() -> None:
    key = Bls12381Key(h(BLS["secret_key_be_hex"]))
    assert key.public_key == h(BLS["pub_key_uncompressed_96_hex"])
    assert key.public_key_compressed == h(BLS["pub_key_compressed_48_hex"])
    assert key.address == h(BLS["address_hex"])
    assert keys.address_of("bls12381", key.public_key) == h(BLS["address_hex"])
    assert key.secret_bytes() == h(BLS["secret_key_be_hex"])
    assert keys.g1_compressed(key.public_key) == key.public_key_compressed
    assert keys.g1_uncompressed(key.public_key_compressed) == key.public_key


@pytest.mark.parametrize("entry", BLS["signatures"], ids=lambda e: e["sign_bytes_name"])
def test_bls_vector_signatures(entry: dict[str, Any]) -> None:
    key = Bls12381Key(h(BLS["secret_key_be_hex"]))
    msg, sig = h(entry["message_hex"]), h(entry["signature_compressed_g2_hex"])
    assert key.sign(msg) == sig
    assert key.verify(msg, sig)
    for pub in (key.public_key, key.public_key_compressed):
        assert keys.verify_signature("bls12381", pub, msg, sig)
    assert not key.verify(msg + b"\x00", sig)
    assert not key.verify(msg, sig[:95])


def test_bls_custom_dst() -> None:
    secret = h(BLS["secret_key_be_hex"])
    msg = h(BLS["signatures"][0]["message_hex"])
    default = Bls12381Key(secret)
    custom = Bls12381Key(secret, dst=BLS_COMETBFT_V1_0_0_DST)
    assert custom.dst == BLS_COMETBFT_V1_0_0_DST and default.dst == BLS_DEFAULT_DST
    assert custom.public_key == default.public_key and custom.address == default.address
    sig = custom.sign(msg)
    assert sig != default.sign(msg) == h(BLS["signatures"][0]["signature_compressed_g2_hex"])
    assert custom.verify(msg, sig)
    assert not default.verify(msg, sig)
    assert not custom.verify(msg, default.sign(msg))
    assert keys.verify_signature(
        "bls12381", custom.public_key, msg, sig, bls_dst=BLS_COMETBFT_V1_0_0_DST
    )
    assert not keys.verify_signature("bls12381", custom.public_key, msg, sig)
    other = keys.from_secret("bls12381", secret, bls_dst=b"NEBULA_TEST_DST_")
    assert other.sign(msg) not in (sig, default.sign(msg))


def test_bls_wrong_key_does_not_verify() -> None:
    a, b = Bls12381Key.generate(), Bls12381Key.generate()
    sig = a.sign(b"hello")
    assert a.verify(b"hello", sig)
    assert not b.verify(b"hello", sig)


def test_g1_encoding_round_trips_and_rejections() -> None:
    for _ in range(8):
        key = Bls12381Key.generate()
        unc = key.public_key
        assert len(unc) == 96 and unc[0] & 0xE0 == 0
        assert keys.g1_compressed(unc) == key.public_key_compressed
        assert keys.address_of("bls12381", unc) == hashlib.sha256(unc).digest()[:20]
        # y replaced by -y: still on the curve, so it must give the other compressed point
        y = int.from_bytes(unc[48:], "big")
        neg = unc[:48] + (keys.BLS_P - y).to_bytes(48, "big")
        assert keys.g1_compressed(neg) != key.public_key_compressed
        # off the curve
        off = unc[:48] + ((y + 1) % keys.BLS_P).to_bytes(48, "big")
        with pytest.raises(KeyFileError, match="not on the curve"):
            keys.g1_compressed(off)
        # a compression flag on a 96-byte encoding
        with pytest.raises(KeyFileError, match="flag"):
            keys.g1_compressed(bytes([unc[0] | 0x80]) + unc[1:])
    with pytest.raises(KeyFileError, match="infinity"):
        keys.verify_signature("bls12381", bytes([0x40]) + bytes(95), b"m", bytes(96))
    with pytest.raises(KeyFileError):
        keys.verify_signature("bls12381", bytes(95), b"m", bytes(96))


def test_bls_keygen_properties() -> None:
    ikm = hashlib.sha256(b"nebula keygen").digest()
    sk = keys.bls_keygen(ikm)
    assert 0 < sk < keys.BLS_R
    assert keys.bls_keygen(ikm) == sk
    assert keys.bls_keygen(ikm, b"info") != sk
    assert keys.bls_keygen(ikm[:-1] + bytes([ikm[-1] ^ 1])) != sk
    assert Bls12381Key.from_ikm(ikm).secret_bytes() == sk.to_bytes(32, "big")
    with pytest.raises(KeyFileError, match="32 bytes"):
        keys.bls_keygen(ikm[:31])


def test_bls_against_py_ecc() -> None:
    """Cross-check KeyGen, the public key and a custom-DST signature with py_ecc."""
    py_ecc_bls = pytest.importorskip("py_ecc.bls")
    from py_ecc.bls.g2_primitives import G1_to_pubkey, G2_to_signature
    from py_ecc.bls.hash_to_curve import hash_to_G2
    from py_ecc.optimized_bls12_381 import G1, multiply

    ikm = hashlib.sha256(b"nebula py_ecc cross-check").digest()
    for info in (b"", b"key info"):
        assert keys.bls_keygen(ikm, info) == py_ecc_bls.G2Basic.KeyGen(ikm, info)
    key = Bls12381Key.from_ikm(ikm, dst=b"NEBULA_CUSTOM_DST")
    sk = int.from_bytes(key.secret_bytes(), "big")
    assert G1_to_pubkey(multiply(G1, sk)) == key.public_key_compressed
    msg = b"nebula"
    expected = G2_to_signature(multiply(hash_to_G2(msg, b"NEBULA_CUSTOM_DST", hashlib.sha256), sk))
    assert key.sign(msg) == expected


# --------------------------------------------------------------------------- all types


def test_sign_verify_round_trip(key_type: str) -> None:
    key = keys.generate(key_type)
    assert key.key_type == key_type
    for msg in (b"", b"x", os.urandom(200)):
        sig = key.sign(msg)
        assert key.verify(msg, sig)
        assert keys.verify_signature(key_type, key.public_key, msg, sig)
        assert not key.verify(msg + b"!", sig)
    again = keys.from_secret(key_type, key.secret_bytes())
    assert (again.public_key, again.address) == (key.public_key, key.address)
    assert keys.address_of(key_type, key.public_key) == key.address
    assert len(key.address) == 20
    assert key.secret_bytes().hex() not in repr(key)


def test_key_type_names() -> None:
    assert keys.canonical_key_type("bls12_381") == "bls12381"
    assert keys.canonical_key_type("Ed25519") == "ed25519"
    assert keys.V1_PUB_KEY_TYPES["bls12381"] == "bls12_381"
    with pytest.raises(ConfigError, match="unknown key type"):
        keys.generate("rsa")
    with pytest.raises(KeyFileError, match="33 bytes"):
        keys.address_of("secp256k1", bytes(32))


@pytest.mark.parametrize(
    ("key_type", "secret", "message"),
    [
        ("secp256k1", bytes(32), "0 or not below n"),
        ("secp256k1", keys.SECP256K1_N.to_bytes(32, "big"), "0 or not below n"),
        ("bls12381", bytes(32), "0 or not below r"),
        ("bls12381", keys.BLS_R.to_bytes(32, "big"), "0 or not below r"),
        ("ed25519", bytes(31), "32 bytes"),
        ("bls12381", bytes(33), "32 bytes"),
    ],
)
def test_invalid_secrets(key_type: str, secret: bytes, message: str) -> None:
    with pytest.raises(KeyFileError, match=message):
        keys.from_secret(key_type, secret)


# --------------------------------------------------------------------------- JSON


def test_pubkey_json_names() -> None:
    names = {
        "ed25519": "tendermint/PubKeyEd25519",
        "secp256k1": "tendermint/PubKeySecp256k1",
        "bls12381": "cometbft/PubKeyBls12_381",
    }
    for kt, name in names.items():
        key = keys.generate(kt)
        assert keys.pubkey_json(key) == {"type": name, "value": _b64(key.public_key)}


def test_priv_validator_key_json_round_trip(key_type: str, tmp_path: Path) -> None:
    key = keys.generate(key_type)
    doc = keys.priv_validator_key_json(key)
    assert doc["address"] == key.address.hex().upper()
    assert doc["pub_key"] == keys.pubkey_json(key)
    priv = base64.b64decode(doc["priv_key"]["value"])
    assert len(priv) == (64 if key_type == "ed25519" else 32)
    path = tmp_path / "priv_validator_key.json"
    keys.write_priv_validator_key_json(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == doc
    loaded = keys.load_priv_validator_key_json(path)
    assert type(loaded) is type(key)
    assert loaded.secret_bytes() == key.secret_bytes()
    assert (loaded.public_key, loaded.address) == (key.public_key, key.address)
    with pytest.raises(KeyFileError, match="already exists"):
        keys.write_priv_validator_key_json(path, key)


def test_priv_validator_key_json_docs_examples(tmp_path: Path) -> None:
    cases = [
        ("ed25519_docs_example", "tendermint/PubKeyEd25519", "tendermint/PrivKeyEd25519"),
        ("secp256k1_docs_example", "tendermint/PubKeySecp256k1", "tendermint/PrivKeySecp256k1"),
    ]
    for name, pub_type, priv_type in cases:
        ex = V[name]
        doc = {
            "address": ex["address"],
            "pub_key": {"type": pub_type, "value": ex["pub_key_b64"]},
            "priv_key": {"type": priv_type, "value": ex["priv_key_b64"]},
        }
        path = _write(tmp_path / f"{name}.json", json.dumps(doc))
        key = keys.load_priv_validator_key_json(path)
        assert key.address == h(ex["address"])
        assert keys.priv_validator_key_json(key) == doc


def test_priv_validator_key_json_bls_vector(tmp_path: Path) -> None:
    key = Bls12381Key(h(BLS["secret_key_be_hex"]))
    doc = keys.priv_validator_key_json(key)
    assert doc["priv_key"] == {
        "type": "cometbft/PrivKeyBls12_381",
        "value": _b64(h(BLS["secret_key_be_hex"])),
    }
    assert doc["pub_key"]["value"] == _b64(h(BLS["pub_key_uncompressed_96_hex"]))
    assert doc["address"] == BLS["address_hex"]
    path = _write(tmp_path / "k.json", json.dumps(doc))
    custom = keys.load_priv_validator_key_json(path, bls_dst=BLS_COMETBFT_V1_0_0_DST)
    assert isinstance(custom, Bls12381Key) and custom.dst == BLS_COMETBFT_V1_0_0_DST


def _ed_doc() -> dict[str, Any]:
    return keys.priv_validator_key_json(Ed25519Key(h(ED["seed_hex"])))


def _mutate_pub(doc: dict[str, Any]) -> None:
    doc["pub_key"]["value"] = _b64(bytes(32))


def _mutate_addr(doc: dict[str, Any]) -> None:
    doc["address"] = "00" * 20


def _mutate_second_half(doc: dict[str, Any]) -> None:
    doc["priv_key"]["value"] = _b64(h(ED["seed_hex"]) + bytes(32))


def _mutate_short(doc: dict[str, Any]) -> None:
    doc["priv_key"]["value"] = _b64(h(ED["seed_hex"]))


def _mutate_type(doc: dict[str, Any]) -> None:
    doc["priv_key"]["type"] = "tendermint/PrivKeySr25519"


def _mutate_b64(doc: dict[str, Any]) -> None:
    doc["priv_key"]["value"] = "not base64!"


def _mutate_pub_type(doc: dict[str, Any]) -> None:
    doc["pub_key"]["type"] = "tendermint/PubKeySecp256k1"


def _mutate_no_priv(doc: dict[str, Any]) -> None:
    del doc["priv_key"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_mutate_pub, "pub_key does not match"),
        (_mutate_addr, "address .* does not match"),
        (_mutate_second_half, "second half"),
        (_mutate_short, "64 bytes"),
        (_mutate_type, "unsupported priv_key type"),
        (_mutate_b64, "not valid base64"),
        (_mutate_pub_type, "pub_key type"),
        (_mutate_no_priv, "missing"),
    ],
)
def test_priv_validator_key_json_refusals(tmp_path: Path, mutate: Any, message: str) -> None:
    doc = _ed_doc()
    mutate(doc)
    path = _write(tmp_path / "priv_validator_key.json", json.dumps(doc))
    with pytest.raises(KeyFileError, match=message) as info:
        keys.load_priv_validator_key_json(path)
    assert str(path) in str(info.value)


def test_priv_validator_key_json_optional_fields_and_garbage(tmp_path: Path) -> None:
    doc = _ed_doc()
    del doc["pub_key"], doc["address"]
    path = _write(tmp_path / "a.json", json.dumps(doc))
    assert keys.load_priv_validator_key_json(path).public_key == h(ED["pub_key_hex"])
    lower = _ed_doc()
    lower["address"] = lower["address"].lower()
    path = _write(tmp_path / "b.json", json.dumps(lower))
    assert keys.load_priv_validator_key_json(path).address == h(ED["address_hex"])
    path = _write(tmp_path / "c.json", "{not json")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        keys.load_priv_validator_key_json(path)
    path = _write(tmp_path / "d.json", json.dumps(_ed_doc()), 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        keys.load_priv_validator_key_json(path)
    assert keys.load_priv_validator_key_json(path, check_permissions=False).address == h(
        ED["address_hex"]
    )


# --------------------------------------------------------------------------- key files


def test_key_file_round_trip(key_type: str, tmp_path: Path) -> None:
    key = keys.generate(key_type)
    path = tmp_path / "consensus.key"
    keys.write_key_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == _b64(key.secret_bytes()).encode() + b"\n"
    loaded = keys.load_key_file(path, key_type)
    assert loaded.secret_bytes() == key.secret_bytes()
    assert loaded.public_key == key.public_key
    assert [p.name for p in tmp_path.iterdir()] == ["consensus.key"]  # no temp left behind


def test_key_file_write_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    first, second = Ed25519Key.generate(), Ed25519Key.generate()
    keys.write_key_file(path, first)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        keys.write_key_file(path, second)
    assert keys.load_key_file(path, "ed25519").public_key == first.public_key
    keys.write_key_file(path, second, overwrite=True)
    assert keys.load_key_file(path, "ed25519").public_key == second.public_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_file_write_under_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keys.write_key_file(tmp_path / "k", Ed25519Key.generate())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


def test_key_file_vectors(tmp_path: Path) -> None:
    for kt, secret, address in (
        ("ed25519", h(ED["seed_hex"]), h(ED["address_hex"])),
        ("secp256k1", h(SECP["priv_hex"]), h(SECP["address_hex"])),
        ("bls12381", h(BLS["secret_key_be_hex"]), h(BLS["address_hex"])),
    ):
        path = _write(tmp_path / kt, _b64(secret) + "\n")
        assert keys.load_key_file(path, kt).address == address


def test_key_file_whitespace_tolerant(tmp_path: Path) -> None:
    text = _b64(h(ED["seed_hex"]))
    wrapped = "  " + text[:20] + "\n\t" + text[20:] + " \r\n\n"
    path = _write(tmp_path / "k", wrapped)
    assert keys.load_key_file(path, "ed25519").public_key == h(ED["pub_key_hex"])


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_key_file_permissions_refused(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "k", _b64(h(ED["seed_hex"])), mode)
    with pytest.raises(KeyFileError, match="chmod 600") as info:
        keys.load_key_file(path, "ed25519")
    assert str(path) in str(info.value) and f"{mode:04o}" in str(info.value)
    with pytest.raises(KeyFileError, match="chmod 600"):
        keys.check_private_file(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_file_permissions_accepted(tmp_path: Path, mode: int) -> None:
    path = _write(tmp_path / "k", _b64(h(ED["seed_hex"])), mode)
    keys.check_private_file(path)
    assert keys.load_key_file(path, "ed25519").public_key == h(ED["pub_key_hex"])


@pytest.mark.parametrize(
    ("content", "key_type", "message"),
    [
        ("", "ed25519", "empty"),
        (" \n\t", "ed25519", "empty"),
        ("not base64 !!", "ed25519", "not valid base64"),
        ("AAAAA", "ed25519", "not valid base64"),
        (_b64(bytes(31)), "ed25519", "holds 31 bytes"),
        (_b64(bytes(64)), "ed25519", "holds 64 bytes"),
        (_b64(bytes(32)), "secp256k1", "0 or not below n"),
        (_b64(b"\xff" * 32), "bls12381", "0 or not below r"),
    ],
)
def test_key_file_malformed(tmp_path: Path, content: str, key_type: str, message: str) -> None:
    path = _write(tmp_path / "k", content)
    with pytest.raises(KeyFileError, match=message) as info:
        keys.load_key_file(path, key_type)
    assert str(path) in str(info.value)


def test_key_file_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.load_key_file(tmp_path / "nope", "ed25519")
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.check_private_file(tmp_path / "nope")
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        keys.load_key_file(d, "ed25519")
    with pytest.raises(ConfigError, match="unknown key type"):
        keys.load_key_file(d, "dsa")


def test_key_file_unreadable(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = _write(tmp_path / "k", _b64(h(ED["seed_hex"])), 0o000)
        with pytest.raises(KeyFileError, match="cannot be read"):
            keys.load_key_file(path, "ed25519")
        return
    # Root reads any file: check it as an unprivileged user (nobody) in a forked child
    # (a fork, not an exec: the interpreter under /root is not reachable for nobody).
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        path = _write(Path(d) / "k", _b64(h(ED["seed_hex"])), 0o000)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop privileges, try, report, exit without cleanup
            try:
                os.close(rfd)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    keys.load_key_file(path, "ed25519")
                    out = "loaded"
                except KeyFileError as e:
                    out = str(e)
                os.write(wfd, out.encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            text = f.read().decode()
        os.waitpid(pid, 0)
    assert "cannot be read" in text, text


def test_errors_are_nebula_errors() -> None:
    assert issubclass(KeyFileError, NebulaError) and issubclass(ConfigError, NebulaError)


# --------------------------------------------------------------------------- RIPEMD-160


def test_ripemd160_pure_matches_openssl() -> None:
    if not _ripemd160.HAVE_OPENSSL_RIPEMD160:
        pytest.skip("OpenSSL has no RIPEMD-160 here; the vector tests cover the pure one")
    for n in (0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 300):
        data = os.urandom(n)
        assert _ripemd160.ripemd160_pure(data) == hashlib.new("ripemd160", data).digest()


# --------------------------------------------------------------------------- backend


def test_native_backend(key_type: str) -> None:
    key = keys.generate(key_type)
    backend = NativeBackend(key)
    assert isinstance(backend, Backend)
    assert backend.key_type == key_type
    assert backend.public_key == key.public_key
    assert backend.address == key.address == keys.address_of(key_type, key.public_key)
    msg = b"sign bytes"
    sig = backend.sign_sync(msg)
    assert sig is not None and key.verify(msg, sig)

    async def run() -> bytes:
        out = await backend.sign(msg)
        await backend.close()
        return out

    assert key.verify(msg, asyncio.run(run()))


def test_backend_default_sync_path_is_none() -> None:
    class Remote(Backend):
        key_type = "ed25519"
        public_key = h(ED["pub_key_hex"])

        async def sign(self, msg: bytes) -> bytes:
            return bytes(64)

    remote = Remote()
    assert remote.sign_sync(b"m") is None
    assert remote.address == h(ED["address_hex"])
    assert asyncio.run(remote.sign(b"m")) == bytes(64)
    asyncio.run(remote.close())


def test_signing_key_is_abstract() -> None:
    with pytest.raises(TypeError):
        SigningKey()  # type: ignore[abstract]


@pytest.mark.parametrize(
    "content",
    [
        '{"priv_key": %s}' % ("[" * 10**5 + "]" * 10**5),
        '{"priv_key": {"type": "x", "value": %s}}' % ("9" * 5000),
    ],
    ids=["nested-past-the-recursion-limit", "int-past-4300-digits"],
)
@pytest.mark.usefixtures("production_recursion_limit")
def test_json_key_files_past_the_parser_limits_are_key_file_errors(
    tmp_path: Path, content: str
) -> None:
    """priv_validator_key.json, a threshold share file and a DKG member's public file
    (another operator's) that Python's JSON parser gives up on (RecursionError, or int()'s 4300-digit ValueError that is no JSONDecodeError)
    are KeyFileErrors naming the file, not a traceback (found in review)."""
    from nebula.cli.dkg import _read_json
    from nebula.crypto.threshold import load_share_file

    path = _write(tmp_path / "k.json", content)
    dkg_file = lambda p: _read_json(str(p), "DKG member file")  # noqa: E731 - another member's
    for loader in (keys.load_priv_validator_key_json, load_share_file, dkg_file):
        with pytest.raises(KeyFileError, match="not valid JSON") as info:
            loader(path)
        assert str(path) in str(info.value)
