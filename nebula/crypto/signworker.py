"""Ed25519 signatures on a native thread, for a leader serving many chains at once.

A Raft leader serving many chains reads, decides and answers every chain's requests on
one event loop thread, and each Ed25519 signature costs that thread ~14 µs. With several
chains (``raft.sign_off_loop``, nebula.aio.daemon), native Ed25519 signatures go to
:class:`SignWorker` instead: a thread of the Rust extension (``nebula.raft._core.
SignWorker``, ed25519-dalek) that signs without ever taking the GIL and announces results
on an eventfd the loop watches.  Requests are handed over as they are read; the worker
hands back what it has once its queue is empty, so the decisions of one loop pass still
go to Raft as one proposal (nebula.state.raft: ``_propose_signed``).  One chain keeps
signing on the loop (a hand-over only adds a wake-up to its latency).

The signature is the same either way (RFC 8032 Ed25519 is deterministic; the tests compare
the worker with libsodium), and it is made before the decision is proposed, as before:
nothing about what is decided or released changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence

from nebula.errors import BackendError
from nebula.raft import _core
from nebula.types import Signed

Ed25519WorkerKey = _core.Ed25519Key

log = logging.getLogger("nebula.signer")


class SignWorker:
    """One native signing thread serving the event loop it was created on."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._core = _core.SignWorker(self._efd)
        except BaseException:
            os.close(self._efd)
            raise
        self._waiting: dict[int, Signed] = {}
        self._next = 0
        self._closed = False
        self._loop.add_reader(self._efd, self._ready)

    @staticmethod
    def key(seed: bytes) -> Ed25519WorkerKey:
        """The worker's copy of an Ed25519 key (from its 32-byte seed)."""
        return _core.Ed25519Key(seed)

    @property
    def alive(self) -> bool:
        """The signing thread runs.  If it ever stopped on its own (it should not), what it
        owed fails with BackendError (refused, nothing released), the worker closes, and
        the backends sign on the loop again: no chain waits on a thread that is gone."""
        if self._closed:
            return False
        if self._core.alive:
            return True
        log.error("the signing thread stopped; signing on the event loop from now on")
        self.close("the signing thread stopped")
        return False

    @property
    def waiting(self) -> int:
        """Jobs asked for and not handed back yet."""
        return len(self._waiting)

    def sign(self, key: Ed25519WorkerKey, msgs: Sequence[bytes], done: Signed) -> None:
        """Sign ``msgs`` with ``key``; ``done(signatures, None)`` is called on the loop
        (``done(None, BackendError)`` if the worker closes first).  Results finished
        together are handed back in one loop callback, in the order they finished."""
        if self._closed:
            raise BackendError("the signing worker is closed")
        token = self._next
        self._next = token + 1
        self._core.submit(token, key, msgs)
        self._waiting[token] = done

    def _ready(self) -> None:
        # Read the eventfd first, then take: a result finished after the take writes it
        # again (see the Rust side), one finished before it is taken now.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        waiting = self._waiting
        for token, sigs in self._core.take():
            done = waiting.pop(token, None)
            if done is not None:
                try:
                    done(sigs, None)
                except Exception:  # its request times out (refused); the others go on
                    log.exception("a signature's continuation failed")

    def close(self, why: str = "the signing worker was closed") -> None:
        """Stop the thread; signatures still awaited fail with BackendError(``why``)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._efd)
        self._core.close()
        os.close(self._efd)
        waiting, self._waiting = self._waiting, {}
        for done in waiting.values():
            done(None, BackendError(why))


__all__ = ["Ed25519WorkerKey", "SignWorker"]
