"""CometBFT SecretConnection, sans-I/O (protocol.md §6).

Bytes in, bytes out: nothing here touches a socket, a clock or an event loop.

Handshake (both sides run the same code; there are no initiator/responder roles)::

    hs = Handshake(identity_seed)
    write(hs.initial_bytes())               # our 35-byte ephemeral key, sent at once
    while not hs.done:
        write(hs.receive(read()))           # the sealed AuthSigMessage once keys exist
    session = hs.session()                  # keeps any bytes that came after the handshake
    write(session.seal(b"..."))             # sealed 1044-byte frames
    plaintext = session.feed(read())        # decrypted byte stream, any chunking

Every problem with the peer's bytes raises a :class:`~nebula.errors.ProtocolError`
subclass (``HandshakeError``, ``LowOrderPointError``, ``AuthenticationError``,
``FrameError``); the caller drops the connection.  A Handshake or Session that raised
once refuses further use.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nebula import _fast
from nebula.crypto.merlin import Transcript
from nebula.errors import HandshakeError, LowOrderPointError, ProtocolError

__all__ = [
    "AUTH_SIG_MESSAGE_MAX_SIZE",
    "KEY_MESSAGE_SIZE",
    "LOW_ORDER_POINTS",
    "SEALED_FRAME_SIZE",
    "Handshake",
    "Identity",
    "Session",
    "derive_secrets",
    "node_id",
    "transcript_challenge",
]

_frame = _fast.load("frame")

SEALED_FRAME_SIZE = 1044

# Ephemeral key message: length 34, BytesValue{value(1) = 32 bytes}.
_KEY_MESSAGE_PREFIX = b"\x22\x0a\x20"
KEY_MESSAGE_SIZE = len(_KEY_MESSAGE_PREFIX) + 32

# Our AuthSigMessage: length 101, pub_key(1) = PublicKey{ed25519(1) = 32 bytes}, sig(2) = 64 bytes.
_AUTH_SIG_PREFIX = b"\x66\x0a\x22\x0a\x20"
_AUTH_SIG_SIG_TAG = b"\x12\x40"
# Largest AuthSigMessage body we accept from a peer (an Ed25519 one is 101 bytes).
AUTH_SIG_MESSAGE_MAX_SIZE = 4096

_TRANSCRIPT_LABEL = b"TENDERMINT_SECRET_CONNECTION_TRANSCRIPT_HASH"
_LABEL_LOWER = b"EPHEMERAL_LOWER_PUBLIC_KEY"
_LABEL_UPPER = b"EPHEMERAL_UPPER_PUBLIC_KEY"
_LABEL_DH = b"DH_SECRET"
_LABEL_CHALLENGE = b"SECRET_CONNECTION_MAC"
_HKDF_INFO = b"TENDERMINT_SECRET_CONNECTION_KEY_AND_CHALLENGE_GEN"

# Low-order X25519 points (little-endian u-coordinates), as rejected by tendermint-rs.
# X25519 ignores bit 255, so a key is compared with that bit cleared.
LOW_ORDER_POINTS: frozenset[bytes] = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",  # 0
        "0100000000000000000000000000000000000000000000000000000000000000",  # 1
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",  # order 8
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",  # order 8
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1
    )
)

# PublicKey oneof field numbers (cometbft crypto keys.proto).
_PUBLIC_KEY_TYPES = {1: "ed25519", 2: "secp256k1", 3: "bls12381"}


class FrameSealer(Protocol):
    """What ``nebula._fast.load("frame").FrameSealer`` provides (both twins)."""

    @property
    def nonce(self) -> int: ...

    def seal(self, data: bytes) -> bytes: ...


class FrameOpener(Protocol):
    """What ``nebula._fast.load("frame").FrameOpener`` provides (both twins)."""

    @property
    def nonce(self) -> int: ...

    def open(self, frame: bytes | memoryview) -> bytes: ...


# -- primitives ---------------------------------------------------------------------------


def _x25519_base(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def _x25519(private: bytes, public: bytes) -> bytes:
    """X25519(private, public); a low-order public point raises LowOrderPointError."""
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.RuntimeError:
        # libsodium refuses small-order points and an all-zero result.
        raise LowOrderPointError("bad input point: low order point") from None


def _is_low_order(public: bytes) -> bool:
    return public[:31] + bytes((public[31] & 0x7F,)) in LOW_ORDER_POINTS


def derive_secrets(dh_secret: bytes, loc_is_least: bool) -> tuple[bytes, bytes]:
    """(recv_key, send_key) from the DH secret (§6.1 step 8)."""
    okm = HKDF(algorithm=SHA256(), length=96, salt=None, info=_HKDF_INFO).derive(dh_secret)
    if loc_is_least:
        return okm[0:32], okm[32:64]
    return okm[32:64], okm[0:32]


def transcript_challenge(lo: bytes, hi: bytes, dh_secret: bytes) -> bytes:
    """The 32-byte challenge both sides sign (§6.1 steps 5, 7, 9)."""
    transcript = Transcript(_TRANSCRIPT_LABEL)
    transcript.append_message(_LABEL_LOWER, lo)
    transcript.append_message(_LABEL_UPPER, hi)
    transcript.append_message(_LABEL_DH, dh_secret)
    return transcript.challenge_bytes(_LABEL_CHALLENGE, 32)


def node_id(public_key: bytes) -> str:
    """The CometBFT node ID of an Ed25519 public key: hex(SHA-256(key)[:20])."""
    return hashlib.sha256(public_key).digest()[:20].hex()


class Identity:
    """A long-term Ed25519 identity (build it once, reuse it for every handshake)."""

    __slots__ = ("_secret", "public_key")

    def __init__(self, seed: bytes) -> None:
        seed = bytes(seed)
        if len(seed) != 32:
            raise ValueError(f"Ed25519 identity seed must be 32 bytes, got {len(seed)}")
        self.public_key, self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)

    def sign(self, message: bytes) -> bytes:
        return nacl.bindings.crypto_sign(message, self._secret)[:64]

    def __repr__(self) -> str:
        return f"Identity(public_key={self.public_key.hex()})"


# -- protobuf bits ------------------------------------------------------------------------


def _read_uvarint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None if ``buf`` ends inside the varint."""
    value = 0
    for i in range(10):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value >> 64:
                break
            return value, pos + i + 1
    raise HandshakeError("malformed AuthSigMessage: varint longer than 64 bits")


