"""Ed25519 signatures on a native thread, for a leader serving many chains at once.

A Raft leader serving many chains reads, decides and answers every chain's requests on
one event loop thread, and each Ed25519 signature costs that thread ~14 µs. With several
chains (``raft.sign_off_loop``, nebula.aio.daemon), native Ed25519 signatures go to
:class:`SignWorker` instead: a thread of the Rust extension (``nebula.raft._core.
SignWorker``, ed25519-dalek) that signs without ever taking the GIL and announces results
on an eventfd the loop watches.  Requests are handed over as they are read; the worker
hands back what it has once nothing is queued or being signed, so the decisions of one
loop pass still go to Raft as one proposal (nebula.state.raft: ``_start_signed``).  One
chain keeps signing on the loop (a hand-over only adds a wake-up to its latency).

When the loop has read every request that came and the thread still has a queue (it signs
~13-20 µs per signature, depending on the machine; the loop reads a request in less), the
loop signs the last queued job itself, one per loop pass, while the thread signs from the
front (``steal``): the queue empties sooner and is still handed back once, with the loop's
signatures in it.

The signature is the same either way (RFC 8032 Ed25519 is deterministic; the tests compare
the worker with libsodium), and it is made before the decision is proposed, as before:
nothing about what is decided or released changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nebula.errors import BackendError
from nebula.raft import _core
from nebula.raft.nativethread import NativeThread
from nebula.types import Signed

Ed25519WorkerKey = _core.Ed25519Key

log = logging.getLogger("nebula.signer")


class SignWorker(NativeThread[Signed]):
    """One native signing thread serving the event loop it was created on."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop or asyncio.get_running_loop(), _core.SignWorker)
        self.stolen = 0  # jobs the loop signed itself
        self._handed = 0  # hand-overs so far
        self._idle_at = -1  # _handed when _when_idle was scheduled; -1: not scheduled

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
        if not self._thread_gone():
            return True
        log.error("the signing thread stopped; signing on the event loop from now on")
        self.close("the signing thread stopped")
        return False

    def sign(self, key: Ed25519WorkerKey, msgs: Sequence[bytes], done: Signed) -> None:
        """Sign ``msgs`` with ``key``; ``done(signatures, None)`` is called on the loop
        (``done(None, BackendError)`` if the worker closes first).  Results finished
        together are handed back in one loop callback, in the order they finished."""
        if self._closed:
            raise BackendError("the signing worker is closed")
        self._hand_over(done, key, msgs)
        self._handed += 1
        if self._idle_at < 0:
            self._idle_at = self._handed
            self._loop.call_soon(self._when_idle)

    def _when_idle(self) -> None:
        """A loop pass after a hand-over (its sockets were read first).  Nothing handed
        over since: the loop has no request left to read, so it signs the last queued job
        while the thread signs another, and looks again on the next pass; requests still
        coming: it only looks again.  It stops once nothing is queued."""
        if self._closed or self._thread_gone():
            self._idle_at = -1
            return
        if self._handed != self._idle_at:
            self._idle_at = self._handed
        else:
            try:
                stole = self._core.steal()
            except BaseException:
                self._idle_at = -1  # the next hand-over schedules a look again
                raise
            if not stole:
                self._idle_at = -1
                return
            self.stolen += 1
        self._loop.call_soon(self._when_idle)

    def _deliver(self, done: Signed, sigs: list[bytes]) -> None:
        done(sigs, None)

    def close(self, why: str = "the signing worker was closed") -> None:
        """Stop the thread; signatures still awaited fail with BackendError(``why``)."""
        if self._closed:
            return
        for done in self._shut().values():
            done(None, BackendError(why))


__all__ = ["Ed25519WorkerKey", "SignWorker"]
