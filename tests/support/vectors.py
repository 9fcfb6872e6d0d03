"""One loader for the shared test vectors (../shared/vectors/*.json).

Tests never copy hex by hand: they call ``load("sign_bytes")`` and use the data.
The directory can be overridden with NEBULA_VECTORS_DIR.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]


def vectors_dir() -> Path:
    env = os.environ.get("NEBULA_VECTORS_DIR")
    if env:
        return Path(env)
    return _ROOT.parent / "shared" / "vectors"


@functools.cache
def load(name: str) -> Any:
    path = vectors_dir() / f"{name}.json"
    with path.open() as f:
        return json.load(f)


def h(s: str) -> bytes:
    return bytes.fromhex(s)
