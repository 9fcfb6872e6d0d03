"""One loader for the test vectors in ``tests/vectors/*.json`` (provenance: its README).

Tests never copy hex by hand: they call ``load("sign_bytes")`` and use the data.
The vectors live in the repository; nothing is read from outside it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

_DIR = Path(__file__).resolve().parent.parent / "vectors"


def vectors_dir() -> Path:
    return _DIR


@functools.cache
def load(name: str) -> Any:
    path = vectors_dir() / f"{name}.json"
    with path.open() as f:
        return json.load(f)


def h(s: str) -> bytes:
    return bytes.fromhex(s)
