"""The native signing thread (nebula.crypto.signworker, rust/src/signer.rs): the same
signatures as libsodium, every job answered once, a closed worker fails what it owes."""

from __future__ import annotations

import asyncio
import os

import nacl.bindings
import pytest

from nebula.crypto.signworker import SignWorker
from nebula.errors import BackendError
from tests.support.native import StoppedThread


def _sodium(seed: bytes, msg: bytes) -> bytes:
    _pk, sk = nacl.bindings.crypto_sign_seed_keypair(seed)
    return nacl.bindings.crypto_sign(msg, sk)[:64]


def test_signatures_are_libsodiums_and_every_job_is_answered_once() -> None:
    async def go() -> None:
        worker = SignWorker()
        try:
            loop = asyncio.get_running_loop()
            jobs = []
            for i in range(300):
                seed = os.urandom(32)
                msgs = [os.urandom((i * 7 + k) % 400) for k in range(1 + i % 3)]
                fut: asyncio.Future = loop.create_future()
                calls: list[object] = []

                def done(sigs, err, fut=fut, calls=calls) -> None:
                    calls.append((sigs, err))
                    if not fut.done():
                        fut.set_result((sigs, err))

                worker.sign(worker.key(seed), msgs, done)
                jobs.append((seed, msgs, fut, calls))
            assert worker.waiting > 0
            for seed, msgs, fut, _calls in jobs:
                sigs, err = await asyncio.wait_for(fut, 10)
                assert err is None
                assert sigs == [_sodium(seed, m) for m in msgs]
            await asyncio.sleep(0.05)
            assert all(len(calls) == 1 for *_, calls in jobs)
            assert worker.waiting == 0
        finally:
            worker.close()

    asyncio.run(go())


def test_public_key_matches_and_a_bad_seed_is_refused() -> None:
    seed = os.urandom(32)
    pk, _sk = nacl.bindings.crypto_sign_seed_keypair(seed)
    assert SignWorker.key(seed).public_key() == pk
    with pytest.raises(ValueError, match="32 bytes"):
        SignWorker.key(seed[:31])


def test_a_closed_worker_fails_what_it_owes_and_takes_nothing_more() -> None:
    async def go() -> None:
        worker = SignWorker()
        key = worker.key(os.urandom(32))
        got: list[tuple[object, object]] = []
        for _ in range(200):  # more than it signs before close() runs
            worker.sign(key, [os.urandom(10_000)], lambda s, e: got.append((s, e)))
        worker.close()
        assert len(got) == 200  # each answered: a signature, or the closed worker's error
        errors = [e for s, e in got if e is not None]
        assert errors and all(isinstance(e, BackendError) for e in errors)
        assert all(s is None for s, e in got)  # close() hands nothing back unread
        with pytest.raises(BackendError, match="closed"):
            worker.sign(key, [b"x"], lambda s, e: None)
        worker.close()  # twice: nothing happens

    asyncio.run(go())


def test_a_stopped_thread_fails_what_it_owed_and_the_backend_signs_on_the_loop() -> None:
    """The thread should never stop on its own; if it did, the chains it served must not
    wait on it: what it owed is refused and the backend signs on the loop again."""
    from nebula.backends.native import NativeBackend
    from nebula.crypto.keys import generate

    async def go() -> None:
        worker = SignWorker()
        key = generate("ed25519")
        backend = NativeBackend(key)
        assert backend.use_worker(worker) and backend.signs_later()
        assert worker._core.alive
        owed: list[tuple[object, object]] = []
        worker._waiting[10**9] = lambda s, e: owed.append((s, e))  # a job never answered
        worker._core = StoppedThread(worker._core)
        assert not backend.signs_later()
        assert len(owed) == 1 and owed[0][0] is None
        assert isinstance(owed[0][1], BackendError) and "stopped" in str(owed[0][1])
        msg = b"sign bytes"
        assert backend.sign_sync(msg) == _sodium(key.secret_bytes(), msg)
        assert not worker._core._core.alive  # closed: the real thread was stopped too

    asyncio.run(go())


def test_a_secp256k1_key_keeps_signing_on_the_loop() -> None:
    from nebula.backends.native import NativeBackend
    from nebula.crypto.keys import generate

    async def go() -> None:
        worker = SignWorker()
        try:
            backend = NativeBackend(generate("secp256k1"))
            assert not backend.use_worker(worker)
            assert not backend.signs_later()
        finally:
            worker.close()

    asyncio.run(go())
