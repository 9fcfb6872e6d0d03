"""An in-memory file system with crash semantics, for crash tests and the simulation.

:class:`MemFS` implements :class:`nebula.raft.storage.FileSystem`.  Every file (inode)
has a **volatile** image (what reads see: the page cache) and a **durable** one (what
survives power loss); the writes and truncations in between are kept in order:

* ``pwrite`` / ``truncate`` change the volatile image only;
* ``fdatasync`` / ``fsync`` make the file's volatile image durable;
* creating, renaming and unlinking a name (and ``mkdir``) change the volatile namespace
  only; ``fsync_dir(d)`` makes the pending name changes in ``d`` durable, in order.

:meth:`MemFS.crash` is a power loss (or a process crash), deterministic from a
``random.Random``:

* ``"drop"``: every unsynced change is lost;
* ``"keep"``: nothing is lost, everything reached the disk;
* ``"process"``: a process crash (SIGKILL): nothing is lost and nothing more is durable -
  the unsynced changes stay pending in the page cache, a later power loss can still drop
  them;
* ``"prefix"``: each file keeps a random prefix of its unsynced bytes, in write order
  (the last write kept may be cut anywhere); each directory a random prefix of its
  pending name changes (a journal replays in order);
* ``"pages"``: each 4 KiB page an unsynced write touched is independently new or old,
  the file size is either the old or the new one (unwritten space reads as zeros); names
  as in ``"prefix"``.

Afterwards every descriptor and lock is gone (reopen from scratch).  Fault injection:
:meth:`MemFS.corrupt` flips bits at rest (both images: bit rot), :meth:`MemFS.fail_next`
makes the next call(s) of an operation raise ``OSError`` (EIO by default).  A failed
``fsync``/``fdatasync`` behaves like Linux after a writeback error: the pending writes are
dropped from the durable future (the pages are "clean"), so a retry succeeds without
making them durable.

Crash points: with ``crash_at=k`` the ``k``-th mutating operation (0-based: ``create``,
``mkdir``, ``pwrite``, ``truncate``, ``fdatasync``, ``fsync``, ``replace``, ``unlink``,
``fsync_dir``) raises :class:`CrashPoint` instead of running; ``record=True`` keeps
``ops`` (name, path) of every mutating operation.  ``CrashPoint`` derives from
``BaseException`` so no ``except Exception`` / ``except OSError`` in the code under test
swallows it.

Paths are plain strings ("/n1/raft.log"); the root "/" always exists.  Everything is
deterministic: no clock, no global randomness, iteration in sorted order.
"""

from __future__ import annotations

import copy
import errno
import os
import random
from dataclasses import dataclass, field

from nebula.errors import StateError

PAGE = 4096
MODES = ("drop", "keep", "prefix", "pages", "process")


class CrashPoint(BaseException):
    """Raised by the operation at which a crash was armed (it did not run)."""


@dataclass(slots=True)
class _Inode:
    data: bytearray = field(default_factory=bytearray)  # volatile image
    durable: bytearray = field(default_factory=bytearray)
    # Unsynced changes in order: (offset, bytes) for a write, (size, None) for a truncate.
    pending: list[tuple[int, bytes | None]] = field(default_factory=list)


def _apply(img: bytearray, off: int, chunk: bytes | None) -> None:
    if chunk is None:
        if off < len(img):
            del img[off:]
        else:
            img.extend(bytes(off - len(img)))
        return
    if off > len(img):
        img.extend(bytes(off - len(img)))
    img[off : off + len(chunk)] = chunk


class _Lock:
    def __init__(self, fs: MemFS, path: str) -> None:
        self._fs, self._path, self._gen = fs, path, fs._gen

    def release(self) -> None:
        if self._fs._gen == self._gen:
            self._fs._locks.discard(self._path)


