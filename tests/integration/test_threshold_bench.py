"""`nebula bench --local 3 --key-type bls12381 --threshold 2`: the same bench, each node
holding one share of a 2-of-3 split key; every signature verified by the bench client."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.nebula_proc import REPO_ROOT


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "bench", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_bench_a_2_of_3_threshold_cluster() -> None:
    p = _bench(
        "--local", "3", "--key-type", "bls12381", "--threshold", "2",
        "-n", "120", "--warmup", "20", "--handshakes", "0", "--json",
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["setup"]["mode"] == "local 3 nodes, 2-of-3 threshold BLS"
    assert out["errors"] == 0 and out["warmup_errors"] == 0
    assert out["requests"] == 120 and out["signatures_verified"] >= 120
    # The signature is made after the commit: combining and verifying the shares (a
    # pairing check, hundreds of microseconds) is the "sign" phase, not "replicate".
    ph = out["phases_mean_ms"]
    assert ph["sign"] > 0.05 and ph["replicate"] > 0.05, ph
    assert ph["sign"] + ph["replicate"] < ph["total"], ph


def test_bench_threshold_needs_bls_and_a_cluster() -> None:
    for args in (
        ["--local", "3", "--threshold", "2"],  # ed25519
        ["--local", "1", "--key-type", "bls12381", "--threshold", "1"],
    ):
        p = _bench(*args, "-n", "5", "--warmup", "0", "--handshakes", "0")
        assert p.returncode != 0
        assert "--threshold needs --key-type bls12381" in p.stderr
