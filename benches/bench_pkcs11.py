"""What signing through PKCS#11 costs, step by step, against a real SoftHSM2 (pytest-benchmark).

For each key type, on one token and one logged-in session:

* ``raw``: the module's ``C_Sign`` alone (python-pkcs11, on the calling thread);
* ``blocking``: what the backend's worker thread runs per request: ``C_Sign``, the
  low-S normalisation (secp256k1) and the check of the signature against the pinned key;
* ``async``: ``await backend.sign(msg)`` on an event loop, as the service calls it: the
  hop to the worker thread and back under the backend's timeout, on top of ``blocking``.

``benches/bench_keys.py::test_bench_native_backend_sign_async`` is the native key's
``async`` line.  SoftHSM2 signs in software (OpenSSL) and decrypts the key object on
each operation; a hardware token's ``C_Sign`` is its own, usually slower.

Run timed with ``python -m pytest benches/bench_pkcs11.py --benchmark-enable``; the normal
suite runs each once as a smoke test.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from nebula.backends import pkcs11 as hsm
from nebula.crypto.keys import signature_verifier
from tests.support.softhsm import SoftHSM
from tests.support.vectors import h, load

# A realistic vote: the non-nil precommit sign bytes of the vectors (119 bytes).
_MSG = h(load("signatures_and_keys")["ed25519"]["signatures"][3]["message_hex"])


@pytest.fixture(scope="module")
def softhsm() -> Iterator[SoftHSM]:
    before = os.environ.get("SOFTHSM2_CONF")
    h = SoftHSM()
    h.activate()  # one PKCS#11 module per process; init_token re-initialises it
    try:
        yield h
    finally:
        h.cleanup()
        if before is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = before


@pytest.fixture(scope="module", params=hsm.KEY_TYPES)
def backend(request: pytest.FixtureRequest, softhsm: SoftHSM) -> Iterator[hsm.Pkcs11Backend]:
    key_type: str = request.param
    label = f"bench-{key_type}"
    softhsm.init_token(label)
    s = hsm.Pkcs11Settings.create(
        module_path=softhsm.module,
        token_label=label,
        pin_path=softhsm.pin_file(softhsm.root),
        key_type=key_type,
        key_label="validator",
        key_id=None,
    )
    hsm.generate_key(s)
    b = hsm.Pkcs11Backend.connect(s)
    try:
        yield b
    finally:
        b.release()


def _check(b: hsm.Pkcs11Backend, sig: bytes) -> None:
    assert len(sig) == 64 and signature_verifier(b.key_type, b.public_key)(_MSG, sig)


def test_bench_pkcs11_raw_sign(benchmark, backend: hsm.Pkcs11Backend) -> None:
    raw = benchmark(backend._sign_raw, _MSG)
    sig = hsm.normalize_secp256k1(raw) if backend.key_type == "secp256k1" else raw
    _check(backend, sig)


def test_bench_pkcs11_sign_blocking(benchmark, backend: hsm.Pkcs11Backend) -> None:
    _check(backend, benchmark(backend._sign_blocking, _MSG))


def test_bench_pkcs11_backend_sign_async(benchmark, backend: hsm.Pkcs11Backend) -> None:
    loop = asyncio.new_event_loop()
    try:
        sig = benchmark(lambda: loop.run_until_complete(backend.sign(_MSG)))
    finally:
        loop.close()
    _check(backend, sig)
