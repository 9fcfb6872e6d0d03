"""A leader's ``fdatasync`` on a native thread (``RaftStore(sync_off_loop=True)``).

When a leader's Ready carries several decisions, its sync runs off the event loop
(:class:`~nebula.raft.node.RaftNode`, ``offload``).  A Python worker thread would have
to take the GIL before it could even call ``fdatasync``, and the loop holds the GIL while
it sends the Ready's appends, so the sync started late: traced on a 16-chain run, ~290 µs
after it was handed over, and the leader's own sync, not the followers', was the last
thing a commit waited for.  :class:`SyncThread` hands the descriptor to a thread of the
Rust extension (``nebula.raft._core.SyncWorker``) that calls ``fdatasync`` without the
GIL and announces the outcome on an eventfd the loop watches.

What is made durable, and when the node counts it as durable, does not change: the job's
outcome goes through :meth:`~nebula.raft.storage.RaftLog.sync_done` as before (a failed
sync fails the log, and the node, closed).  Logs not on the real file system (tests, the
simulation) keep the Python thread: their ``fdatasync`` is the one to call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from nebula.raft import _core
from nebula.raft.storage import SyncJob

log = logging.getLogger("nebula.raft")


class SyncThread:
    """One native sync thread serving the event loop it was created on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._core = _core.SyncWorker(self._efd)
        except BaseException:
            os.close(self._efd)
            raise
        self._waiting: dict[int, tuple[SyncJob, Callable[[], None]]] = {}
        self._next = 0
        self._closed = False
        loop.add_reader(self._efd, self._ready)

    @property
    def waiting(self) -> int:
        """Syncs handed over and not finished yet."""
        return len(self._waiting)

    def sync(self, job: SyncJob, done: Callable[[], None]) -> bool:
        """Run ``job``'s ``fdatasync`` on the thread, record its outcome in the job and
        call ``done()`` on the loop.  False (nothing handed over) if the job's log is not
        on the real file system or the thread is closed or gone: run it another way."""
        fd = job.os_fd
        if fd is None or self._closed or not self._core.alive:
            return False
        token = self._next
        self._next = token + 1
        self._core.submit(token, fd)
        self._waiting[token] = (job, done)
        return True

    def check(self) -> None:
        """If the thread stopped with syncs owed (it should not), fail each of them (the
        log, and the node, then fail closed) instead of waiting forever.  Cheap: call it
        from a timer."""
        if self._waiting and not self._closed and not self._core.alive:
            log.error("the raft sync thread stopped with %d sync(s) owed", len(self._waiting))
            owed, self._waiting = self._waiting, {}
            for job, done in owed.values():
                job.error = OSError("the raft sync thread stopped")
                done()

    def _ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        for token, err in self._core.take():
            item = self._waiting.pop(token, None)
            if item is None:
                continue
            job, done = item
            job.ran(err)
            try:
                done()
            except Exception:  # done() fails the node itself; nothing may strand the rest
                log.exception("raft sync continuation failed")

    def close(self) -> None:
        """Wait for the sync in progress (its descriptor may be closed afterwards), drop
        the rest, stop the thread.  Jobs not finished are not answered: the node closes."""
        if self._closed:
            return
        self._closed = True
        self._core.close()
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
        self._waiting.clear()
