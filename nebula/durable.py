"""Durable-write steps, written once (every store and key writer uses these).

* :func:`pwrite_all` - ``pwrite`` until every byte is written; a call that writes
  nothing is an I/O error, never an endless loop.
* :func:`fsync_dir` - make a rename or a new directory entry durable.
* :func:`write_file_durably` - a file created or replaced atomically: a fresh temporary
  file in the same directory, ``fsync``, ``rename`` (or ``link``) onto the target,
  ``fsync`` of the directory.
* :func:`read_all` - read a descriptor from offset 0 to its end.
* :class:`ExclusiveLock` - an ``flock`` held for the life of the process on a lock
  file, with the holder's pid written into it so a refusal can name the holder.

Nothing here decides what is written; callers own their formats.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from nebula.errors import StateError


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``; raise OSError(EIO) if a write makes no progress."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def read_all(fd: int) -> bytes:
    """The whole content of ``fd`` from offset 0."""
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(
    path: str | Path, data: bytes | bytearray, mode: int = 0o600, *, overwrite: bool = True
) -> None:
    """Create or replace ``path`` with ``data``, atomically and durably.

    The data goes to a fresh temporary file in the same directory (``O_EXCL``, exactly
    ``mode`` whatever the umask), is fsync'ed, and is then renamed over ``path``
    (``overwrite=True``) or hard-linked to it, which fails with :class:`FileExistsError`
    if ``path`` exists (``overwrite=False``; on a filesystem without hard links, an
    exclusive create in place).  The directory is fsync'ed last.  After a crash at any
    point ``path`` holds the old content or the new one, never a mix.  Raises OSError.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        _write_new(tmp, data, mode)
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)
            except FileExistsError:
                raise
            except OSError:
                _write_new(p, data, mode)  # no hard links here
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(p.parent)


def _write_new(path: Path, data: bytes | bytearray, mode: int) -> None:
    """Create ``path`` (it must not exist) holding ``data``, fsync'ed; removed on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask can only clear bits; make the mode exact
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


class ExclusiveLock:
    """An exclusive ``flock`` on ``path`` for as long as this object lives (or until
    :meth:`release`).  The holder's pid is written into the file.

    A second process (or a second lock in this process: ``flock`` locks belong to the
    open file description) gets :class:`~nebula.errors.StateError` naming ``what``, the
    lock file and the pid that holds it.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self._fd: int | None = None
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"{self.path}: cannot open lock file for {what}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            by = "another process" if holder != str(os.getpid()) else "this process already"
            raise StateError(
                f"{what} is in use by {by} (pid {holder}; lock file {self.path}): two "
                "signers on one state would each keep their own mark - stop the other "
                "process first"
            ) from None
        try:
            os.ftruncate(fd, 0)
            pwrite_all(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock is what matters; the pid is only for the message
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()
