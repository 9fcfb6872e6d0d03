"""The native sync thread (nebula.raft.syncthread, rust/src/syncer.rs): a leader's
``fdatasync`` off the event loop, its outcome (success or errno) back on the loop in the
job, and the cases where it must not be used or must not strand the node."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from nebula.errors import StateError
from nebula.raft.storage import Entry, HardState, RaftLog, SyncJob
from nebula.raft.syncthread import SyncThread
from tests.support.native import StoppedThread


class _CountingFS:
    """The real file system, counting ``fdatasync`` calls (not an OsFileSystem: a log on it
    must keep the Python thread, whose ``fdatasync`` is this one)."""

    def __init__(self) -> None:
        from nebula.raft.storage import OS_FS

        self._fs = OS_FS
        self.syncs = 0

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        self._fs.fdatasync(fd)

    def __getattr__(self, name: str) -> object:
        return getattr(self._fs, name)


def test_a_log_sync_runs_on_the_thread_and_completes_on_the_loop(tmp_path: Path) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        log = RaftLog(tmp_path / "raft")
        syncer = SyncThread(loop)
        try:
            for i in range(1, 51):
                log.append([Entry(i, 1, 0, b"decision %d" % i, b"")], HardState(1, 1, i - 1))
                job = log.sync_job()
                assert job is not None and job.os_fd is not None
                done = loop.create_future()
                calls: list[int] = []

                def finished(done: asyncio.Future[None] = done, calls: list[int] = calls) -> None:
                    assert asyncio.get_running_loop() is loop  # on the loop thread
                    calls.append(1)
                    done.set_result(None)

                assert syncer.sync(job, finished)
                assert not job.ok  # nothing recorded before the loop hears of it
                await asyncio.wait_for(done, 5)
                assert job.ok and job.error is None and calls == [1]
                log.sync_done(job)
                assert log.sync_job() is None  # everything appended is durable
            assert syncer.waiting == 0
            assert log.stats()["syncs"] == 50
        finally:
            syncer.close()
            log.close()
        reopened = RaftLog(tmp_path / "raft")
        assert reopened.last_index == 50
        reopened.close()

    asyncio.run(go())


def test_a_failed_sync_comes_back_as_its_errno_and_fails_the_log_closed(tmp_path: Path) -> None:
    """fdatasync on a pipe fails (EINVAL): the job carries the OSError, and a log handed
    such an outcome fails closed, as with a sync on the loop."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        syncer = SyncThread(loop)
        r, w = os.pipe()
        try:
            from nebula.raft.storage import OS_FS

            job = SyncJob(OS_FS, w, 0)
            done = loop.create_future()
            assert syncer.sync(job, lambda: done.set_result(None))
            await asyncio.wait_for(done, 5)
            assert not job.ok
            assert isinstance(job.error, OSError) and job.error.errno == errno.EINVAL

            log = RaftLog(tmp_path / "raft")
            log.append([Entry(1, 1, 0, b"x", b"")], HardState(1, 1, 0))
            real = log.sync_job()
            assert real is not None
            real.ran(errno.EIO)
            with pytest.raises(StateError, match="fdatasync failed"):
                log.sync_done(real)
            with pytest.raises(StateError, match="failed earlier"):
                log.append([Entry(2, 1, 0, b"y", b"")], None)
            log.close()
        finally:
            syncer.close()
            os.close(r)
            os.close(w)

    asyncio.run(go())


def test_a_log_not_on_the_real_file_system_is_not_synced_natively(tmp_path: Path) -> None:
    async def go() -> None:
        syncer = SyncThread(asyncio.get_running_loop())
        fs = _CountingFS()
        log = RaftLog(tmp_path / "raft", fs=fs)  # type: ignore[arg-type]
        try:
            log.append([Entry(1, 1, 0, b"x", b"")], HardState(1, 1, 0))
            job = log.sync_job()
            assert job is not None and job.os_fd is None
            assert not syncer.sync(job, lambda: None)  # the caller runs job.run() instead
            assert syncer.waiting == 0
            job.run()
            assert fs.syncs == 1 and job.ok
            log.sync_done(job)
        finally:
            syncer.close()
            log.close()

    asyncio.run(go())


def test_a_closed_thread_takes_nothing_and_a_stopped_one_fails_what_it_owed(
    tmp_path: Path,
) -> None:

    async def go() -> None:
        loop = asyncio.get_running_loop()
        log = RaftLog(tmp_path / "raft")
        log.append([Entry(1, 1, 0, b"x", b"")], HardState(1, 1, 0))
        job = log.sync_job()
        assert job is not None

        syncer = SyncThread(loop)
        syncer.check()  # alive, nothing owed: nothing happens
        owed: list[int] = []
        syncer._waiting[10**9] = (job, lambda: owed.append(1))  # a sync never answered
        real = syncer._core
        syncer._core = StoppedThread(real)
        assert not syncer.sync(job, lambda: None)  # a stopped thread takes nothing new
        syncer.check()
        assert owed == [1] and not job.ok
        assert isinstance(job.error, OSError) and "stopped" in str(job.error)
        with pytest.raises(StateError, match="fdatasync failed"):
            log.sync_done(job)  # the node fails closed, as for a failed sync
        syncer._core = real
        syncer.close()
        syncer.close()  # idempotent
        assert not real.alive
        fresh = SyncJob(job.fs, job.fd, job.end)
        assert not syncer.sync(fresh, lambda: None)
        log.close()

    asyncio.run(go())