def _fields(body: bytes, what: str) -> list[tuple[int, int, bytes | int]]:
    """Decode one protobuf message level into (field, wire type, value)."""
    out: list[tuple[int, int, bytes | int]] = []
    pos = 0
    end = len(body)
    while pos < end:
        tag = _read_uvarint(body, pos)
        if tag is None:
            raise HandshakeError(f"malformed {what}: truncated field tag")
        key, pos = tag
        field, wire = key >> 3, key & 7
        if field == 0:
            raise HandshakeError(f"malformed {what}: field number 0")
        if wire == 0:
            varint = _read_uvarint(body, pos)
            if varint is None:
                raise HandshakeError(f"malformed {what}: truncated varint")
            value, pos = varint
            out.append((field, wire, value))
            continue
        if wire == 2:
            length = _read_uvarint(body, pos)
            if length is None:
                raise HandshakeError(f"malformed {what}: truncated length")
            size, pos = length
        elif wire == 1:
            size = 8
        elif wire == 5:
            size = 4
        else:
            raise HandshakeError(f"malformed {what}: unsupported wire type {wire}")
        if pos + size > end:
            raise HandshakeError(f"malformed {what}: field {field} runs past the end")
        out.append((field, wire, bytes(body[pos : pos + size])))
        pos += size
    return out


def _parse_auth_sig(body: bytes) -> tuple[bytes, bytes]:
    """(ed25519 public key, signature) from an AuthSigMessage body."""
    pub_key: bytes | None = None
    sig: bytes | None = None
    for field, wire, value in _fields(body, "AuthSigMessage"):
        if field in (1, 2) and wire != 2:
            raise HandshakeError(f"malformed AuthSigMessage: field {field} has wire type {wire}")
        if field == 1:
            pub_key = value  # type: ignore[assignment]
        elif field == 2:
            sig = value  # type: ignore[assignment]
    if pub_key is None:
        raise HandshakeError("AuthSigMessage has no pub_key")
    key_type: str | None = None
    key: bytes = b""
    for field, wire, value in _fields(pub_key, "PublicKey"):
        key_type = _PUBLIC_KEY_TYPES.get(field, f"unknown key field {field}")
        if wire != 2:
            raise HandshakeError(f"malformed PublicKey: field {field} has wire type {wire}")
        key = value  # type: ignore[assignment]
    if key_type != "ed25519":
        raise HandshakeError(f"expected ed25519 pubkey, got {key_type or 'no key'}")
    if len(key) != 32:
        raise HandshakeError(f"ed25519 pubkey must be 32 bytes, got {len(key)}")
    if sig is None or len(sig) != 64:
        raise HandshakeError(
            f"challenge signature must be 64 bytes, got {0 if sig is None else len(sig)}"
        )
    return key, sig


