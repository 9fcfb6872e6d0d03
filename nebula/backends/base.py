"""The signing backend interface.

A backend owns one consensus key and turns sign bytes into a signature. The signing
service (which has already passed the double-sign checks) calls ``sign_sync`` first: a
backend that can sign in-process without blocking (the native one) returns the
signature there and costs no ``await`` on the hot path; a backend that must do I/O
(Vault transit, a plugin) returns None, and the service awaits ``sign`` instead.

Backends raise :class:`nebula.errors.BackendError` when they cannot sign.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from nebula.crypto.keys import BLS_DEFAULT_DST, address_of, signature_verifier
from nebula.types import Signed


class Backend(ABC):
    """One consensus key, wherever it lives."""

    #: "ed25519", "secp256k1" or "bls12381" (see nebula.crypto.keys.KEY_TYPES).
    key_type: str
    #: The public key as CometBFT expects it (32 / 33 / 96-byte uncompressed).
    public_key: bytes
    #: True when ``sign_sync`` always answers (the service never awaits ``sign``).
    inline: ClassVar[bool] = False

    @property
    def address(self) -> bytes:
        """The 20-byte CometBFT address of the public key."""
        return address_of(self.key_type, self.public_key)

    @abstractmethod
    async def sign(self, msg: bytes) -> bytes:
        """The signature over ``msg`` (the sign bytes as-is)."""

    def verify(self, msg: bytes, sig: bytes) -> bool:
        """Whether ``sig`` is this key's signature over ``msg`` (for a stored signature
        about to answer a retry).  Made from ``key_type``/``public_key`` (and a
        ``bls_dst`` attribute, if the backend has one) on first use."""
        v = getattr(self, "_verifier", None)
        if v is None:
            v = signature_verifier(
                self.key_type, self.public_key, bls_dst=getattr(self, "bls_dst", BLS_DEFAULT_DST)
            )
            self._verifier = v
        return v(msg, sig)

    def sign_sync(self, msg: bytes) -> bytes | None:
        """The signature, computed without blocking on I/O; None if only ``sign`` can."""
        return None

    def signs_later(self) -> bool:
        """True when this request's signatures should be made off the event loop thread,
        by :meth:`sign_later` (nebula.crypto.signworker); False: ``sign_sync``/``sign``."""
        return False

    def sign_later(
        self,
        msgs: tuple[bytes, ...],
        done: Signed,
    ) -> None:
        """Sign ``msgs`` off the loop thread and call ``done`` on the loop (only after
        :meth:`signs_later` said True)."""
        raise NotImplementedError(f"{type(self).__name__} signs on the loop")

    async def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release connections or other resources; the backend is unusable afterwards."""
