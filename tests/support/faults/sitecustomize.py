"""Process-level fault hooks for chaos tests, loaded by Python at start-up (``site``).

Put this directory first on ``PYTHONPATH`` of a child process and set
``NEBULA_FAULTS_DIR``; without that variable nothing is changed. With it:

* ``os.fsync`` / ``os.fdatasync`` sleep for the milliseconds written in
  ``$NEBULA_FAULTS_DIR/fsync_delay_ms`` before doing the real call (a slow disk);
* ``time.time`` / ``time.time_ns`` add the seconds written in
  ``$NEBULA_FAULTS_DIR/clock_offset_s`` (a wall-clock jump; monotonic clocks cannot jump,
  so they are left alone).

The files are re-read at most every 100 ms (so a fault takes effect within ~0.1 s); a
missing or unparsable file means 0. On start-up the hook writes its pid to
``$NEBULA_FAULTS_DIR/active``, so a harness can check that the hooks are really in place
(a fault that silently does nothing would make a chaos test that cannot fail).

Production code is not touched: only processes started with this environment see it.
"""

from __future__ import annotations

import os
import threading
import time

_REREAD_S = 0.1


class _Knob:
    """A number in a file, re-read at most every ``_REREAD_S`` seconds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.value = 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._mono = time.monotonic

    def get(self) -> float:
        now = self._mono()
        if now < self._next:
            return self.value
        with self._lock:
            if now >= self._next:
                try:
                    with open(self.path, "rb") as f:
                        raw = f.read(64)
                    self.value = float(raw.strip() or b"0")
                except (OSError, ValueError):
                    self.value = 0.0
                self._next = now + _REREAD_S
        return self.value


def _install(faults_dir: str) -> None:
    fsync_delay = _Knob(os.path.join(faults_dir, "fsync_delay_ms"))
    clock_offset = _Knob(os.path.join(faults_dir, "clock_offset_s"))
    sleep = time.sleep
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    real_time, real_time_ns = time.time, time.time_ns

    def fsync(fd):  # type: ignore[no-untyped-def]
        ms = fsync_delay.get()
        if ms > 0:
            sleep(ms / 1000.0)
        return real_fsync(fd)

    def fdatasync(fd):  # type: ignore[no-untyped-def]
        ms = fsync_delay.get()
        if ms > 0:
            sleep(ms / 1000.0)
        return real_fdatasync(fd)

    def time_() -> float:
        return real_time() + clock_offset.get()

    def time_ns() -> int:
        return real_time_ns() + int(clock_offset.get() * 1_000_000_000)

    os.fsync = fsync
    os.fdatasync = fdatasync
    time.time = time_
    time.time_ns = time_ns
    try:
        tmp = os.path.join(faults_dir, f".active.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(faults_dir, "active"))
    except OSError:
        pass


_DIR = os.environ.get("NEBULA_FAULTS_DIR")
if _DIR:
    _install(_DIR)
