"""SecretConnection costs (pytest-benchmark), compiled and pure kernels side by side.

Run timed with ``python -m pytest benches/bench_secretconn.py --benchmark-enable -q``;
the normal suite runs each once as a smoke test.
"""

from __future__ import annotations

import os

import pytest

from nebula import _fast
from nebula.crypto import merlin, secretconn
from nebula.crypto.secretconn import Handshake, Identity

_KEY = bytes(range(32))
_KIB = os.urandom(1024)
_OPEN_BATCH = 256  # frames opened per benchmark call (a fresh opener per batch)


@pytest.fixture(params=["compiled", "pure"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "compiled":
        try:
            for name in ("keccak", "frame"):
                _fast.load_compiled(name)
        except ImportError:
            if _fast.REQUIRE_COMPILED:
                raise
            pytest.skip("compiled kernels not built")
    return request.param


def _kernel(name: str, impl: str):
    return _fast.load_compiled(name) if impl == "compiled" else _fast.load_pure(name)


def test_bench_keccak_f1600(benchmark, impl: str) -> None:
    permute = _kernel("keccak", impl).keccak_f1600
    state = bytearray(200)
    benchmark(permute, state)
    assert state != bytearray(200)


def test_bench_seal_1k(benchmark, impl: str) -> None:
    sealer = _kernel("frame", impl).FrameSealer(_KEY)
    sealed = benchmark(sealer.seal, _KIB)
    assert len(sealed) == 1044


def test_bench_seal_256_frames_one_call(benchmark, impl: str) -> None:
    """256 KiB sealed in one call; divide by 256 for the per-frame cost.  For the
    compiled kernel this is the cipher's own cost (OpenSSL's ChaCha20-Poly1305 per
    1028-byte frame plus a C loop): the floor under ``test_bench_seal_1k``, so the
    best ratio any kernel can reach against the pure twin is pure 1 KiB / this."""
    sealer = _kernel("frame", impl).FrameSealer(_KEY)
    sealed = benchmark(sealer.seal, _KIB * 256)
    assert len(sealed) == 1044 * 256


def test_bench_aead_call_1k(benchmark) -> None:
    """One ChaCha20-Poly1305 encryption of a 1028-byte frame through ``cryptography``
    (what the pure twin calls per frame), nothing else: the pure twin's own floor."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    aead = ChaCha20Poly1305(_KEY)
    nonce = bytes(12)
    plaintext = bytes(4) + _KIB[:1024]
    assert len(benchmark(aead.encrypt, nonce, plaintext, None)) == 1044


def test_bench_open_1k_x256(benchmark, impl: str) -> None:
    """Opening 256 consecutive 1 KiB frames; divide by 256 for the per-frame cost."""
    frame = _kernel("frame", impl)
    wire = frame.FrameSealer(_KEY).seal(_KIB * _OPEN_BATCH)
    frames = [wire[i : i + 1044] for i in range(0, len(wire), 1044)]

    def open_batch() -> int:
        opener = frame.FrameOpener(_KEY)
        for f in frames:
            opener.open(f)
        return opener.nonce

    assert benchmark(open_batch) == _OPEN_BATCH


def test_bench_merlin_challenge(benchmark, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merlin, "_keccak_f1600", _kernel("keccak", impl).keccak_f1600)
    lo, hi, dh = os.urandom(32), os.urandom(32), os.urandom(32)
    assert len(benchmark(secretconn.transcript_challenge, lo, hi, dh)) == 32


def test_bench_handshake_in_memory(benchmark, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides of a full handshake (fresh ephemeral keys, reused identities)."""
    monkeypatch.setattr(secretconn, "_frame", _kernel("frame", impl))
    monkeypatch.setattr(merlin, "_keccak_f1600", _kernel("keccak", impl).keccak_f1600)
    node, signer = Identity(os.urandom(32)), Identity(os.urandom(32))

    def handshake() -> bool:
        a, b = Handshake(node), Handshake(signer)
        a_auth = a.receive(b.initial_bytes())
        b_auth = b.receive(a.initial_bytes())
        a.receive(b_auth)
        b.receive(a_auth)
        return a.done and b.done

    assert benchmark(handshake)
