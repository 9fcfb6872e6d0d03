"""nebula/durable.py: the durable-write steps every store and key writer uses."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nebula import durable
from nebula.errors import StateError


def test_pwrite_all_writes_everything_at_the_offset(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10)
    fd = os.open(p, os.O_RDWR)
    try:
        durable.pwrite_all(fd, memoryview(b"abc" * 100_000), 5)
        assert durable.read_all(fd) == b"xxxxx" + b"abc" * 100_000
    finally:
        os.close(fd)


def test_pwrite_all_that_makes_no_progress_is_an_io_error(tmp_path: Path, monkeypatch) -> None:
    """A pwrite that writes nothing must not loop forever (raft.py's copy lacked this)."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: 0)
    try:
        with pytest.raises(OSError) as ei:
            durable.pwrite_all(fd, b"abc", 0)
        assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)


@pytest.mark.parametrize("overwrite", [True, False])
def test_write_file_durably_is_exactly_0600_and_leaves_no_temp(tmp_path: Path, overwrite) -> None:
    old = os.umask(0)
    try:
        durable.write_file_durably(tmp_path / "f", b"data", overwrite=overwrite)
    finally:
        os.umask(old)
    assert (tmp_path / "f").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_write_file_durably_replaces_or_refuses(tmp_path: Path) -> None:
    p = tmp_path / "f"
    durable.write_file_durably(p, b"one")
    durable.write_file_durably(p, b"two")
    assert p.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        durable.write_file_durably(p, b"three", overwrite=False)
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_write_file_durably_failure_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "f"
    durable.write_file_durably(p, b"old")

    def boom(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        durable.write_file_durably(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_exclusive_lock_names_the_holder_across_processes(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from nebula.durable import ExclusiveLock\n"
            f"lock = ExclusiveLock({str(lock_path)!r}, 'thing')\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(StateError) as ei:
            durable.ExclusiveLock(lock_path, "the thing")
        assert f"pid {child.pid}" in str(ei.value) and str(lock_path) in str(ei.value)
        assert "the thing is in use by another process" in str(ei.value)
    finally:
        child.communicate("", timeout=30)
    lock = durable.ExclusiveLock(lock_path, "the thing")  # released by the holder's exit
    assert lock_path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(StateError, match="in use by this process already"):
        durable.ExclusiveLock(lock_path, "the thing")
    lock.release()
    durable.ExclusiveLock(lock_path, "the thing").release()
