"""Shared pytest configuration."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nebula import _fast
from tests.support.standalone import OutsideRepoAudit, temp_away_from

_REPO = Path(__file__).resolve().parent.parent
# A checkout in the temporary directory itself (``git clone . "$(mktemp -d)"``): temporary
# files go elsewhere, so that the audit below can still refuse what lies beside it.
temp_away_from(_REPO)
#: Every ``open`` of a file beside the checkout fails, and so does the session: a clone of
#: the repository alone must pass its own tests (tests/support/standalone.py).
_AUDIT = OutsideRepoAudit(_REPO).install()

#: Skips that lose no capability (the pure RIPEMD-160 fallback is then what runs and is
#: tested).  Under ``CI=true`` every other skip is a failure: a required test that does
#: not run proves nothing (a missing Go toolchain, unbuilt kernels, ...).
_SKIPS_ALLOWED_IN_CI = ("OpenSSL has no RIPEMD-160 here",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("CI") != "true":
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(ok in reason for ok in _SKIPS_ALLOWED_IN_CI):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every required test: {reason}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _AUDIT.violations:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _AUDIT.violations:
        terminalreporter.section("opened outside the repository", red=True)
        for path in sorted(set(_AUDIT.violations)):
            terminalreporter.line(f"{path}  (a fresh clone has nothing beside it)")


@pytest.fixture
def production_recursion_limit() -> Iterator[None]:
    """The interpreter's default recursion limit (1000), as ``nebula start`` runs with,
    for tests that feed input nested past it: py_ecc (imported by some tests) raises it
    to 100000 for the whole session, and JSON that deep then overflows the C stack of
    the JSON decoders (a segfault) instead of raising RecursionError."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


@pytest.fixture(params=["compiled", "pure"])
def kernel_impl(request: pytest.FixtureRequest) -> str:
    """Parametrise a test over both implementations of every kernel."""
    if request.param == "compiled":
        try:
            for name in _fast.KERNELS:
                _fast.load_compiled(name)
        except ImportError:
            if _fast.REQUIRE_COMPILED:
                raise
            pytest.skip("compiled kernels not built")
    return request.param


def kernel(name: str, impl: str):
    """The module implementing kernel ``name`` in implementation ``impl``."""
    return _fast.load_compiled(name) if impl == "compiled" else _fast.load_pure(name)
