"""Signing through the transit engine of HashiCorp Vault / OpenBao (Ed25519 only).

The key never leaves Vault. At start (synchronously, when the daemon builds the
backend) Nebula reads the transit key with hvac and refuses anything but a signing
``ed25519`` key that the configured CometBFT line accepts; it pins the key version it
read (a later rotation in Vault cannot silently change the validator's public key)
and signs a self-test message, which proves the token may sign and the whole path
works before the first vote.

Every signature (``POST /v1/<mount>/sign/<key>`` with the pinned ``key_version``)
is verified with the public key read at start (~40 µs) before it is used. The request
runs on the event loop through :class:`~nebula.backends._vault_common.AsyncVaultHTTP`
and is bounded as a whole by ``timeout``: a revoked token, a dead or slow server end
in a :class:`~nebula.errors.BackendError` within the timeout, and the signing lock is
released.

Also here, for ``nebula vault``: creating a transit key, and importing an existing
Ed25519 key (BYOK: ``transit/wrapping_key``, RSA-OAEP-SHA256 + AES-KWP of the PKCS#8
key, ``POST transit/keys/<name>/import``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass
from typing import Any

import msgspec

from nebula.backends._vault_common import (
    AsyncVaultHTTP,
    VaultSettings,
    check_key_type_for_version,
    hvac_call,
    hvac_client,
    parse_vault_signature,
    ssl_context,
    vault_error_text,
    warn_if_token_expires,
)
from nebula.backends.base import Backend
from nebula.crypto.keys import Ed25519Key, signature_verifier
from nebula.errors import BackendError, KeyFileError

log = logging.getLogger("nebula.vault")

__all__ = [
    "SELF_TEST_PREFIX",
    "TransitKeyInfo",
    "VaultTransitBackend",
    "create_transit_key",
    "import_transit_key",
    "read_transit_key",
    "wrap_for_import",
]

#: Self-test messages start with a zero byte: as a length prefix that is an empty
#: protobuf message followed by junk, so no CometBFT node can read one as a vote.
SELF_TEST_PREFIX = b"\x00nebula-vault-self-test\x00"


class _SignData(msgspec.Struct):
    signature: str


class _SignAnswer(msgspec.Struct):
    data: _SignData


_sign_decoder = msgspec.json.Decoder(_SignAnswer)


@dataclass(frozen=True, slots=True)
class TransitKeyInfo:
    """What ``GET /v1/<mount>/keys/<name>`` says about a transit key."""

    name: str
    type: str
    latest_version: int
    #: the latest version's public key (raw 32 bytes for ed25519; PEM text otherwise)
    public_key: bytes
    exportable: bool
    imported: bool
    derived: bool
    supports_signing: bool


def read_transit_key(s: VaultSettings, client: Any | None = None) -> TransitKeyInfo:
    """Read the transit key of ``s`` (BackendError if missing, denied or unreachable)."""
    info = _read_transit_key(s, client, missing_ok=False)
    if info is None:  # unreachable with missing_ok=False; keeps the type exact
        raise BackendError(f"transit key {s.mount}/{s.key_name} does not exist")
    return info


def _read_transit_key(
    s: VaultSettings, client: Any | None, *, missing_ok: bool
) -> TransitKeyInfo | None:
    import hvac.exceptions

    c = client or hvac_client(s)
    what = f"reading transit key {s.mount}/{s.key_name}"

    def read() -> Any:
        try:
            return c.secrets.transit.read_key(name=s.key_name, mount_point=s.mount)
        except hvac.exceptions.InvalidPath:
            if missing_ok:
                return None
            raise

    resp = hvac_call(what, s, read)
    if resp is None:
        return None
    try:
        d = resp["data"]
        latest = int(d["latest_version"])
        entry = d["keys"][str(latest)]
        kt = str(d["type"])
        pub_text = entry["public_key"] if isinstance(entry, dict) else ""
        if kt == "ed25519":
            public_key = binascii.a2b_base64(pub_text, strict_mode=True)
        else:
            public_key = str(pub_text).encode()
        return TransitKeyInfo(
            name=str(d.get("name", s.key_name)),
            type=kt,
            latest_version=latest,
            public_key=public_key,
            exportable=bool(d.get("exportable", False)),
            imported=bool(d.get("imported_key", False)),
            derived=bool(d.get("derived", False)),
            supports_signing=bool(d.get("supports_signing", False)),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BackendError(f"{what}: unexpected answer from {s.address}: {exc!r}") from None


def create_transit_key(s: VaultSettings, *, exportable: bool = False) -> TransitKeyInfo:
    """Create a new ed25519 transit key; refuses if a key of that name exists."""
    c = hvac_client(s)
    existing = _read_transit_key(s, c, missing_ok=True)
    if existing is not None:
        raise BackendError(
            f"transit key {s.mount}/{s.key_name} already exists ({existing.type}, "
            f"version {existing.latest_version}); refusing to touch it"
        )
    hvac_call(
        f"creating transit key {s.mount}/{s.key_name}",
        s,
        lambda: c.secrets.transit.create_key(
            name=s.key_name, key_type="ed25519", exportable=exportable, mount_point=s.mount
        ),
    )
    return read_transit_key(s, c)


def wrap_for_import(wrapping_key_pem: str | bytes, pkcs8_der: bytes) -> str:
    """Transit BYOK ciphertext: RSA-OAEP-SHA256(ephemeral AES-256 key) || AES-KWP(key).

    ``wrapping_key_pem`` is the RSA public key of ``GET transit/wrapping_key``;
    ``pkcs8_der`` the private key in PKCS#8 DER. Returns the base64 ``ciphertext`` for
    ``POST transit/keys/<name>/import`` (with ``hash_function = "SHA256"``).
    """
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

    pem = wrapping_key_pem.encode() if isinstance(wrapping_key_pem, str) else wrapping_key_pem
    try:
        wrapping_key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise BackendError(f"the transit wrapping key is not a PEM public key: {exc}") from None
    if not isinstance(wrapping_key, rsa.RSAPublicKey):
        raise BackendError("the transit wrapping key is not an RSA key")
    ephemeral = os.urandom(32)
    wrapped_ephemeral = wrapping_key.encrypt(
        ephemeral,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
    )
    wrapped_key = aes_key_wrap_with_padding(ephemeral, pkcs8_der)
    return base64.b64encode(wrapped_ephemeral + wrapped_key).decode("ascii")


def _ed25519_pkcs8(key: Ed25519Key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(key.secret_bytes()).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def import_transit_key(s: VaultSettings, key: Ed25519Key) -> TransitKeyInfo:
    """Import an existing Ed25519 consensus key into transit as ``s.key_name``.

    Not exportable, no plaintext backup. Refuses if the name exists; afterwards checks
    that Vault's public key is the key's own.
    """
    if not isinstance(key, Ed25519Key):
        raise KeyFileError(
            f"transit can only hold ed25519 consensus keys, this is a {key.key_type} key "
            "(use the signer plugin or the native backend)"
        )
    c = hvac_client(s)
    existing = _read_transit_key(s, c, missing_ok=True)
    if existing is not None:
        raise BackendError(
            f"transit key {s.mount}/{s.key_name} already exists ({existing.type}, "
            f"version {existing.latest_version}); choose another key_name"
        )
    what = f"importing into transit key {s.mount}/{s.key_name}"
    wrapping = hvac_call(what, s, lambda: c.adapter.get(f"/v1/{s.mount}/wrapping_key"))
    try:
        pem = wrapping["data"]["public_key"]
    except (KeyError, TypeError):
        raise BackendError(f"{what}: no wrapping key in Vault's answer") from None
    ciphertext = wrap_for_import(pem, _ed25519_pkcs8(key))
    hvac_call(
        what,
        s,
        lambda: c.adapter.post(
            s.path("keys", s.key_name, "import"),
            json={
                "ciphertext": ciphertext,
                "type": "ed25519",
                "hash_function": "SHA256",
                "exportable": False,
                "allow_plaintext_backup": False,
            },
        ),
    )
    info = read_transit_key(s, c)
    if info.type != "ed25519" or info.public_key != key.public_key:
        raise BackendError(
            f"{what}: Vault now holds a different public key ({info.public_key.hex()}) "
            f"than the imported key ({key.public_key.hex()})"
        )
    return info


class VaultTransitBackend(Backend):
    """An ed25519 consensus key in a Vault / OpenBao transit engine."""

    key_type = "ed25519"

    def __init__(self, settings: VaultSettings, public_key: bytes, key_version: int) -> None:
        if len(public_key) != 32:
            raise BackendError(f"an ed25519 public key is 32 bytes, got {len(public_key)}")
        self.settings = settings
        self.public_key = bytes(public_key)
        self.key_version = int(key_version)
        self._verify = signature_verifier("ed25519", self.public_key)
        self._http = AsyncVaultHTTP(settings, ssl_context(settings))
        self._sign_path = settings.path("sign", settings.key_name)
        self._what = f"Vault transit sign ({settings.mount}/{settings.key_name})"
        self._body_tail = b'","key_version":%d}' % self.key_version

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def connect(
        cls, s: VaultSettings, *, version: str = "v1_0", self_test: bool = True
    ) -> VaultTransitBackend:
        """Read and check the transit key of ``s`` (blocking, bounded by ``s.timeout``)."""
        where = f"transit key {s.mount}/{s.key_name} at {s.address}"
        client = hvac_client(s)
        info = read_transit_key(s, client)
        if info.type != "ed25519":
            raise BackendError(
                f"{where} is of type {info.type!r}; Nebula needs an 'ed25519' key, the only "
                "CometBFT consensus key type transit offers"
            )
        check_key_type_for_version("ed25519", version, where)
        if info.derived:
            raise BackendError(f"{where} is a derived key; consensus keys cannot use derivation")
        if not info.supports_signing:
            raise BackendError(f"{where} does not support signing")
        if info.exportable:
            log.warning("%s is exportable: its private key can leave Vault", where)
        backend = cls(s, info.public_key, info.latest_version)
        if self_test:
            backend.self_test(client)
            warn_if_token_expires(s, client)
        log.info(
            "vault transit key %s version %d (address %s)",
            where,
            backend.key_version,
            backend.address.hex().upper(),
        )
        return backend

    def self_test(self, client: Any | None = None) -> None:
        """Sign a random non-consensus message synchronously and verify it."""
        s = self.settings
        c = client or hvac_client(s)
        msg = SELF_TEST_PREFIX + os.urandom(16)
        what = f"self-test signature with transit key {s.mount}/{s.key_name}"
        resp = hvac_call(
            what,
            s,
            lambda: c.secrets.transit.sign_data(
                name=s.key_name,
                hash_input=base64.b64encode(msg).decode("ascii"),
                key_version=self.key_version,
                mount_point=s.mount,
            ),
        )
        try:
            text = resp["data"]["signature"]
        except (KeyError, TypeError):
            raise BackendError(f"{what}: no signature in Vault's answer") from None
        self._check(msg, text, what)

    # ---- signing ---------------------------------------------------------------------

    def _check(self, msg: bytes, text: str, what: str) -> bytes:
        version, sig = parse_vault_signature(text, 64, what)
        if version != self.key_version:
            raise BackendError(
                f"{what}: Vault signed with key version {version}, not the pinned "
                f"version {self.key_version}"
            )
        if not self._verify(msg, sig):
            raise BackendError(
                f"{what}: the signature does not verify under the public key read at "
                f"start ({self.public_key.hex()}); refusing to use it"
            )
        return sig

    async def sign(self, msg: bytes) -> bytes:
        body = b'{"input":"' + binascii.b2a_base64(msg, newline=False) + self._body_tail
        status, data = await self._http.request("POST", self._sign_path, body, what=self._what)
        if status != 200:
            raise BackendError(f"{self._what}: {vault_error_text(status, data)}")
        try:
            text = _sign_decoder.decode(data).data.signature
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            # RecursionError: JSON nested past msgspec's depth limit (found in review)
            raise BackendError(f"{self._what}: unexpected answer: {exc}") from None
        return self._check(msg, text, self._what)

    async def close(self) -> None:
        await self._http.close()

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"<VaultTransitBackend {s.address} {s.mount}/{s.key_name} v{self.key_version} "
            f"address={self.address.hex().upper()}>"
        )
