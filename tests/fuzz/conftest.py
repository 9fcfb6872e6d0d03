"""Hypothesis profiles for the fuzz suite and the helpers its tests share.

``HYPOTHESIS_PROFILE`` picks the budget (default ``ci``):

* ``ci``   - small per-test budgets; the whole ``tests/fuzz`` directory runs in well under
  a minute.  Per-example deadline 1 s: these calls take micro- to milliseconds, so a slow
  example means a super-linear path, i.e. a potential hang.
* ``long`` - every budget times ``LONG_SCALE`` (minutes to tens of minutes), deadline 10 s.

The profile is applied by :func:`fuzz_settings` to the fuzz tests only; it is not loaded
globally, so the other hypothesis tests of the session keep their own settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from nebula import _fast
from nebula.errors import NebulaError

LONG_SCALE = 50

_COMMON: dict[str, Any] = {
    # kernel_impl is a plain string and monkeypatching is per test, not per example,
    # so reusing function-scoped fixtures across examples is harmless here.
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    "print_blob": True,
}

settings.register_profile("ci", deadline=timedelta(seconds=1), **_COMMON)
settings.register_profile("long", deadline=timedelta(seconds=10), **_COMMON)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    PROFILE = "ci"  # another suite's profile name: the fuzz tests keep the CI budget
SCALE = LONG_SCALE if PROFILE == "long" else 1


def fuzz_settings(examples: int) -> settings:
    """The selected profile with a budget of ``examples`` (times LONG_SCALE when long)."""
    return settings(settings.get_profile(PROFILE), max_examples=examples * SCALE)


def both_kernels(name: str) -> tuple[ModuleType, ModuleType]:
    """(compiled, pure) modules of kernel ``name``; skips when the extension is not built."""
    try:
        compiled = _fast.load_compiled(name)
    except ImportError:
        if _fast.REQUIRE_COMPILED:
            raise
        pytest.skip("compiled kernels not built")
    return compiled, _fast.load_pure(name)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("error", exception class)`` for a NebulaError.

    Any other exception propagates and fails the test: the only exceptions input from a
    peer or a config file may cause are NebulaError subclasses.  Every NebulaError must
    carry a message.
    """
    try:
        return "ok", fn(*args)
    except NebulaError as exc:
        if not str(exc).strip():
            raise AssertionError(f"{type(exc).__name__} without a message") from exc
        return "error", type(exc)


def mutations(base: bytes, random_size: int = 200) -> st.SearchStrategy[bytes]:
    """Damaged copies of ``base`` (a hypothesis strategy): random bytes, a byte flipped,
    truncated, or extended."""
    return st.one_of(
        st.binary(max_size=random_size),
        st.integers(0, len(base) - 1).flatmap(
            lambda i: st.integers(1, 255).map(
                lambda x: base[:i] + bytes([base[i] ^ x]) + base[i + 1 :]
            )
        ),
        st.integers(0, len(base) - 1).map(lambda i: base[:i]),
        st.binary(min_size=1, max_size=16).map(lambda tail: base + tail),
    )
