"""Shared plumbing of the atheris harnesses: paths, seed corpora, outcomes.

Each harness is ``python fuzz/atheris/fuzz_<target>.py [libFuzzer flags] [corpus dirs]``.
Without a corpus directory on the command line, ``run`` writes the harness's seeds (built
from the test vectors through tests/support/vectors.py, or from ``nebula init``'s
templates) into ``fuzz/atheris/corpus/<target>/`` and fuzzes that directory, so new
inputs accumulate there between runs.  Crashing inputs go to
``fuzz/atheris/artifacts/<target>/`` unless ``-artifact_prefix`` is given, and an input
that runs for more than 10 s is reported as a hang unless ``-timeout`` is given.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # nebula and tests.support without an install

import atheris  # noqa: E402

from nebula.errors import NebulaError  # noqa: E402


class Disagreement(AssertionError):
    """The compiled kernel and the pure twin (or a model) disagree: a bug."""


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("error", class)`` for a NebulaError; anything else escapes.

    An escaping exception is what atheris reports as a crash, with the input saved.
    """
    try:
        return "ok", fn(*args)
    except NebulaError as exc:
        if not str(exc).strip():
            raise AssertionError(f"{type(exc).__name__} without a message") from exc
        return "error", type(exc)


def agree(compiled: tuple[str, Any], pure: tuple[str, Any], what: str) -> tuple[str, Any]:
    if compiled != pure:
        raise Disagreement(f"{what}: compiled {compiled!r} != pure {pure!r}")
    return pure


def write_seeds(name: str, seeds: Iterable[bytes]) -> Path:
    corpus = HERE / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)
    return corpus


def run(name: str, test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    """Run libFuzzer on ``test_one_input``; seed ``corpus/<name>`` unless inputs are given."""
    argv = list(sys.argv)
    if not any(arg.startswith("-timeout=") for arg in argv):
        argv.insert(1, "-timeout=10")  # one input taking 10 s is a hang: report it
    if not any(arg.startswith("-artifact_prefix=") for arg in argv):
        artifacts = HERE / "artifacts" / name
        artifacts.mkdir(parents=True, exist_ok=True)
        argv.insert(1, f"-artifact_prefix={artifacts}/")  # crash-*, timeout-* land here
    if not any(not arg.startswith("-") for arg in argv[1:]):
        argv.append(str(write_seeds(name, seeds)))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
