"""The sign-state command kernel, compiled vs pure twin (pytest-benchmark).

Every member applies every committed signing decision through ``apply`` (decode the log
command, the guard's check-and-set); the leader encodes each decision with
``encode_signed``.  Run timed with ``python -m pytest benches/bench_cmd.py
--benchmark-enable -q``; the normal suite runs each once as a smoke test.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import pytest

from nebula import _fast
from nebula.guard import SignRecord, Verdict

CHAIN = b"cosmoshub-4"
# A precommit's canonical sign bytes are ~150 bytes; an Ed25519 signature is 64.
RECORD = SignRecord(23_456_789, 0, 3, b"\x11" * 150, b"")
SIGNATURE = b"\x5a" * 64


@pytest.fixture(params=["compiled", "pure"])
def cmd(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "pure":
        return _fast.load_pure("cmd")
    try:
        return _fast.load_compiled("cmd")
    except ImportError:
        if _fast.REQUIRE_COMPILED:
            raise
        pytest.skip("compiled kernels not built")


def test_bench_apply_accept(benchmark, cmd: ModuleType) -> None:
    """One committed SIGN entry above the stored record (the steady state)."""
    datas = [
        cmd.encode_signed(1, CHAIN, dataclasses.replace(RECORD, height=h), SIGNATURE, b"")
        for h in range(1, 200_001)
    ]
    it = iter(datas)
    states: dict[bytes, SignRecord] = {}

    def one() -> object:
        return cmd.apply(states, next(it))

    decision = benchmark.pedantic(one, rounds=2_000, iterations=50, warmup_rounds=1)
    assert decision.verdict == Verdict.ACCEPT and decision.record.signature == SIGNATURE
    assert states[CHAIN] == decision.record


def test_bench_encode_signed(benchmark, cmd: ModuleType) -> None:
    data = benchmark(cmd.encode_signed, 1, CHAIN, RECORD, SIGNATURE, b"")
    pure = _fast.load_pure("cmd")
    assert pure.decode_command(data) == (
        1,
        CHAIN,
        dataclasses.replace(RECORD, signature=SIGNATURE),
    )
