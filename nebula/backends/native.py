"""The in-process backend: the key is in memory (from a key file or priv_validator_key.json)."""

from __future__ import annotations

from typing import ClassVar

from nebula.backends.base import Backend
from nebula.crypto.keys import SigningKey


class NativeBackend(Backend):
    """Signs with a :class:`~nebula.crypto.keys.SigningKey` held in this process."""

    __slots__ = ("_key", "_sign", "key_type", "public_key")
    inline: ClassVar[bool] = True

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self._sign = key.sign
        self.key_type = key.key_type
        self.public_key = key.public_key

    @property
    def address(self) -> bytes:
        return self._key.address

    @property
    def key(self) -> SigningKey:
        return self._key

    def sign_sync(self, msg: bytes) -> bytes:
        return self._sign(msg)

    async def sign(self, msg: bytes) -> bytes:
        return self._sign(msg)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<NativeBackend {self.key_type} address={self._key.address.hex().upper()}>"
