"""SecretConnection frame AEAD (protocol.md §6.2), pure-Python twin of ``_frame.pyx``.

A sealed frame is ChaCha20-Poly1305 (IETF, no associated data) over 1028 plaintext bytes:
a 4-byte little-endian chunk length (0..1024), the chunk, and zero padding.  The nonce is
4 zero bytes followed by the little-endian 64-bit frame counter of that direction, which
starts at 0 and goes up by one per frame.  The counter never wraps: the value 2**64 - 1
is refused, on both sides.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from nebula.errors import AuthenticationError, FrameError, ProtocolError

__all__ = [
    "DATA_MAX_SIZE",
    "KEY_SIZE",
    "NONCE_LIMIT",
    "SEALED_FRAME_SIZE",
    "FrameOpener",
    "FrameSealer",
]

DATA_MAX_SIZE = 1024  # chunk bytes per frame
KEY_SIZE = 32
TAG_SIZE = 16
LENGTH_SIZE = 4
TOTAL_FRAME_SIZE = LENGTH_SIZE + DATA_MAX_SIZE  # 1028 plaintext bytes
SEALED_FRAME_SIZE = TOTAL_FRAME_SIZE + TAG_SIZE  # 1044 bytes on the wire
NONCE_LIMIT = (1 << 64) - 1  # first counter value that is never used

_NONCE_PREFIX = bytes(4)


def _check_key(key: bytes) -> bytes:
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise ValueError(f"SecretConnection key must be {KEY_SIZE} bytes, got {len(key)}")
    return key


def _check_start(nonce: int) -> int:
    if not 0 <= nonce <= NONCE_LIMIT:
        raise ValueError(f"nonce counter must be in [0, 2**64 - 1], got {nonce}")
    return nonce


def _nonce_bytes(counter: int) -> bytes:
    return _NONCE_PREFIX + counter.to_bytes(8, "little")


class FrameSealer:
    """Seals outgoing data into 1044-byte frames with its own nonce counter."""

    __slots__ = ("_aead", "_nonce")

    def __init__(self, key: bytes, nonce: int = 0) -> None:
        self._aead = ChaCha20Poly1305(_check_key(key))
        self._nonce = _check_start(nonce)

    @property
    def nonce(self) -> int:
        """The counter of the next frame to seal."""
        return self._nonce

    def seal(self, data: bytes) -> bytes:
        """Split ``data`` into chunks of at most 1024 bytes and seal one frame per chunk."""
        size = len(data)
        if size == 0:
            return b""
        frames = (size + DATA_MAX_SIZE - 1) // DATA_MAX_SIZE
        if self._nonce + frames > NONCE_LIMIT:
            raise ProtocolError("SecretConnection send nonce exhausted; the connection must close")
        out = []
        for offset in range(0, size, DATA_MAX_SIZE):
            chunk = bytes(data[offset : offset + DATA_MAX_SIZE])
            plaintext = (
                len(chunk).to_bytes(LENGTH_SIZE, "little")
                + chunk
                + bytes(DATA_MAX_SIZE - len(chunk))
            )
            out.append(self._aead.encrypt(_nonce_bytes(self._nonce), plaintext, None))
            self._nonce += 1
        return b"".join(out)


class FrameOpener:
    """Opens incoming 1044-byte frames with its own nonce counter."""

    __slots__ = ("_aead", "_nonce")

    def __init__(self, key: bytes, nonce: int = 0) -> None:
        self._aead = ChaCha20Poly1305(_check_key(key))
        self._nonce = _check_start(nonce)

    @property
    def nonce(self) -> int:
        """The counter of the next frame to open."""
        return self._nonce

    def open(self, frame: bytes) -> bytes:
        """Authenticate and decrypt one sealed frame; return its chunk.

        A frame that fails authentication leaves the counter where it was; a frame that
        authenticates consumes its counter even if its length field is then refused.
        """
        if len(frame) != SEALED_FRAME_SIZE:
            raise FrameError(
                f"sealed SecretConnection frame must be {SEALED_FRAME_SIZE} bytes, got {len(frame)}"
            )
        if self._nonce >= NONCE_LIMIT:
            raise ProtocolError(
                "SecretConnection receive nonce exhausted; the connection must close"
            )
        try:
            plaintext = self._aead.decrypt(_nonce_bytes(self._nonce), frame, None)
        except InvalidTag:
            raise AuthenticationError(
                f"failed to decrypt SecretConnection frame {self._nonce} (wrong MAC)"
            ) from None
        self._nonce += 1
        length = int.from_bytes(plaintext[:LENGTH_SIZE], "little")
        if length > DATA_MAX_SIZE:
            raise FrameError(
                f"SecretConnection chunk length {length} is greater than {DATA_MAX_SIZE}"
            )
        return plaintext[LENGTH_SIZE : LENGTH_SIZE + length]
