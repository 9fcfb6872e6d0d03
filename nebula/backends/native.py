"""The in-process backend: the key is in memory (from a key file or priv_validator_key.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from nebula.backends.base import Backend
from nebula.crypto.keys import SigningKey
from nebula.types import Signed

if TYPE_CHECKING:
    from nebula.crypto.signworker import Ed25519WorkerKey, SignWorker


class NativeBackend(Backend):
    """Signs with a :class:`~nebula.crypto.keys.SigningKey` held in this process."""

    __slots__ = ("_key", "_sign", "_worker", "_worker_key", "key_type", "public_key")
    inline: ClassVar[bool] = True

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self._sign = key.sign
        self.key_type = key.key_type
        self.public_key = key.public_key
        self._worker: SignWorker | None = None
        self._worker_key: Ed25519WorkerKey | None = None

    def use_worker(self, worker: SignWorker) -> bool:
        """Sign on ``worker``'s thread from now on (nebula.crypto.signworker).  An Ed25519
        key only: False for the others, which keep signing on the loop."""
        if self.key_type != "ed25519":
            return False
        self._worker_key = worker.key(self._key.secret_bytes())
        self._worker = worker
        return True

    @property
    def address(self) -> bytes:
        return self._key.address

    @property
    def key(self) -> SigningKey:
        return self._key

    def verify(self, msg: bytes, sig: bytes) -> bool:
        return self._key.verify(msg, sig)  # (the key's own BLS DST)

    def sign_sync(self, msg: bytes) -> bytes:
        return self._sign(msg)

    async def sign(self, msg: bytes) -> bytes:
        return self._sign(msg)

    def signs_later(self) -> bool:
        worker = self._worker
        return worker is not None and worker.alive

    def sign_later(
        self,
        msgs: tuple[bytes, ...],
        done: Signed,
    ) -> None:
        worker, key = self._worker, self._worker_key
        if worker is None or key is None:
            raise NotImplementedError("no signing worker")
        worker.sign(key, msgs, done)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<NativeBackend {self.key_type} address={self._key.address.hex().upper()}>"
