"""The event loop's end of a native worker thread (``rust/src/worker.rs``).

The Rust side runs jobs on its own thread without the GIL and writes an eventfd once its
queue is empty; :class:`NativeThread` owns that eventfd, hands jobs over under tokens and
delivers each result on the loop.  The signing thread (nebula.crypto.signworker) and a
Raft leader's sync thread (nebula.raft.syncthread) are built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")  # what the loop keeps for a job until its result comes back

log = logging.getLogger("nebula.raft")


class NativeThread(Generic[T]):
    """One native thread serving the event loop it was created on.  ``make_core(efd)``
    builds the Rust worker (``submit(token, ...)``, ``take()``, ``alive``, ``close()``);
    a subclass says what a result means in :meth:`_deliver`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, make_core: Callable[[int], Any]) -> None:
        self._loop = loop
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._core = make_core(self._efd)
        except BaseException:
            os.close(self._efd)
            raise
        self._waiting: dict[int, T] = {}
        self._next = 0
        self._closed = False
        loop.add_reader(self._efd, self._ready)

    @property
    def waiting(self) -> int:
        """Jobs handed over and not answered yet."""
        return len(self._waiting)

    def _hand_over(self, kept: T, *job: Any) -> None:
        """Submit ``job``; ``kept`` comes back to :meth:`_deliver` with its result."""
        token = self._next
        self._next = token + 1
        self._core.submit(token, *job)  # raises if the thread is closed: nothing kept
        self._waiting[token] = kept

    def _deliver(self, kept: T, result: Any) -> None:
        raise NotImplementedError

    def _ready(self) -> None:
        # Read the eventfd first, then take: a result finished after the take writes it
        # again (see the Rust side), one finished before it is taken now.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        waiting = self._waiting
        for token, result in self._core.take():
            kept = waiting.pop(token, None)
            if kept is not None:
                try:
                    self._deliver(kept, result)
                except Exception:  # one failing continuation does not strand the others
                    log.exception("%s: a continuation failed", type(self).__name__)

    def _thread_gone(self) -> bool:
        """The thread stopped on its own (it should not): not closed, not alive."""
        return not self._closed and not self._core.alive

    def _shut(self) -> dict[int, T]:
        """Stop the thread (the job in progress ends first), stop watching the eventfd;
        return what was still owed (the caller answers or drops it)."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._efd)
        self._core.close()
        os.close(self._efd)
        owed, self._waiting = self._waiting, {}
        return owed
