"""Shared pytest configuration."""

from __future__ import annotations

import pytest

from nebula import _fast


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
