"""Signing through the Vault signer plugin of the Rust Nebula (ed25519, secp256k1, BLS).

The plugin's HTTP API, as this backend speaks it:

* ``GET /v1/<mount>/keys/<key>?compressed=true`` with ``X-Vault-Token`` ->
  ``{"data": {"key_type": "ed25519" | "secp256k1" | "bls12381",
  "public_key": "<hex>"}}`` — 32, 33 (compressed SEC1) or 96 (uncompressed G1) bytes;
* ``POST /v1/<mount>/keys/<key>/sign`` with ``{"payload": "<base64 sign bytes>"}``, plus
  ``"dst": "<BLS domain separation tag>"`` for BLS keys ->
  ``{"data": {"signature": "vault:v<N>:<base64>"}}`` — 64, 64 or 96 bytes;
* errors: a non-2xx status with Vault's ``{"errors": [...]}``.

As for transit: the key is read and checked at start (its type must be one the
configured CometBFT line accepts, and the public key must parse), a self-test message
is signed and verified, and every signature is verified with the public key read at
start before it is used (for BLS also proving the plugin used the configured DST).
"""

from __future__ import annotations

import binascii
import json
import logging
import os
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
from nebula.backends.vault_transit import SELF_TEST_PREFIX
from nebula.crypto.keys import BLS_DEFAULT_DST, secp256k1_low_s, signature_verifier
from nebula.errors import BackendError, KeyFileError

log = logging.getLogger("nebula.vault")

__all__ = ["PUBLIC_KEY_SIZES", "SIGNATURE_SIZES", "VaultSignerPluginBackend", "read_plugin_key"]

PUBLIC_KEY_SIZES = {"ed25519": 32, "secp256k1": 33, "bls12381": 96}
SIGNATURE_SIZES = {"ed25519": 64, "secp256k1": 64, "bls12381": 96}


class _SignData(msgspec.Struct):
    signature: str


class _SignAnswer(msgspec.Struct):
    data: _SignData


_sign_decoder = msgspec.json.Decoder(_SignAnswer)


def read_plugin_key(s: VaultSettings, client: Any | None = None) -> tuple[str, bytes]:
    """(key type as the plugin names it, public key bytes) of the plugin key of ``s``."""
    c = client or hvac_client(s)
    what = f"reading signer plugin key {s.mount}/{s.key_name}"
    resp = hvac_call(
        what, s, lambda: c.adapter.get(s.path("keys", s.key_name), params={"compressed": "true"})
    )
    try:
        d = resp["data"]
        kt = d["key_type"]
        pub_hex = d["public_key"]
        if not isinstance(kt, str) or not isinstance(pub_hex, str):
            raise TypeError("key_type and public_key must be strings")
        return kt, bytes.fromhex(pub_hex)
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendError(f"{what}: unexpected answer from {s.address}: {exc!r}") from None


class VaultSignerPluginBackend(Backend):
    """A consensus key held by the Rust Nebula's Vault signer plugin."""

    def __init__(
        self,
        settings: VaultSettings,
        key_type: str,
        public_key: bytes,
        *,
        bls_dst: bytes = BLS_DEFAULT_DST,
    ) -> None:
        want = PUBLIC_KEY_SIZES.get(key_type)
        if want is None:
            raise BackendError(f"unknown key type {key_type!r}")
        if len(public_key) != want:
            raise BackendError(
                f"the plugin says {key_type} but the public key is {len(public_key)} bytes "
                f"(a {key_type} public key is {want})"
            )
        try:
            self._verify = signature_verifier(key_type, public_key, bls_dst=bls_dst)
        except KeyFileError as exc:
            raise BackendError(f"the plugin's {key_type} public key is invalid: {exc}") from None
        self.settings = settings
        self.key_type = key_type
        self.public_key = bytes(public_key)
        self.bls_dst = bytes(bls_dst)
        self._sig_size = SIGNATURE_SIZES[key_type]
        self._http = AsyncVaultHTTP(settings, ssl_context(settings))
        self._sign_path = settings.path("keys", settings.key_name, "sign")
        self._what = f"Vault signer plugin sign ({settings.mount}/{settings.key_name})"
        if key_type == "bls12381":
            self._body_tail = b'","dst":' + json.dumps(self.bls_dst.decode("ascii")).encode() + b"}"
        else:
            self._body_tail = b'"}'

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        s: VaultSettings,
        *,
        version: str = "v1_0",
        bls_dst: bytes = BLS_DEFAULT_DST,
        self_test: bool = True,
    ) -> VaultSignerPluginBackend:
        """Read and check the plugin key of ``s`` (blocking, bounded by ``s.timeout``)."""
        where = f"signer plugin key {s.mount}/{s.key_name} at {s.address}"
        client = hvac_client(s)
        name, public_key = read_plugin_key(s, client)
        kt = check_key_type_for_version(name, version, where)
        try:
            backend = cls(s, kt, public_key, bls_dst=bls_dst)
        except BackendError as exc:
            raise BackendError(f"{where}: {exc}") from None
        if self_test:
            backend.self_test(client)
            warn_if_token_expires(s, client)
        log.info(
            "vault signer plugin %s: %s key, address %s",
            where,
            kt,
            backend.address.hex().upper(),
        )
        return backend

    def _body(self, msg: bytes) -> bytes:
        return b'{"payload":"' + binascii.b2a_base64(msg, newline=False) + self._body_tail

    def self_test(self, client: Any | None = None) -> None:
        """Sign a random non-consensus message synchronously and verify it."""
        s = self.settings
        c = client or hvac_client(s)
        msg = SELF_TEST_PREFIX + os.urandom(16)
        what = f"self-test signature with signer plugin key {s.mount}/{s.key_name}"
        payload = json.loads(self._body(msg))
        resp = hvac_call(what, s, lambda: c.adapter.post(self._sign_path, json=payload))
        try:
            text = resp["data"]["signature"]
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, TypeError):
            raise BackendError(f"{what}: no signature in the plugin's answer") from None
        self._check(msg, text, what)

    # ---- signing ---------------------------------------------------------------------

    def _check(self, msg: bytes, text: str, what: str) -> bytes:
        _, sig = parse_vault_signature(text, self._sig_size, what)
        if self.key_type == "secp256k1":
            # A high-S signature is as valid for ECDSA, but CometBFT accepts only the
            # low-S form: made low, as the PKCS#11 backend does (it used to be refused as
            # "does not verify", found in review).
            try:
                sig = secp256k1_low_s(sig)
            except ValueError as exc:
                raise BackendError(f"{what}: {exc}; refusing to use it") from None
        if not self._verify(msg, sig):
            hint = " (or the plugin used another BLS DST)" if self.key_type == "bls12381" else ""
            raise BackendError(
                f"{what}: the signature does not verify under the public key read at "
                f"start{hint}; refusing to use it"
            )
        return sig

    async def sign(self, msg: bytes) -> bytes:
        status, data = await self._http.request(
            "POST", self._sign_path, self._body(msg), what=self._what
        )
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
            f"<VaultSignerPluginBackend {s.address} {s.mount}/{s.key_name} {self.key_type} "
            f"address={self.address.hex().upper()}>"
        )
