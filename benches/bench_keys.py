"""Signing cost per key type (pytest-benchmark).

Run timed with ``python -m pytest benches/bench_keys.py --benchmark-enable``; the normal
suite runs each once as a smoke test.
"""

from __future__ import annotations

import asyncio

import pytest

from nebula.backends.native import NativeBackend
from nebula.crypto import keys
from tests.support.vectors import h, load

# A realistic vote: the non-nil precommit sign bytes of the vectors (119 bytes).
_MSG = h(load("signatures_and_keys")["ed25519"]["signatures"][3]["message_hex"])


@pytest.mark.parametrize("key_type", keys.KEY_TYPES)
def test_bench_sign(benchmark, key_type: str) -> None:
    key = keys.generate(key_type)
    sig = benchmark(key.sign, _MSG)
    assert key.verify(_MSG, sig)


@pytest.mark.parametrize("key_type", keys.KEY_TYPES)
def test_bench_native_backend_sign_sync(benchmark, key_type: str) -> None:
    backend = NativeBackend(keys.generate(key_type))
    sig = benchmark(backend.sign_sync, _MSG)
    assert sig is not None and keys.verify_signature(key_type, backend.public_key, _MSG, sig)


def test_bench_native_backend_sign_async(benchmark) -> None:
    backend = NativeBackend(keys.generate("ed25519"))
    loop = asyncio.new_event_loop()
    try:
        sig = benchmark(lambda: loop.run_until_complete(backend.sign(_MSG)))
    finally:
        loop.close()
    assert backend.key.verify(_MSG, sig)


@pytest.mark.parametrize("key_type", keys.KEY_TYPES)
def test_bench_verify(benchmark, key_type: str) -> None:
    key = keys.generate(key_type)
    sig = key.sign(_MSG)
    assert benchmark(key.verify, _MSG, sig)


def test_bench_sign_worker_burst_hand_over(benchmark) -> None:
    """The event loop's cost of handing a burst of 16 signing jobs (16 chains' requests of
    one pass) to the native signing thread: the first wakes it, the other 15 find it busy.
    Each round starts with the thread asleep and every earlier signature delivered."""
    from nebula.crypto.signworker import SignWorker

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    seed = bytes(range(32))
    got: list[bytes] = []

    def done(sigs, err) -> None:
        assert err is None
        got.extend(sigs)

    async def start() -> SignWorker:
        return SignWorker()

    worker = loop.run_until_complete(start())
    wkey = SignWorker.key(seed)

    def drain() -> None:
        while worker.waiting:
            loop.run_until_complete(asyncio.sleep(0.0002))

    def burst() -> None:
        for _ in range(16):
            worker.sign(wkey, (_MSG,), done)

    try:
        benchmark.pedantic(burst, setup=drain, rounds=200)
        drain()
    finally:
        worker.close()
        loop.close()
        asyncio.set_event_loop(None)
    key = keys.Ed25519Key.from_seed(seed)
    assert got and len(got) % 16 == 0
    assert all(key.verify(_MSG, s) for s in got)
