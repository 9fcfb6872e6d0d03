"""The compiled kernels are the ones loaded, and each has a pure twin."""

from __future__ import annotations

import importlib.machinery
import os

import pytest

from nebula import _fast


@pytest.mark.parametrize("name", _fast.KERNELS)
def test_every_kernel_has_a_pure_twin(name) -> None:
    mod = _fast.load_pure(name)
    assert mod.__file__ is not None and mod.__file__.endswith(f"{name}_py.py")


@pytest.mark.parametrize("name", _fast.KERNELS)
def test_compiled_kernel_is_an_extension_module(name) -> None:
    try:
        mod = _fast.load_compiled(name)
    except ImportError:
        if _fast.REQUIRE_COMPILED:
            raise
        pytest.skip("extensions not built (set NEBULA_REQUIRE_COMPILED=1 to require them)")
    assert mod.__file__ is not None
    assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


@pytest.mark.skipif(os.environ.get("NEBULA_REQUIRE_COMPILED") != "1", reason="not required here")
def test_selector_picks_compiled_when_required() -> None:
    for name in _fast.KERNELS:
        _fast.load(name)
    assert _fast.COMPILED == dict.fromkeys(_fast.KERNELS, True)
    # The public modules use the compiled kernels.
    from nebula import proto
    from nebula.crypto import merlin, secretconn

    assert proto is not None and merlin is not None and secretconn is not None
    assert all(_fast.COMPILED.values())


def test_force_pure_switch_is_honoured(monkeypatch) -> None:
    monkeypatch.setattr(_fast, "FORCE_PURE", True)
    for name in _fast.KERNELS:
        assert _fast.load(name) is _fast.load_pure(name)
