"""Raft commit latency on a 3-node cluster of real processes on 127.0.0.1.

Each node is a ``tests/support/raftnode.py`` process (uvloop, durable journal with
fdatasync, ChaCha20-Poly1305 transport, 170-byte sign records).  The leader runs
``n`` sequential commits in-process and reports per-commit latency, so the numbers
exclude the harness' control channel; p50/p99 land in ``extra_info``, with the CPU
time (user + system, from ``/proc``) every member spent per commit.

Run timed with ``python -m pytest benches/bench_raft.py --benchmark-enable -s``
(``NEBULA_BENCH_RAFT_N`` sets the number of commits per round, default 300); the
normal suite runs it once as a smoke test.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from nebula.bench.stats import cpu_seconds
from tests.support.raftnode import Cluster

N = int(os.environ.get("NEBULA_BENCH_RAFT_N", "300"))


@pytest.mark.parametrize("driver", ["loop", "thread"])
def test_bench_raft_commit_3_processes(benchmark, tmp_path: Path, driver: str) -> None:
    cluster = Cluster(tmp_path, 3, store={"driver": driver})
    try:
        cluster.start()
        leader = cluster.wait_leader(timeout=15)
        heights = itertools.count(1, N)
        leader.request("bench", n=min(N, 100), start=next(heights), timeout=60)  # warm-up
        runs: list[dict] = []

        pids = {
            ("leader" if n is leader else f"follower {n.node_id}"): n.proc.pid
            for n in cluster.live()
        }
        cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}

        def run() -> dict:
            out = leader.request("bench", n=N, start=next(heights), timeout=120)
            runs.append(out)
            return out

        out = benchmark.pedantic(run, rounds=1, iterations=1)
        cpu_ms = {}
        for k, pid in pids.items():
            a, b = cpu_seconds(pid), cpu_before[k]
            if a is not None and b is not None:
                cpu_ms[k] = round((a[0] - b[0] + a[1] - b[1]) * 1000.0 / N, 3)
        assert "error" not in out, out
        assert out["not_accepted"] == 0
        benchmark.extra_info.update(
            {
                "driver": driver,
                "commits": N,
                "p50_ms": round(out["p50_ms"], 3),
                "p99_ms": round(out["p99_ms"], 3),
                "mean_ms": round(out["mean_ms"], 3),
                "cpu_ms_per_commit": cpu_ms,
            }
        )
        print(
            f"\nraft commit ({driver} driver, 3 processes, n={N}): "
            f"p50 {out['p50_ms']:.3f} ms, p99 {out['p99_ms']:.3f} ms; "
            f"CPU per commit (user+system, ms): {cpu_ms}"
        )
        journal = leader.status()["journal"]
        assert journal["syncs"] >= N  # every entry was made durable
    finally:
        cluster.close()