# -- handshake ----------------------------------------------------------------------------

_AWAIT_KEY = 0
_AWAIT_AUTH = 1
_DONE = 2
_HANDED_OFF = 3  # done, and session() has taken the keys and the buffered bytes
_FAILED = 4


class Handshake:
    """One side of the SecretConnection handshake, as a byte-driven state machine."""

    __slots__ = (
        "_challenge",
        "_ephemeral_private",
        "_ephemeral_public",
        "_identity",
        "_opener",
        "_plain",
        "_raw",
        "_remote_identity",
        "_sealer",
        "_state",
    )

    def __init__(
        self, identity_seed: bytes | Identity, ephemeral_private: bytes | None = None
    ) -> None:
        self._identity = (
            identity_seed if isinstance(identity_seed, Identity) else Identity(identity_seed)
        )
        if ephemeral_private is None:
            ephemeral_private = os.urandom(32)
        ephemeral_private = bytes(ephemeral_private)
        if len(ephemeral_private) != 32:
            raise ValueError(
                f"X25519 ephemeral private key must be 32 bytes, got {len(ephemeral_private)}"
            )
        self._ephemeral_private = ephemeral_private
        self._ephemeral_public = _x25519_base(ephemeral_private)
        self._state = _AWAIT_KEY
        self._raw = bytearray()  # undecrypted bytes from the peer
        self._plain = bytearray()  # decrypted bytes not yet consumed
        self._challenge: bytes | None = None
        self._sealer: FrameSealer | None = None
        self._opener: FrameOpener | None = None
        self._remote_identity: bytes | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._state in (_DONE, _HANDED_OFF)

    @property
    def local_identity(self) -> bytes:
        """Our Ed25519 public key."""
        return self._identity.public_key

    @property
    def ephemeral_public(self) -> bytes:
        return self._ephemeral_public

    @property
    def challenge(self) -> bytes | None:
        """The transcript challenge, once the peer's ephemeral key has arrived."""
        return self._challenge

    @property
    def remote_identity(self) -> bytes:
        """The peer's authenticated Ed25519 public key."""
        if self._remote_identity is None:
            raise HandshakeError("the handshake has not completed")
        return self._remote_identity

    def initial_bytes(self) -> bytes:
        """The 35-byte ephemeral-key message; send it without waiting for the peer."""
        return _KEY_MESSAGE_PREFIX + self._ephemeral_public

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the peer (any chunking); return the bytes to send now."""
        if self._state == _FAILED:
            raise HandshakeError("the handshake already failed")
        if self._state == _HANDED_OFF:
            raise HandshakeError("the handshake is finished; feed the Session instead")
        self._raw += data
        if self._state == _DONE:
            return b""  # kept for the session
        try:
            out = b""
            if self._state == _AWAIT_KEY:
                out = self._receive_key()
            if self._state == _AWAIT_AUTH:
                self._receive_auth()
            return out
        except ProtocolError:
            self._state = _FAILED
            raise

    def session(self) -> Session:
        """The encrypted session; carries every byte already received after the handshake.

        Call it once: the session takes over the keys, nonces and buffered bytes.
        """
        if self._state == _HANDED_OFF:
            raise HandshakeError("session() was already called")
        if self._state != _DONE:
            raise HandshakeError("the handshake has not completed")
        if self._sealer is None or self._opener is None:  # unreachable once _DONE
            raise HandshakeError("the handshake has no keys")
        session = Session(
            self._sealer,
            self._opener,
            self.remote_identity,
            received=bytes(self._raw),
            plaintext=bytes(self._plain),
        )
        self._raw.clear()
        self._plain.clear()
        self._state = _HANDED_OFF
        return session

    # -- steps --------------------------------------------------------------------------

    def _receive_key(self) -> bytes:
        raw = self._raw
        have = min(len(raw), len(_KEY_MESSAGE_PREFIX))
        if raw[:have] != _KEY_MESSAGE_PREFIX[:have]:
            raise HandshakeError(
                "malformed ephemeral key message: expected 22 0a 20 (a 32-byte "
                f"BytesValue), got {bytes(raw[:have]).hex(' ')}"
            )
        if len(raw) < KEY_MESSAGE_SIZE:
            return b""
        remote_ephemeral = bytes(raw[len(_KEY_MESSAGE_PREFIX) : KEY_MESSAGE_SIZE])
        del raw[:KEY_MESSAGE_SIZE]

        if remote_ephemeral == self._ephemeral_public:
            raise HandshakeError("peer sent our own ephemeral key back")
        if _is_low_order(remote_ephemeral):
            raise LowOrderPointError(
                f"peer ephemeral key {remote_ephemeral.hex()} is a low-order point"
            )
        local = self._ephemeral_public
        loc_is_least = local < remote_ephemeral
        lo, hi = (local, remote_ephemeral) if loc_is_least else (remote_ephemeral, local)
        dh = _x25519(self._ephemeral_private, remote_ephemeral)
        if dh == bytes(32):
            raise LowOrderPointError("X25519 shared secret is all zeros (low-order point)")
        recv_key, send_key = derive_secrets(dh, loc_is_least)
        self._challenge = challenge = transcript_challenge(lo, hi, dh)
        self._sealer = _frame.FrameSealer(send_key)
        self._opener = _frame.FrameOpener(recv_key)
        self._state = _AWAIT_AUTH

        auth_sig = (
            _AUTH_SIG_PREFIX
            + self._identity.public_key
            + _AUTH_SIG_SIG_TAG
            + self._identity.sign(challenge)
        )
        return self._sealer.seal(auth_sig)

    def _receive_auth(self) -> None:
        raw, plain, opener, challenge = self._raw, self._plain, self._opener, self._challenge
        if opener is None or challenge is None:  # unreachable in _AWAIT_AUTH
            raise HandshakeError("the handshake has no keys")
        while True:
            header = _read_uvarint(plain, 0)
            if header is not None:
                size, start = header
                if size > AUTH_SIG_MESSAGE_MAX_SIZE:
                    raise HandshakeError(
                        f"AuthSigMessage of {size} bytes exceeds {AUTH_SIG_MESSAGE_MAX_SIZE}"
                    )
                if len(plain) >= start + size:
                    break
            if len(raw) < SEALED_FRAME_SIZE:
                return  # wait for more bytes
            plain += opener.open(bytes(raw[:SEALED_FRAME_SIZE]))
            del raw[:SEALED_FRAME_SIZE]

        body = bytes(plain[start : start + size])
        del plain[: start + size]
        remote_key, signature = _parse_auth_sig(body)
        try:
            nacl.bindings.crypto_sign_open(signature + challenge, remote_key)
        except nacl.exceptions.CryptoError:
            raise HandshakeError("challenge verification failed") from None
        self._remote_identity = remote_key
        self._state = _DONE


# -- session ------------------------------------------------------------------------------


class Session:
    """An established SecretConnection: seal outgoing data, open the incoming stream."""

    __slots__ = ("_buf", "_failed", "_opener", "_pending", "_sealer", "remote_identity")

    def __init__(
        self,
        sealer: FrameSealer,
        opener: FrameOpener,
        remote_identity: bytes,
        *,
        received: bytes = b"",
        plaintext: bytes = b"",
    ) -> None:
        self._sealer = sealer
        self._opener = opener
        self.remote_identity = remote_identity
        self._buf = bytearray(received)  # undecrypted bytes (less than one frame after feed)
        self._pending = plaintext  # plaintext decrypted during the handshake, not yet delivered
        self._failed = False

    @property
    def send_nonce(self) -> int:
        return self._sealer.nonce

    @property
    def recv_nonce(self) -> int:
        return self._opener.nonce

    def seal(self, plaintext: bytes) -> bytes:
        """Sealed frames for ``plaintext`` (b"" for an empty write)."""
        if self._failed:
            raise ProtocolError("the SecretConnection session already failed")
        return self._sealer.seal(plaintext)

    def feed(self, data: bytes) -> bytes:
        """Feed bytes from the peer (any chunking); return the plaintext available so far."""
        if self._failed:
            raise ProtocolError("the SecretConnection session already failed")
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        usable = len(src) - len(src) % SEALED_FRAME_SIZE
        chunks = []
        if self._pending:
            chunks.append(self._pending)
            self._pending = b""
        if usable:
            open_frame = self._opener.open
            view = memoryview(src)
            try:
                for offset in range(0, usable, SEALED_FRAME_SIZE):
                    chunks.append(open_frame(view[offset : offset + SEALED_FRAME_SIZE]))
            except ProtocolError:
                self._failed = True
                raise
            finally:
                view.release()
        if src is buf:
            del buf[:usable]
        elif usable < len(src):
            buf += memoryview(src)[usable:]
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
