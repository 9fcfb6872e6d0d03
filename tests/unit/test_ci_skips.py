"""Under CI=true a skipped test fails (tests/conftest.py), except the allowed skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_REPO = Path(__file__).resolve().parents[2]
_CONFTEST = _REPO / "tests" / "conftest.py"


@pytest.mark.parametrize("ci", ["true", None])
def test_skips_fail_under_ci_unless_allowed(pytester: pytest.Pytester, monkeypatch, ci) -> None:
    pytester.makeconftest(_CONFTEST.read_text())
    pytester.makepyfile(
        test_it="""
        import pytest
        def test_missing_tool():
            pytest.skip("Go is not installed")
        def test_allowed():
            pytest.skip("OpenSSL has no RIPEMD-160 here")
        def test_runs():
            pass
        """
    )
    # The conftest imports tests.support (the pytester directory is not the repository).
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])
    )
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_subprocess("-q")
    if ci:
        result.assert_outcomes(passed=1, skipped=1, failed=1)
        result.stdout.fnmatch_lines(["*skipped under CI=true*Go is not installed*"])
    else:
        result.assert_outcomes(passed=1, skipped=2)
