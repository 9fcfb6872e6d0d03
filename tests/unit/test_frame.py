"""The SecretConnection frame AEAD kernel: compiled and pure twins."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from nebula import _fast
from nebula.errors import AuthenticationError, FrameError, ProtocolError
from tests.conftest import kernel

SEALED = 1044
NONCE_LIMIT = (1 << 64) - 1
SIZES = [1, 2, 100, 1023, 1024, 1025, 2047, 2048, 2049, 5000]


@pytest.fixture
def frame(kernel_impl: str):
    return kernel("frame", kernel_impl)


def _reference_frame(key: bytes, counter: int, chunk: bytes) -> bytes:
    """One sealed frame computed from the protocol text with cryptography's AEAD."""
    plaintext = len(chunk).to_bytes(4, "little") + chunk + bytes(1024 - len(chunk))
    nonce = bytes(4) + counter.to_bytes(8, "little")
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, None)


def _frames(blob: bytes) -> list[bytes]:
    return [blob[i : i + SEALED] for i in range(0, len(blob), SEALED)]


def test_compiled_and_pure_produce_identical_frames() -> None:
    try:
        compiled = _fast.load_compiled("frame")
    except ImportError:
        if _fast.REQUIRE_COMPILED:
            raise
        pytest.skip("compiled kernels not built")
    pure = _fast.load_pure("frame")
    rng = random.Random(7)
    key = rng.randbytes(32)
    a, b = compiled.FrameSealer(key), pure.FrameSealer(key)
    oa, ob = compiled.FrameOpener(key), pure.FrameOpener(key)
    for size in [*SIZES, *(rng.randrange(0, 6000) for _ in range(40))]:
        data = rng.randbytes(size)
        sealed = a.seal(data)
        assert sealed == b.seal(data)
        assert a.nonce == b.nonce
        # Each opens what the other sealed.
        assert b"".join(ob.open(f) for f in _frames(sealed)) == data
        assert b"".join(oa.open(f) for f in _frames(sealed)) == data


@pytest.mark.parametrize("size", SIZES)
def test_frames_match_the_reference_construction(frame, size: int) -> None:
    rng = random.Random(size)
    key = rng.randbytes(32)
    start = rng.randrange(0, 1 << 40)
    data = rng.randbytes(size)
    sealed = frame.FrameSealer(key, start).seal(data)
    chunks = [data[i : i + 1024] for i in range(0, size, 1024)]
    assert len(sealed) == SEALED * len(chunks)
    assert sealed == b"".join(_reference_frame(key, start + i, c) for i, c in enumerate(chunks))


