"""Compiled kernels and their pure-Python twins.

Each kernel ``X`` lives as ``nebula/_fast/_X.pyx`` (compiled by setup.py) next to its
pure twin ``nebula/_fast/X_py.py``.  ``load(name)`` returns the compiled module
unless ``NEBULA_PURE=1`` is set or the extension is missing; ``COMPILED`` tells
which one each kernel resolved to.  Set ``NEBULA_REQUIRE_COMPILED=1`` to make a
missing extension an error (the test suite does this in CI).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

KERNELS = ("keccak", "frame", "pb", "cmd")

FORCE_PURE = os.environ.get("NEBULA_PURE") == "1"
REQUIRE_COMPILED = os.environ.get("NEBULA_REQUIRE_COMPILED") == "1"

COMPILED: dict[str, bool] = {}


def load_pure(name: str) -> ModuleType:
    return importlib.import_module(f"nebula._fast.{name}_py")


def load_compiled(name: str) -> ModuleType:
    return importlib.import_module(f"nebula._fast._{name}")


def load(name: str) -> ModuleType:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}")
    if FORCE_PURE:
        COMPILED[name] = False
        return load_pure(name)
    try:
        mod = load_compiled(name)
    except ImportError:
        if REQUIRE_COMPILED:
            raise
        COMPILED[name] = False
        return load_pure(name)
    COMPILED[name] = True
    return mod
