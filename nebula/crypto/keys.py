"""Consensus keys, addresses and the CometBFT key file formats (protocol.md §7).

Three key types, all behind :class:`SigningKey`:

* ``ed25519`` — RFC 8032 over the sign bytes as-is (PyNaCl / libsodium). 32-byte public
  key; address = SHA-256(pub)[:20].
* ``secp256k1`` — ECDSA over SHA-256(message), RFC 6979 nonce, low-S, 64-byte ``r || s``
  (coincurve / libsecp256k1). 33-byte compressed public key;
  address = RIPEMD-160(SHA-256(pub)).
* ``bls12381`` — min-pk BLS (public key in G1, signature in G2), blst ``CoreSign`` of the
  raw message with a configurable DST (pyblst primitives). The public key is the 96-byte
  **uncompressed** G1 point; the signature is the 96-byte compressed G2 point;
  address = SHA-256(96-byte pub)[:20].

Key files:

* the native key file: base64 of the 32-byte secret and a newline, mode 0600;
* CometBFT ``priv_validator_key.json`` (Amino-style JSON, §7.5), read and written.

Errors: unknown key type names raise :class:`ConfigError`; anything wrong with key
material or key files raises :class:`KeyFileError` with a message naming the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import coincurve
import nacl.bindings
import nacl.exceptions
from coincurve.ecdsa import cdata_to_der, deserialize_compact
from pyblst import BlstP1Element, BlstP2Element, final_verify, miller_loop

from nebula.crypto._ripemd160 import ripemd160
from nebula.durable import write_file_durably
from nebula.errors import ConfigError, KeyFileError

__all__ = [
    "BLS_COMETBFT_V1_0_0_DST",
    "BLS_DEFAULT_DST",
    "KEY_TYPES",
    "V1_PUB_KEY_TYPES",
    "Bls12381Key",
    "Ed25519Key",
    "HasPublicKey",
    "Secp256k1Key",
    "SigningKey",
    "address_of",
    "bls_keygen",
    "canonical_key_type",
    "check_private_file",
    "from_secret",
    "generate",
    "load_key_file",
    "load_priv_validator_key_json",
    "priv_validator_key_json",
    "pubkey_json",
    "read_private_file",
    "signature_verifier",
    "verify_signature",
    "write_key_file",
    "write_priv_validator_key_json",
    "write_private_file",
]

KEY_TYPES = ("ed25519", "secp256k1", "bls12381")

# CometBFT v1.0.1+, v0.39, v0.40 (protocol.md §7.3).
BLS_DEFAULT_DST = b"BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_NUL_"
# CometBFT v1.0.0 only: the wrong (G1) DST, fixed in v1.0.1 (#4813). Signatures differ.
BLS_COMETBFT_V1_0_0_DST = b"BLS_SIG_BLS12381G1_XMD:SHA-256_SSWU_RO_NUL_"

# v1.0 PubKeyResponse.pub_key_type strings (protocol.md §2.4).
V1_PUB_KEY_TYPES = {"ed25519": "ed25519", "secp256k1": "secp256k1", "bls12381": "bls12_381"}

# Amino JSON names: key type -> (public key name, private key name). (§7.3, §7.5)
_JSON_NAMES = {
    "ed25519": ("tendermint/PubKeyEd25519", "tendermint/PrivKeyEd25519"),
    "secp256k1": ("tendermint/PubKeySecp256k1", "tendermint/PrivKeySecp256k1"),
    "bls12381": ("cometbft/PubKeyBls12_381", "cometbft/PrivKeyBls12_381"),
}
_TYPE_BY_PRIV_NAME = {priv: kt for kt, (_, priv) in _JSON_NAMES.items()}

_KEY_TYPE_ALIASES = {
    "ed25519": "ed25519",
    "secp256k1": "secp256k1",
    "bls12381": "bls12381",
    "bls12_381": "bls12381",
    "bls12-381": "bls12381",
}

_PUBLIC_KEY_SIZES = {"ed25519": 32, "secp256k1": 33, "bls12381": 96}
SECRET_SIZE = 32


def canonical_key_type(name: str) -> str:
    """The canonical key type for ``name`` (accepts CometBFT's ``bls12_381`` spelling)."""
    kt = _KEY_TYPE_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
    if kt is None:
        raise ConfigError(f"unknown key type {name!r}; expected one of {', '.join(KEY_TYPES)}")
    return kt


# ---------------------------------------------------------------------------------------
# The key classes
# ---------------------------------------------------------------------------------------


class SigningKey(ABC):
    """A consensus private key that signs sign bytes for CometBFT."""

    __slots__ = ("address", "public_key")

    key_type: ClassVar[str]
    public_key: bytes
    address: bytes

    @abstractmethod
    def sign(self, msg: bytes) -> bytes:
        """The signature CometBFT expects over ``msg`` (the sign bytes as-is)."""

    @abstractmethod
    def verify(self, msg: bytes, sig: bytes) -> bool:
        """True iff ``sig`` is a valid signature of ``msg`` under this key."""

    @abstractmethod
    def secret_bytes(self) -> bytes:
        """The 32-byte secret of the native key file (seed / scalar, big-endian)."""

    def __repr__(self) -> str:
        # Never the secret.
        return f"<{type(self).__name__} address={self.address.hex().upper()}>"


class Ed25519Key(SigningKey):
    """Ed25519 key from a 32-byte seed (RFC 8032 private key)."""

    __slots__ = ("_seed", "_sk64")
    key_type = "ed25519"

    def __init__(self, seed: bytes) -> None:
        seed = bytes(seed)
        if len(seed) != SECRET_SIZE:
            raise KeyFileError(f"an ed25519 seed is 32 bytes, got {len(seed)}")
        pub, sk64 = nacl.bindings.crypto_sign_seed_keypair(seed)
        self._seed = seed
        self._sk64 = sk64  # seed || pub, libsodium's secret key layout
        self.public_key = pub
        self.address = hashlib.sha256(pub).digest()[:20]

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Key:
        return cls(seed)

    @classmethod
    def generate(cls) -> Ed25519Key:
        return cls(os.urandom(SECRET_SIZE))

    def sign(self, msg: bytes) -> bytes:
        return nacl.bindings.crypto_sign(msg, self._sk64)[:64]

    def verify(self, msg: bytes, sig: bytes) -> bool:
        return _ed25519_verify(self.public_key, msg, sig)

    def secret_bytes(self) -> bytes:
        return self._seed


class Secp256k1Key(SigningKey):
    """secp256k1 ECDSA key from a 32-byte big-endian scalar."""

    __slots__ = ("_pk", "_sk")
    key_type = "secp256k1"

    def __init__(self, secret: bytes) -> None:
        secret = bytes(secret)
        if len(secret) != SECRET_SIZE:
            raise KeyFileError(f"a secp256k1 secret is 32 bytes, got {len(secret)}")
        if not 0 < int.from_bytes(secret, "big") < SECP256K1_N:
            raise KeyFileError("invalid secp256k1 secret: the scalar is 0 or not below n")
        self._sk = coincurve.PrivateKey(secret)
        self._pk = self._sk.public_key
        self.public_key = self._pk.format(compressed=True)
        self.address = ripemd160(hashlib.sha256(self.public_key).digest())

    @classmethod
    def generate(cls) -> Secp256k1Key:
        return cls(coincurve.PrivateKey().secret)

    def sign(self, msg: bytes) -> bytes:
        # libsecp256k1: SHA-256 of msg, RFC 6979 nonce, low-S. The recoverable form is
        # r || s || recid; dropping recid gives CometBFT's 64-byte r || s.
        return self._sk.sign_recoverable(msg)[:64]

    def verify(self, msg: bytes, sig: bytes) -> bool:
        return _secp256k1_verify(self._pk, msg, sig)

    def secret_bytes(self) -> bytes:
        return self._sk.secret


class Bls12381Key(SigningKey):
    """BLS12-381 min-pk key from a 32-byte big-endian scalar (blst serialization)."""

    __slots__ = ("_dst", "_pk_point", "_sk", "public_key_compressed")
    key_type = "bls12381"

    def __init__(self, secret: bytes, *, dst: bytes = BLS_DEFAULT_DST) -> None:
        secret = bytes(secret)
        if len(secret) != SECRET_SIZE:
            raise KeyFileError(f"a BLS12-381 secret is 32 bytes, got {len(secret)}")
        sk = int.from_bytes(secret, "big")
        if not 0 < sk < BLS_R:
            raise KeyFileError("invalid BLS12-381 secret: the scalar is 0 or not below r")
        if not isinstance(dst, bytes | bytearray) or not 0 < len(dst) <= 255:
            raise KeyFileError("a BLS domain separation tag is 1 to 255 bytes")
        self._sk = sk
        self._dst = bytes(dst)
        self._pk_point = _G1.scalar_mul(sk)
        self.public_key_compressed: bytes = self._pk_point.compress()
        self.public_key = g1_uncompressed(self.public_key_compressed)
        self.address = hashlib.sha256(self.public_key).digest()[:20]

    @property
    def dst(self) -> bytes:
        return self._dst

    @classmethod
    def from_ikm(
        cls, ikm: bytes, key_info: bytes = b"", *, dst: bytes = BLS_DEFAULT_DST
    ) -> Bls12381Key:
        """IETF KeyGen(IKM, key_info), as blst ``KeyGen`` (used by CometBFT) computes it."""
        return cls(bls_keygen(ikm, key_info).to_bytes(32, "big"), dst=dst)

    @classmethod
    def generate(cls, *, dst: bytes = BLS_DEFAULT_DST) -> Bls12381Key:
        return cls.from_ikm(os.urandom(32), dst=dst)

    def sign(self, msg: bytes) -> bytes:
        return BlstP2Element.hash_to_group(msg, self._dst).scalar_mul(self._sk).compress()

    def verify(self, msg: bytes, sig: bytes) -> bool:
        return _bls_verify(self._pk_point, msg, sig, self._dst)

    def secret_bytes(self) -> bytes:
        return self._sk.to_bytes(32, "big")


# ---------------------------------------------------------------------------------------
# Curve helpers
# ---------------------------------------------------------------------------------------

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_SECP256K1_HALF_N = SECP256K1_N // 2


def secp256k1_low_s(sig: bytes) -> bytes:
    """A 64-byte ``r || s`` secp256k1 signature with ``s`` in the lower half of the group
    order (``n - s`` for a high one: the same signature for ECDSA, and the only form
    CometBFT accepts).  ValueError if it is not 64 bytes or ``r``/``s`` is out of range."""
    if len(sig) != 64:
        raise ValueError(f"a secp256k1 signature is 64 bytes, got {len(sig)}")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    if not (0 < r < SECP256K1_N and 0 < s < SECP256K1_N):
        raise ValueError("an out-of-range ECDSA signature")
    if s > _SECP256K1_HALF_N:
        s = SECP256K1_N - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# BLS12-381: base field modulus p, group order r, the G1 generator (compressed).
BLS_P = int(
    "1a0111ea397fe69a4b1ba7b6434bacd764774b84f38512bf6730d2a0f6b0f6241eabfffeb153ffffb9feffffffffaaab",
    16,
)
BLS_R = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001
_P_HALF = (BLS_P - 1) // 2
_G1 = BlstP1Element.uncompress(
    bytes.fromhex(
        "97f1d3a73197d7942695638c4fa9ac0fc3688c4f9774b905"
        "a14e3a3f171bac586c55e83ff97a1aeffb3af00adb22c6bb"
    )
)
# Serialization flags of the first byte (ZCash format, as blst writes it).
_FLAG_COMPRESSED = 0x80
_FLAG_INFINITY = 0x40
_FLAG_SIGN = 0x20


def g1_uncompressed(compressed: bytes) -> bytes:
    """The 96-byte uncompressed serialization (blst ``Serialize``) of a compressed G1 point.

    Uncompressed: big-endian x (48 bytes) || y (48 bytes), no compression or sign flag;
    the point at infinity is 0x40 followed by zeros. ``compressed`` must be a valid
    compressed point (as produced by pyblst); y = sqrt(x^3 + 4), the root whose
    "lexicographically largest" bit (y > (p-1)/2) equals the sign flag.
    """
    if len(compressed) != 48 or not compressed[0] & _FLAG_COMPRESSED:
        raise KeyFileError("not a compressed G1 point")
    if compressed[0] & _FLAG_INFINITY:
        return bytes([_FLAG_INFINITY]) + bytes(95)
    x = int.from_bytes(bytes([compressed[0] & 0x1F]) + compressed[1:], "big")
    rhs = (x * x * x + 4) % BLS_P
    y = pow(rhs, (BLS_P + 1) // 4, BLS_P)  # p = 3 (mod 4)
    if y * y % BLS_P != rhs:
        raise KeyFileError("not a G1 point: x^3 + 4 has no square root")
    if bool(compressed[0] & _FLAG_SIGN) != (y > _P_HALF):
        y = BLS_P - y
    return x.to_bytes(48, "big") + y.to_bytes(48, "big")


def g1_compressed(uncompressed: bytes) -> bytes:
    """The 48-byte compressed form of a 96-byte uncompressed G1 point (checks the curve)."""
    if len(uncompressed) != 96:
        raise KeyFileError(f"an uncompressed G1 point is 96 bytes, got {len(uncompressed)}")
    flags = uncompressed[0] & 0xE0
    if flags & (_FLAG_COMPRESSED | _FLAG_SIGN):
        raise KeyFileError("bad uncompressed G1 encoding: compression or sign flag set")
    if flags & _FLAG_INFINITY:
        if uncompressed[0] != _FLAG_INFINITY or any(uncompressed[1:]):
            raise KeyFileError("bad encoding of the G1 point at infinity")
        return bytes([_FLAG_COMPRESSED | _FLAG_INFINITY]) + bytes(47)
    x = int.from_bytes(uncompressed[:48], "big")
    y = int.from_bytes(uncompressed[48:], "big")
    if x >= BLS_P or y >= BLS_P:
        raise KeyFileError("bad uncompressed G1 encoding: coordinate not below p")
    if (y * y - x * x * x - 4) % BLS_P:
        raise KeyFileError("bad uncompressed G1 encoding: the point is not on the curve")
    out = bytearray(uncompressed[:48])
    out[0] |= _FLAG_COMPRESSED | (_FLAG_SIGN if y > _P_HALF else 0)
    return bytes(out)


def _bls_public_point(public_key: bytes) -> BlstP1Element:
    """A G1 public key from 96 (uncompressed) or 48 (compressed) bytes, validated.

    Like blst ``KeyValidate``: on the curve, in the subgroup (pyblst's uncompress checks
    it), not the point at infinity.
    """
    if len(public_key) == 96:
        compressed = g1_compressed(public_key)
    elif len(public_key) == 48:
        compressed = bytes(public_key)
    else:
        raise KeyFileError(f"a BLS12-381 public key is 96 or 48 bytes, got {len(public_key)}")
    if compressed[0] & _FLAG_INFINITY:
        raise KeyFileError("a BLS12-381 public key cannot be the point at infinity")
    try:
        return BlstP1Element.uncompress(compressed)
    except ValueError as exc:
        raise KeyFileError(f"invalid BLS12-381 public key: {exc}") from None


def _bls_verify(pk: BlstP1Element, msg: bytes, sig: bytes, dst: bytes) -> bool:
    if len(sig) != 96:
        return False
    try:
        s = BlstP2Element.uncompress(bytes(sig))  # checks the curve and the subgroup
    except ValueError:
        return False
    h = BlstP2Element.hash_to_group(msg, dst)
    # e(pk, H(m)) == e(g1, sig)
    return bool(final_verify(miller_loop(pk, h), miller_loop(_G1, s)))


def _ed25519_verify(public_key: bytes, msg: bytes, sig: bytes) -> bool:
    if len(sig) != 64 or len(public_key) != 32:
        return False
    try:
        nacl.bindings.crypto_sign_open(bytes(sig) + bytes(msg), public_key)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


def _secp256k1_verify(pk: coincurve.PublicKey, msg: bytes, sig: bytes) -> bool:
    if len(sig) != 64:
        return False
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    # CometBFT rejects high-S (malleable) signatures; so does libsecp256k1, but be explicit.
    if not (0 < r < SECP256K1_N and 0 < s <= _SECP256K1_HALF_N):
        return False
    try:
        return bool(pk.verify(cdata_to_der(deserialize_compact(bytes(sig))), msg))
    except ValueError:
        return False


def bls_keygen(ikm: bytes, key_info: bytes = b"") -> int:
    """IETF BLS KeyGen (draft-irtf-cfrg-bls-signature-05 §2.3): the secret scalar.

    The same function as blst ``blst_keygen`` and py_ecc ``G2Basic.KeyGen`` (and as
    EIP-2333 ``HKDF_mod_r``).
    """
    if len(ikm) < 32:
        raise KeyFileError("BLS KeyGen needs at least 32 bytes of input key material")
    length = 48  # L = ceil(3 * ceil(log2(r)) / 16)
    salt = b"BLS-SIG-KEYGEN-SALT-"
    sk = 0
    while sk == 0:
        salt = hashlib.sha256(salt).digest()
        prk = hmac.digest(salt, bytes(ikm) + b"\x00", "sha256")  # HKDF-Extract
        info = bytes(key_info) + length.to_bytes(2, "big")
        okm = b""
        block = b""
        counter = 1
        while len(okm) < length:  # HKDF-Expand
            block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
            okm += block
            counter += 1
        sk = int.from_bytes(okm[:length], "big") % BLS_R
    return sk


# ---------------------------------------------------------------------------------------
# Construction, addresses, verification by public key
# ---------------------------------------------------------------------------------------


def address_of(key_type: str, public_key: bytes) -> bytes:
    """The 20-byte CometBFT address of a public key (§7.1 to 7.3)."""
    kt = canonical_key_type(key_type)
    size = _PUBLIC_KEY_SIZES[kt]
    if len(public_key) != size:
        raise KeyFileError(f"a {kt} public key is {size} bytes, got {len(public_key)}")
    digest = hashlib.sha256(public_key).digest()
    if kt == "secp256k1":
        return ripemd160(digest)
    return digest[:20]


def generate(key_type: str, *, bls_dst: bytes = BLS_DEFAULT_DST) -> SigningKey:
    """A fresh random key of ``key_type``."""
    kt = canonical_key_type(key_type)
    if kt == "ed25519":
        return Ed25519Key.generate()
    if kt == "secp256k1":
        return Secp256k1Key.generate()
    return Bls12381Key.generate(dst=bls_dst)


def from_secret(key_type: str, secret: bytes, *, bls_dst: bytes = BLS_DEFAULT_DST) -> SigningKey:
    """The key of ``key_type`` whose 32-byte secret (as in the native key file) is ``secret``."""
    kt = canonical_key_type(key_type)
    if kt == "ed25519":
        return Ed25519Key(secret)
    if kt == "secp256k1":
        return Secp256k1Key(secret)
    return Bls12381Key(secret, dst=bls_dst)


def signature_verifier(
    key_type: str, public_key: bytes, *, bls_dst: bytes = BLS_DEFAULT_DST
) -> Callable[[bytes, bytes], bool]:
    """A ``verify(msg, sig) -> bool`` for one bare public key, parsed and checked once.

    For backends whose key lives elsewhere (Vault): every signature they return is
    checked with this before it is used. Raises :class:`KeyFileError` if the public key
    is malformed (wrong length, not on the curve, the BLS point at infinity).
    """
    kt = canonical_key_type(key_type)
    pub = bytes(public_key)
    if kt == "ed25519":
        if len(pub) != 32:
            raise KeyFileError(f"an ed25519 public key is 32 bytes, got {len(pub)}")
        return lambda msg, sig: _ed25519_verify(pub, msg, sig)
    if kt == "secp256k1":
        if len(pub) != 33:
            raise KeyFileError(f"a secp256k1 public key is 33 bytes, got {len(pub)}")
        try:
            pk = coincurve.PublicKey(pub)
        except ValueError as exc:
            raise KeyFileError(f"invalid secp256k1 public key: {exc}") from None
        return lambda msg, sig: _secp256k1_verify(pk, msg, sig)
    point = _bls_public_point(pub)
    dst = bytes(bls_dst)
    return lambda msg, sig: _bls_verify(point, msg, sig, dst)


def verify_signature(
    key_type: str,
    public_key: bytes,
    msg: bytes,
    sig: bytes,
    *,
    bls_dst: bytes = BLS_DEFAULT_DST,
) -> bool:
    """Verify ``sig`` over ``msg`` with a bare public key, as CometBFT would.

    Raises :class:`KeyFileError` if the public key itself is malformed; returns False
    for any bad signature.
    """
    kt = canonical_key_type(key_type)
    if kt == "ed25519":
        if len(public_key) != 32:
            raise KeyFileError(f"an ed25519 public key is 32 bytes, got {len(public_key)}")
        return _ed25519_verify(bytes(public_key), msg, sig)
    if kt == "secp256k1":
        try:
            pk = coincurve.PublicKey(bytes(public_key))
        except ValueError as exc:
            raise KeyFileError(f"invalid secp256k1 public key: {exc}") from None
        return _secp256k1_verify(pk, msg, sig)
    return _bls_verify(_bls_public_point(bytes(public_key)), msg, sig, bls_dst)


# ---------------------------------------------------------------------------------------
# JSON (Amino-compatible, §7.5)
# ---------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class HasPublicKey(Protocol):
    """Anything with a key type and a public key: a SigningKey, a Backend."""

    key_type: str
    public_key: bytes


def pubkey_json(key: HasPublicKey) -> dict[str, str]:
    """CometBFT JSON of the public key: ``{"type": ..., "value": <base64>}``."""
    return {"type": _JSON_NAMES[key.key_type][0], "value": _b64(key.public_key)}


def _priv_value(key: SigningKey) -> bytes:
    if key.key_type == "ed25519":
        return key.secret_bytes() + key.public_key  # Go's 64-byte seed || pub
    return key.secret_bytes()


def priv_validator_key_json(key: SigningKey) -> dict[str, Any]:
    """The content of a CometBFT ``priv_validator_key.json`` for ``key``."""
    return {
        "address": key.address.hex().upper(),
        "pub_key": pubkey_json(key),
        "priv_key": {"type": _JSON_NAMES[key.key_type][1], "value": _b64(_priv_value(key))},
    }


def _strict_b64(text: Any, what: str, path: str) -> bytes:
    if not isinstance(text, str):
        raise KeyFileError(f"{path}: {what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{path}: {what} is not valid base64") from None


def load_priv_validator_key_json(
    path: str | os.PathLike[str],
    *,
    bls_dst: bytes = BLS_DEFAULT_DST,
    check_permissions: bool = True,
) -> SigningKey:
    """Load a CometBFT ``priv_validator_key.json``.

    The key comes from ``priv_key``; ``pub_key`` and ``address``, when present, must
    match what the private key gives (CometBFT itself silently recomputes them; a
    mismatch here means a hand-edited or corrupted file, so we refuse it).
    """
    p = os.fspath(path)
    raw = read_private_file(p, what="priv_validator_key.json", check_permissions=check_permissions)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # (JSONDecodeError, int()'s digit limit)
        raise KeyFileError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"{p}: expected a JSON object")
    priv = doc.get("priv_key")
    if not isinstance(priv, dict) or "type" not in priv or "value" not in priv:
        raise KeyFileError(f'{p}: missing "priv_key": {{"type": ..., "value": ...}}')
    kt = _TYPE_BY_PRIV_NAME.get(priv["type"])
    if kt is None:
        known = ", ".join(sorted(_TYPE_BY_PRIV_NAME))
        raise KeyFileError(f"{p}: unsupported priv_key type {priv['type']!r} (known: {known})")
    value = _strict_b64(priv["value"], "priv_key.value", p)
    try:
        if kt == "ed25519":
            if len(value) != 64:
                raise KeyFileError(f"an ed25519 priv_key value is 64 bytes, got {len(value)}")
            key: SigningKey = Ed25519Key(value[:32])
            if value[32:] != key.public_key:
                raise KeyFileError(
                    "the ed25519 priv_key value's second half (the public key) does not "
                    "match its seed"
                )
        else:
            key = from_secret(kt, value, bls_dst=bls_dst)
    except KeyFileError as exc:
        raise KeyFileError(f"{p}: {exc}") from None

    pub = doc.get("pub_key")
    if pub is not None:
        want_type = _JSON_NAMES[kt][0]
        if not isinstance(pub, dict) or pub.get("type") != want_type:
            got = pub.get("type") if isinstance(pub, dict) else pub
            raise KeyFileError(f"{p}: pub_key type is {got!r}, expected {want_type!r}")
        pub_bytes = _strict_b64(pub.get("value"), "pub_key.value", p)
        ok = pub_bytes == key.public_key or (
            isinstance(key, Bls12381Key) and pub_bytes == key.public_key_compressed
        )
        if not ok:
            raise KeyFileError(
                f"{p}: pub_key does not match the private key "
                f"(file has {pub_bytes.hex()}, the key gives {key.public_key.hex()})"
            )
    addr = doc.get("address")
    if addr is not None:
        try:
            addr_bytes = bytes.fromhex(addr) if isinstance(addr, str) else None
        except ValueError:
            addr_bytes = None
        if addr_bytes != key.address:
            raise KeyFileError(
                f"{p}: address {addr!r} does not match the private key "
                f"(expected {key.address.hex().upper()})"
            )
    return key


def write_priv_validator_key_json(
    path: str | os.PathLike[str], key: SigningKey, *, overwrite: bool = False
) -> None:
    """Write ``priv_validator_key.json`` for ``key`` (mode 0600, atomically)."""
    text = json.dumps(priv_validator_key_json(key), indent=2) + "\n"
    write_private_file(path, text.encode("ascii"), overwrite=overwrite)


# ---------------------------------------------------------------------------------------
# Private files: the native key file, permission checks, atomic 0600 writes
# ---------------------------------------------------------------------------------------

_MAX_PRIVATE_FILE = 1 << 20


def _check_mode(path: str, st: os.stat_result, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{what} {path} is accessible by group or others (mode {mode:04o}); "
            f"it holds a secret: run `chmod 600 {path}`"
        )


def check_private_file(path: str | os.PathLike[str], *, what: str = "secret file") -> None:
    """Refuse a secret file that is missing, not a regular file, or group/world accessible."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    _check_mode(p, st, what)


def read_private_file(
    path: str | os.PathLike[str], *, what: str = "secret file", check_permissions: bool = True
) -> bytes:
    """The bytes of a secret file, after checking its mode on the open descriptor.

    Used for key files, the Raft cluster secret and Vault token files. Raises
    :class:`KeyFileError` naming ``path`` for every problem.
    """
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if check_permissions:
            _check_mode(p, st, what)
        elif not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {p} is not a regular file")
        if st.st_size > _MAX_PRIVATE_FILE:
            raise KeyFileError(f"{what} {p} is too large ({st.st_size} bytes)")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise KeyFileError(f"{what} {p} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def write_private_file(
    path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False, mode: int = 0o600
) -> None:
    """Create ``path`` with ``data``, mode 0600, atomically and durably.

    :func:`nebula.durable.write_file_durably`: a fresh temporary file (O_EXCL, 0600,
    fsync'ed) hard-linked to ``path`` (which fails if ``path`` exists) or, with
    ``overwrite=True``, renamed over it. Readers never see a partial file.  ``mode``: for
    the rare public file written the same way (e.g. 0o644: a DKG member's public file).
    """
    p = os.fspath(path)
    if not overwrite and os.path.lexists(p):
        raise KeyFileError(f"{p} already exists; refusing to overwrite it")
    try:
        write_file_durably(p, data, mode, overwrite=overwrite)
    except FileExistsError:
        raise KeyFileError(f"{p} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write {p}: {exc.strerror or exc}") from None


def load_key_file(
    path: str | os.PathLike[str],
    key_type: str,
    *,
    bls_dst: bytes = BLS_DEFAULT_DST,
    check_permissions: bool = True,
) -> SigningKey:
    """Load the native key file: base64 of the 32-byte secret (whitespace is ignored)."""
    kt = canonical_key_type(key_type)
    p = os.fspath(path)
    raw = read_private_file(p, what="key file", check_permissions=check_permissions)
    compact = b"".join(raw.split())
    if not compact:
        raise KeyFileError(f"key file {p} is empty")
    try:
        secret = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"key file {p} is not valid base64") from None
    if len(secret) != SECRET_SIZE:
        raise KeyFileError(
            f"key file {p} holds {len(secret)} bytes; a {kt} secret is {SECRET_SIZE} bytes"
        )
    try:
        return from_secret(kt, secret, bls_dst=bls_dst)
    except KeyFileError as exc:
        raise KeyFileError(f"key file {p}: {exc}") from None


def write_key_file(
    path: str | os.PathLike[str], key: SigningKey, *, overwrite: bool = False
) -> None:
    """Write the native key file for ``key``: base64 of its secret and a newline, 0600."""
    write_private_file(path, _b64(key.secret_bytes()).encode("ascii") + b"\n", overwrite=overwrite)
