"""The repository stands alone: opening a file beside the checkout fails the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.standalone import OpenedOutsideRepository, OutsideRepoAudit

pytest_plugins = ["pytester"]

_REPO = Path(__file__).resolve().parents[2]
_CONFTEST = _REPO / "tests" / "conftest.py"


def test_only_paths_beside_the_repository_are_outside(tmp_path: Path) -> None:
    repo = tmp_path / "work" / "nebula"
    (repo / "tests" / "vectors").mkdir(parents=True)
    (tmp_path / "work" / "shared" / "vectors").mkdir(parents=True)
    cache = tmp_path / "work" / "cache"
    audit = OutsideRepoAudit(repo, allowed=[str(cache)])
    assert not audit.outside(repo / "tests" / "vectors" / "sign_bytes.json")
    assert not audit.outside(str(repo))
    assert not audit.outside(cache / "x")  # an allowed place under the parent
    assert not audit.outside("/etc/hostname")  # not beside the repository at all
    assert audit.outside(tmp_path / "work" / "shared" / "vectors" / "sign_bytes.json")
    assert audit.outside(repo / ".." / "shared" / "x")  # `..` is resolved
    assert audit.outside(
        os.fsencode(tmp_path / "work" / "nebula-old" / "x")
    )  # a prefix is not inside
    # A symlink inside the repository that points beside it is outside.
    (repo / "tests" / "vectors" / "link").symlink_to(tmp_path / "work" / "shared" / "vectors")
    assert audit.outside(repo / "tests" / "vectors" / "link" / "sign_bytes.json")
    # An allowed place that holds the repository (a checkout in /tmp) exempts nothing.
    wide = OutsideRepoAudit(repo, allowed=[str(tmp_path)])
    assert wide.outside(tmp_path / "work" / "shared" / "vectors" / "sign_bytes.json")


def test_hook_refuses_and_records(tmp_path: Path) -> None:
    repo = tmp_path / "nebula"
    repo.mkdir()
    audit = OutsideRepoAudit(repo, allowed=[])
    audit.hook("open", (str(repo / "ok"), "r", 0))
    audit.hook("open", (3, "r", 0))  # a descriptor: nothing to check
    audit.hook("socket.connect", (None, ("127.0.0.1", 1)))
    with pytest.raises(OpenedOutsideRepository, match="outside the repository"):
        audit.hook("open", (str(tmp_path / "shared" / "v.json"), "r", 0))
    assert audit.violations == [str(tmp_path / "shared" / "v.json")]


def test_session_fails_when_a_test_reads_beside_the_checkout(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real conftest, in a checkout with a `shared/` beside it: a test that reads it
    fails, and so does the session even when the test swallowed the error."""
    checkout = pytester.path / "checkout"
    (checkout / "tests").mkdir(parents=True)
    shared = pytester.path / "shared"
    shared.mkdir()
    (shared / "v.json").write_text("{}")
    (checkout / "tests" / "conftest.py").write_text(_CONFTEST.read_text())
    (checkout / "tests" / "test_it.py").write_text(
        "import contextlib, pathlib\n"
        "HERE = pathlib.Path(__file__).resolve().parent\n"
        "def test_inside():\n"
        "    (HERE / 'data.txt').write_text('x')\n"
        "    assert (HERE / 'data.txt').read_text() == 'x'\n"
        "def test_beside():\n"
        "    (HERE.parent.parent / 'shared' / 'v.json').read_text()\n"
        "def test_beside_swallowed():\n"
        "    with contextlib.suppress(Exception):\n"
        "        (HERE.parent.parent / 'shared' / 'v.json').read_text()\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.chdir(checkout)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", str(checkout / "tests"))
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*OpenedOutsideRepository*", "*opened outside the repository*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_temporary_files_move_away_from_a_checkout_in_the_temporary_directory(
    tmp_path: Path, monkeypatch
) -> None:
    import tempfile

    from tests.support import standalone

    fake_tmp = tmp_path / "tmp"
    elsewhere = tmp_path / "elsewhere"
    repo = fake_tmp / "tmp.abc123"
    for d in (repo, elsewhere):
        d.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(fake_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(standalone, "TEMP_CANDIDATES", (str(fake_tmp), str(elsewhere)))
    # a checkout elsewhere: nothing moves
    assert standalone.temp_away_from(elsewhere / "x") is None
    assert tempfile.gettempdir() == str(fake_tmp)
    # a checkout in the temporary directory: temporary files go to the first candidate
    # that does not hold it, and the audit then exempts them while refusing the rest
    moved = standalone.temp_away_from(repo)
    assert moved == os.path.realpath(elsewhere)
    assert tempfile.gettempdir() == moved and os.environ["TMPDIR"] == moved
    audit = standalone.OutsideRepoAudit(repo)
    assert audit.outside(fake_tmp / "shared" / "x.json")
    assert not audit.outside(repo / "tests" / "x")