class MemFS:
    """In-memory :class:`~nebula.raft.storage.FileSystem` with crash semantics."""

    def __init__(self, *, record: bool = False, crash_at: int | None = None) -> None:
        self._inodes: dict[int, _Inode] = {}
        self._names: dict[str, int] = {}  # volatile namespace
        self._dur_names: dict[str, int] = {}
        self._dirs: set[str] = {"/"}
        self._dur_dirs: set[str] = {"/"}
        # Per directory, name changes not yet made durable by fsync_dir, in order.
        self._dir_pending: dict[str, list[tuple[str, str, str | int]]] = {}
        self._fds: dict[int, _Inode] = {}
        self._fd_paths: dict[int, str] = {}
        self._next_fd = 3
        self._next_ino = 1
        self._locks: set[str] = set()
        self._gen = 0
        self._fail: dict[str, list[int]] = {}
        self.record = record
        self.ops: list[tuple[str, str]] = []
        self.op_count = 0
        self.crash_at = crash_at
        self.crashes = 0

    # -- bookkeeping -------------------------------------------------------------------

    def _op(self, name: str, path: str) -> None:
        if self._fail:
            errs = self._fail.get(name)
            if errs:
                code = errs.pop(0)
                if not errs:
                    del self._fail[name]
                raise OSError(code, f"{os.strerror(code)} (injected into {name})", path)
        if self.crash_at is not None and self.op_count >= self.crash_at:
            raise CrashPoint(f"crash before operation {self.op_count}: {name} {path}")
        self.op_count += 1
        if self.record:
            self.ops.append((name, path))

    def _inode(self, fd: int) -> _Inode:
        try:
            return self._fds[fd]
        except KeyError:
            raise OSError(errno.EBADF, "bad file descriptor") from None

    @staticmethod
    def _norm(path: str) -> str:
        return os.path.normpath("/" + str(path).lstrip("/"))

    def _parent(self, path: str) -> str:
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", parent)
        return parent

    def _pend(self, directory: str, op: tuple[str, str, str | int]) -> None:
        self._dir_pending.setdefault(directory, []).append(op)

    # -- fault injection ---------------------------------------------------------------

    def fail_next(self, op: str, err: int = errno.EIO, count: int = 1) -> None:
        """The next ``count`` calls of ``op`` (e.g. ``"fdatasync"``) raise OSError(err)."""
        self._fail.setdefault(op, []).extend([err] * count)

    def corrupt(self, path: str, offset: int, mask: int = 0x01) -> None:
        """Flip the bits ``mask`` of the byte at ``offset`` in both images (bit rot)."""
        ino = self._inodes[self._names[self._norm(path)]]
        if offset >= len(ino.data):
            raise IndexError(f"{path}: offset {offset} beyond the file ({len(ino.data)} bytes)")
        ino.data[offset] ^= mask
        if offset < len(ino.durable):
            ino.durable[offset] ^= mask
        for i, (off, chunk) in enumerate(ino.pending):
            if chunk is not None and off <= offset < off + len(chunk):
                b = bytearray(chunk)
                b[offset - off] ^= mask
                ino.pending[i] = (off, bytes(b))

    def clone(self) -> MemFS:
        """An independent copy (same files, pending changes, counters and armed crash)."""
        return copy.deepcopy(self)

    def crash(self, rng: random.Random, mode: str = "drop") -> None:
        """Power loss, or a process crash (see the module docstring); every descriptor and
        lock is lost."""
        if mode not in MODES:
            raise ValueError(f"crash mode {mode!r} not in {MODES}")
        if mode == "process":
            self._lose_handles()
            return
        names = dict(self._dur_names)
        dirs = set(self._dur_dirs)
        for d in sorted(self._dir_pending):
            ops = self._dir_pending[d]
            if mode == "keep":
                k = len(ops)
            elif mode == "drop":
                k = 0
            else:
                k = rng.randint(0, len(ops))
            for op in ops[:k]:
                _apply_name_op(names, dirs, op)
        # A name whose directory did not survive is gone with it.
        for name in sorted(names):
            if os.path.dirname(name) not in dirs:
                del names[name]
        inodes: dict[int, _Inode] = {}
        for ino_id in sorted(set(names.values())):
            ino = self._inodes[ino_id]
            img = self._survivor(ino, rng, mode)
            inodes[ino_id] = _Inode(bytearray(img), bytearray(img), [])
        self._inodes = inodes
        self._names = names
        self._dur_names = dict(names)
        self._dirs = dirs
        self._dur_dirs = set(dirs)
        self._dir_pending = {}
        self._lose_handles()

    def _lose_handles(self) -> None:
        self._fds.clear()
        self._fd_paths.clear()
        self._locks.clear()
        self._gen += 1
        self.crash_at = None
        self.crashes += 1

    @staticmethod
    def _survivor(ino: _Inode, rng: random.Random, mode: str) -> bytearray:
        if not ino.pending or mode == "keep":
            return ino.data if mode == "keep" else ino.durable
        if mode == "drop":
            return ino.durable
        img = bytearray(ino.durable)
        if mode == "prefix":
            # A random prefix of the unsynced changes: bytes of writes, 1 per truncation.
            budget = rng.randint(0, sum(1 if c is None else len(c) for _, c in ino.pending))
            for off, chunk in ino.pending:
                if budget <= 0:
                    break
                if chunk is None:
                    _apply(img, off, None)
                    budget -= 1
                else:
                    _apply(img, off, chunk[:budget])
                    budget -= len(chunk)
            return img
        # pages
        pages: set[int] = set()
        low_trunc = None
        for off, chunk in ino.pending:
            if chunk is None:
                low_trunc = off if low_trunc is None else min(low_trunc, off)
            elif chunk:
                pages.update(range(off // PAGE, (off + len(chunk) - 1) // PAGE + 1))
        top = max(len(ino.data), len(ino.durable))
        if low_trunc is not None:
            pages.update(range(low_trunc // PAGE, (top - 1) // PAGE + 1))
        size = rng.choice((len(ino.durable), len(ino.data)))
        if len(img) > size:
            del img[size:]
        else:
            img.extend(bytes(size - len(img)))
        new = ino.data
        for p in sorted(pages):
            if rng.random() < 0.5:
                s, e = p * PAGE, min(p * PAGE + PAGE, size)
                if s >= e:
                    continue
                piece = new[s:e]
                img[s:e] = piece + bytes(e - s - len(piece))
        return img

    # -- inspection (tests) ------------------------------------------------------------

    def read(self, path: str) -> bytes:
        """The volatile content of ``path``."""
        return bytes(self._inodes[self._names[self._norm(path)]].data)

    def durable_content(self, path: str) -> bytes | None:
        """What ``path`` would hold after a ``drop`` crash (None: the name would be gone)."""
        ino = self._dur_names.get(self._norm(path))
        return None if ino is None else bytes(self._inodes[ino].durable)

    def listdir(self, path: str) -> list[str]:
        d = self._norm(path)
        return sorted(os.path.basename(n) for n in self._names if os.path.dirname(n) == d)

    def set_content(self, path: str, data: bytes) -> None:
        """Replace a file's content in both images (tests forging a file)."""
        ino = self._inodes[self._names[self._norm(path)]]
        ino.data = bytearray(data)
        ino.durable = bytearray(data)
        ino.pending = []

    # -- FileSystem --------------------------------------------------------------------

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        path = self._norm(path)
        if path in self._dirs:
            return
        if path in self._names:
            raise FileExistsError(errno.EEXIST, "a file of that name exists", path)
        parent = os.path.dirname(path)
        self.makedirs(parent, mode)
        self._op("mkdir", path)
        self._dirs.add(path)
        self._pend(parent, ("mkdir", path, 0))
        # Durable like the real makedirs: the parent is fsync'ed.
        self.fsync_dir(parent)

    def lock(self, path: str, what: str) -> _Lock:
        path = self._norm(path)
        if path in self._locks:
            raise StateError(f"{what} is in use by another holder (lock file {path})")
        self._locks.add(path)
        return _Lock(self, path)

    def exists(self, path: str) -> bool:
        path = self._norm(path)
        return path in self._names or path in self._dirs

    def open(self, path: str, create: bool = False) -> int:
        path = self._norm(path)
        ino_id = self._names.get(path)
        if ino_id is None:
            if not create:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            parent = self._parent(path)
            self._op("create", path)
            ino_id = self._next_ino
            self._next_ino += 1
            self._inodes[ino_id] = _Inode()
            self._names[path] = ino_id
            self._pend(parent, ("link", path, ino_id))
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = self._inodes[ino_id]
        self._fd_paths[fd] = path
        return fd

    def close(self, fd: int) -> None:
        self._inode(fd)
        del self._fds[fd]
        del self._fd_paths[fd]

    def size(self, fd: int) -> int:
        return len(self._inode(fd).data)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return bytes(self._inode(fd).data[offset : offset + n])

    def read_all(self, fd: int) -> bytes:
        return bytes(self._inode(fd).data)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        ino = self._inode(fd)
        self._op("pwrite", self._fd_paths[fd])
        chunk = bytes(data)
        _apply(ino.data, offset, chunk)
        ino.pending.append((offset, chunk))

    def truncate(self, fd: int, size: int) -> None:
        ino = self._inode(fd)
        self._op("truncate", self._fd_paths[fd])
        _apply(ino.data, size, None)
        ino.pending.append((size, None))

    def _sync(self, name: str, fd: int) -> None:
        ino = self._inode(fd)
        try:
            self._op(name, self._fd_paths[fd])
        except OSError:
            ino.pending = []  # writeback error: the dirty pages are dropped, never durable
            raise
        for off, chunk in ino.pending:
            _apply(ino.durable, off, chunk)
        ino.pending = []

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    def replace(self, src: str, dst: str) -> None:
        src, dst = self._norm(src), self._norm(dst)
        if src not in self._names:
            raise FileNotFoundError(errno.ENOENT, "no such file", src)
        d = self._parent(dst)
        if os.path.dirname(src) != d:
            raise OSError(errno.EXDEV, "MemFS renames within one directory only", src)
        self._op("replace", dst)
        self._names[dst] = self._names.pop(src)
        self._pend(d, ("rename", src, dst))

    def unlink(self, path: str) -> None:
        path = self._norm(path)
        if path not in self._names:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        self._op("unlink", path)
        del self._names[path]
        self._pend(os.path.dirname(path), ("unlink", path, 0))

    def fsync_dir(self, path: str) -> None:
        path = self._norm(path)
        if path not in self._dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        self._op("fsync_dir", path)
        for op in self._dir_pending.pop(path, ()):
            _apply_name_op(self._dur_names, self._dur_dirs, op)

    def read_file(self, path: str) -> bytes:
        path = self._norm(path)
        if path not in self._names:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return bytes(self._inodes[self._names[path]].data)

    def write_file_durably(self, path: str, data: bytes) -> None:
        """The steps of :func:`nebula.durable.write_file_durably`, each a crash point."""
        path = self._norm(path)
        tmp = path + ".tmp"
        fd = self.open(tmp, create=True)
        try:
            self.truncate(fd, 0)
            self.pwrite(fd, data, 0)
            self.fsync(fd)
        finally:
            if fd in self._fds:
                self.close(fd)
        self.replace(tmp, path)
        self.fsync_dir(os.path.dirname(path))


def _apply_name_op(names: dict[str, int], dirs: set[str], op: tuple[str, str, str | int]) -> None:
    kind, a, b = op
    if kind == "link":
        assert isinstance(b, int)
        names[a] = b
    elif kind == "rename":
        assert isinstance(b, str)
        if a in names:
            names[b] = names.pop(a)
    elif kind == "unlink":
        names.pop(a, None)
    elif kind == "mkdir":
        dirs.add(a)
