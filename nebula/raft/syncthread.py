"""A leader's ``fdatasync`` on a native thread (``RaftStore(sync_off_loop=True)``).

When a leader's Ready carries several decisions, its sync runs off the event loop
(:class:`~nebula.raft.node.RaftNode`, ``offload``).  A Python worker thread has to take
the GIL before it can even call ``fdatasync``, while the loop holds it and the followers,
woken by the appends, hold the cores: traced on a 16-chain run, the sync started ~300-380
µs after the proposal, and the leader's own sync, not the followers', was the last thing
a commit waited for (BENCHMARKS.md, eleventh session).  :class:`SyncThread` hands the
descriptor to a thread of the Rust extension (``nebula.raft._core.SyncWorker``) that
calls ``fdatasync`` without the GIL and announces the outcome on an eventfd the loop
watches.

What is made durable, and when the node counts it as durable, does not change: the job's
outcome goes through :meth:`~nebula.raft.storage.RaftLog.sync_done` as before (a failed
sync fails the log, and the node, closed).  Logs not on the real file system (tests, the
simulation) keep the Python thread: their ``fdatasync`` is the one to call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nebula.raft import _core
from nebula.raft.nativethread import NativeThread
from nebula.raft.storage import SyncJob

log = logging.getLogger("nebula.raft")

_Kept = tuple[SyncJob, Callable[[], None]]


class SyncThread(NativeThread[_Kept]):
    """One native sync thread serving the event loop it was created on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, _core.SyncWorker)

    def sync(self, job: SyncJob, done: Callable[[], None]) -> bool:
        """Run ``job``'s ``fdatasync`` on the thread, record its outcome in the job and
        call ``done()`` on the loop.  False (nothing handed over) if the job's log is not
        on the real file system or the thread is closed or gone: run it another way."""
        fd = job.os_fd
        if fd is None or self._closed or not self._core.alive:
            return False
        self._hand_over((job, done), fd)
        return True

    def check(self) -> None:
        """If the thread stopped with syncs owed (it should not), fail each of them (the
        log, and the node, then fail closed) instead of waiting forever.  Cheap: call it
        from a timer."""
        if self._waiting and self._thread_gone():
            log.error("the raft sync thread stopped with %d sync(s) owed", len(self._waiting))
            owed, self._waiting = self._waiting, {}
            for job, done in owed.values():
                job.error = OSError("the raft sync thread stopped")
                done()

    def _deliver(self, kept: _Kept, err: int) -> None:
        job, done = kept
        job.ran(err)
        done()  # the node's continuation fails the node itself on an error

    def close(self) -> None:
        """Wait for the sync in progress (its descriptor may be closed afterwards), drop
        the rest, stop the thread.  Jobs not finished are not answered: the node closes."""
        if not self._closed:
            self._shut()
