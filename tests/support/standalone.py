"""The repository stands alone: no test may open a file beside the checkout.

A clone of the repository, alone on a machine, must pass its own tests. Material that
lives next to a working copy (a ``../shared`` directory, a sibling checkout) is exactly
what a fresh clone lacks, so reading it makes a test pass here and fail there.

:class:`OutsideRepoAudit` is a ``sys.addaudithook`` hook on the ``open`` event (every
``open``, ``os.open`` and module load goes through it). A path under the repository's
parent directory that is neither inside the repository nor under a place every machine
has (the temporary directory, the Python installation, the user's caches) is refused:
the ``open`` raises :class:`OpenedOutsideRepository`, and the path is recorded so the
test session fails even where the code under test swallowed the exception.

tests/conftest.py installs it for the whole suite, after :func:`temp_away_from` has made
sure the temporary directory is not the one the checkout sits in (a clone made with
``mktemp -d`` lives directly in ``/tmp``: every temporary file would then be "beside" it).
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path


class OpenedOutsideRepository(RuntimeError):
    """A test opened a file beside the repository, which a fresh clone does not have."""


def _dirs_every_machine_has() -> list[str]:
    home = Path.home()
    out = [
        tempfile.gettempdir(),
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        *site.getsitepackages(),
        site.getusersitepackages(),
        *(sysconfig.get_paths().values()),
        # the user's caches and settings (CometBFT builds, Go, matplotlib, requests)
        str(home / ".cache"),
        str(home / ".config"),
        str(home / ".local"),
        str(home / "go"),
        str(home / ".netrc"),
    ]
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "NEBULA_CMT_CACHE", "GOPATH", "GOCACHE"):
        if os.environ.get(var):
            out.append(os.environ[var])
    return out


#: Where temporary files go when the temporary directory holds the checkout.  Short paths:
#: Unix socket paths under pytest's ``tmp_path`` must stay below 108 bytes.
TEMP_CANDIDATES = ("/var/tmp", "/tmp", "/dev/shm")


def temp_away_from(repo: str | os.PathLike[str]) -> str | None:
    """If the temporary directory holds ``repo``, point ``TMPDIR`` (this process, its
    children and :mod:`tempfile`) at a candidate that does not; the new one, or None."""
    real = os.path.realpath(repo)
    cur = os.path.realpath(tempfile.gettempdir())
    if not (real == cur or real.startswith(cur.rstrip(os.sep) + os.sep)):
        return None
    for cand in TEMP_CANDIDATES:
        c = os.path.realpath(cand)
        if real.startswith(c.rstrip(os.sep) + os.sep) or not os.path.isdir(c):
            continue
        if os.access(c, os.W_OK | os.X_OK):
            os.environ["TMPDIR"] = c
            tempfile.tempdir = None  # re-read TMPDIR
            return c
    return None


class OutsideRepoAudit:
    """Refuse and record every ``open`` of a path beside ``repo`` (see module docstring)."""

    def __init__(self, repo: str | os.PathLike[str], allowed: Iterable[str] | None = None):
        self.repo = os.path.realpath(repo)
        self.parent = os.path.dirname(self.repo)
        dirs = _dirs_every_machine_has() if allowed is None else list(allowed)
        # A place that holds the repository itself (a checkout in the temporary
        # directory) would exempt everything beside it: it exempts nothing.
        roots = (os.path.realpath(d) for d in dirs if d)
        self.allowed = (self.repo, *(r for r in roots if not self._under(self.repo, r)))
        self.violations: list[str] = []

    @staticmethod
    def _under(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

    def outside(self, path: str | bytes | os.PathLike[str]) -> bool:
        """True if opening ``path`` reads from beside the repository."""
        p = os.path.realpath(os.fsdecode(path))
        if not self._under(p, self.parent):
            return False
        return not any(self._under(p, root) for root in self.allowed)

    def hook(self, event: str, args: tuple) -> None:
        if event != "open":
            return
        path = args[0]
        if not isinstance(path, str | bytes | os.PathLike):
            return  # a file descriptor
        if self.outside(path):
            shown = os.fsdecode(path)
            self.violations.append(shown)
            raise OpenedOutsideRepository(
                f"opened {shown}, outside the repository {self.repo}: a fresh clone has "
                "nothing beside it; keep what the tests need inside the repository"
            )

    def install(self) -> OutsideRepoAudit:
        sys.addaudithook(self.hook)
        return self