def test_round_trip_and_nonce_progression(frame) -> None:
    rng = random.Random(3)
    key = rng.randbytes(32)
    sealer, opener = frame.FrameSealer(key), frame.FrameOpener(key)
    assert sealer.nonce == opener.nonce == 0
    expected = 0
    for size in [0, *SIZES, 0, 3]:
        data = rng.randbytes(size)
        sealed = sealer.seal(data)
        expected += -(-size // 1024)
        assert sealer.nonce == expected
        out = []
        for f in _frames(sealed):
            out.append(opener.open(f))
            assert len(out[-1]) <= 1024
        assert b"".join(out) == data
        assert opener.nonce == expected


def test_empty_write_emits_nothing(frame) -> None:
    sealer = frame.FrameSealer(bytes(32))
    assert sealer.seal(b"") == b""
    assert sealer.nonce == 0


def test_accepts_any_bytes_like(frame) -> None:
    key = bytearray(range(32))
    data = bytes(range(256)) * 5
    sealed = frame.FrameSealer(key).seal(data)
    assert frame.FrameSealer(memoryview(bytes(key))).seal(bytearray(data)) == sealed
    opener = frame.FrameOpener(key)
    view = memoryview(sealed)
    assert (
        opener.open(view[:SEALED]) + opener.open(bytearray(view[SEALED : 2 * SEALED]))
        == data[:2048]
    )


@pytest.mark.parametrize("position", [0, 3, 4, 500, 1027, 1028, 1043])
def test_wrong_mac_is_refused_and_keeps_the_nonce(frame, position: int) -> None:
    key = bytes(range(32))
    sealed = frame.FrameSealer(key).seal(b"hello")
    tampered = bytearray(sealed)
    tampered[position] ^= 0x01
    opener = frame.FrameOpener(key)
    with pytest.raises(AuthenticationError):
        opener.open(bytes(tampered))
    assert opener.nonce == 0
    assert opener.open(sealed) == b"hello"


def test_wrong_key_or_wrong_nonce_is_refused(frame) -> None:
    sealed = frame.FrameSealer(bytes(32)).seal(b"x")
    with pytest.raises(AuthenticationError):
        frame.FrameOpener(b"\x01" * 32).open(sealed)
    with pytest.raises(AuthenticationError):
        frame.FrameOpener(bytes(32), 1).open(sealed)


@pytest.mark.parametrize("length", [1025, 1028, 0xFFFFFFFF])
def test_oversized_length_field_is_refused(frame, length: int) -> None:
    key = bytes(range(32))
    plaintext = length.to_bytes(4, "little") + bytes(1024)
    sealed = ChaCha20Poly1305(key).encrypt(bytes(12), plaintext, None)
    opener = frame.FrameOpener(key)
    with pytest.raises(FrameError, match="greater than 1024"):
        opener.open(sealed)
    assert opener.nonce == 1  # the frame authenticated, so its nonce is spent


def test_full_length_field_is_accepted_and_padding_ignored(frame) -> None:
    key = bytes(range(32))
    plaintext = (3).to_bytes(4, "little") + b"abc" + b"\xff" * 1021  # junk padding (Go may do this)
    sealed = ChaCha20Poly1305(key).encrypt(bytes(12), plaintext, None)
    assert frame.FrameOpener(key).open(sealed) == b"abc"
    full = (1024).to_bytes(4, "little") + b"\x07" * 1024
    sealed = ChaCha20Poly1305(key).encrypt(bytes(12), full, None)
    assert frame.FrameOpener(key).open(sealed) == b"\x07" * 1024


@pytest.mark.parametrize("size", [0, 1043, 1045, 2088])
def test_wrong_frame_size_is_refused(frame, size: int) -> None:
    with pytest.raises(FrameError, match="1044"):
        frame.FrameOpener(bytes(32)).open(bytes(size))


def test_send_counter_never_wraps(frame) -> None:
    sealer = frame.FrameSealer(bytes(32), NONCE_LIMIT - 2)
    with pytest.raises(ProtocolError, match="nonce exhausted"):
        sealer.seal(bytes(3000))  # three frames would need counter 2**64 - 1
    assert sealer.nonce == NONCE_LIMIT - 2
    last = sealer.seal(bytes(2048))  # counters 2**64 - 3 and 2**64 - 2 are still usable
    assert last == _reference_frame(bytes(32), NONCE_LIMIT - 2, bytes(1024)) + _reference_frame(
        bytes(32), NONCE_LIMIT - 1, bytes(1024)
    )
    assert sealer.nonce == NONCE_LIMIT
    with pytest.raises(ProtocolError, match="nonce exhausted"):
        sealer.seal(b"x")


def test_receive_counter_never_wraps(frame) -> None:
    key = bytes(32)
    sealed = _reference_frame(key, NONCE_LIMIT - 1, b"last")
    opener = frame.FrameOpener(key, NONCE_LIMIT - 1)
    assert opener.open(sealed) == b"last"
    assert opener.nonce == NONCE_LIMIT
    with pytest.raises(ProtocolError, match="nonce exhausted"):
        opener.open(sealed)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_key_must_be_32_bytes(frame, size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        frame.FrameSealer(bytes(size))
    with pytest.raises(ValueError, match="32 bytes"):
        frame.FrameOpener(bytes(size))


@pytest.mark.parametrize("start", [-1, 1 << 64])
def test_start_counter_must_fit(frame, start: int) -> None:
    with pytest.raises(ValueError, match="nonce counter"):
        frame.FrameSealer(bytes(32), start)
