"""Raft commit latency and CPU on clusters of real processes on 127.0.0.1 (raft-rs core).

Each member is a ``tests/support/raftnode.py`` process (uvloop, the durable Raft log with
one fdatasync per Ready, the authenticated ChaCha20-Poly1305 transport, 170-byte sign
records).  The leader runs ``n`` sequential commits in-process and reports per-commit
latency, so the numbers exclude the harness' control channel; p50/p99 land in
``extra_info``, with the CPU time every member spent per commit, by role (user + system
of every thread, the scheduler's nanosecond count in ``/proc``).  Two clusters: one member
(the first step of ``cluster add``: it must not wait for a tick) and three members.

Run timed with ``NEBULA_BENCH_RAFT_N=2000 python -m pytest benches/bench_raft.py
--benchmark-enable -s`` (``NEBULA_BENCH_RAFT_N`` sets the commits per round, default
300); the normal suite runs each once as a smoke test.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from nebula.bench.stats import cpu_time
from tests.support.raftnode import Cluster

N = int(os.environ.get("NEBULA_BENCH_RAFT_N", "300"))


@pytest.mark.parametrize("members", [1, 3])
def test_bench_raft_commit(benchmark, tmp_path: Path, members: int) -> None:
    cluster = Cluster(tmp_path, members)
    try:
        cluster.start()
        leader = cluster.wait_leader(timeout=15)
        heights = itertools.count(1, N)
        warm = leader.request("bench", n=min(N, 100), start=next(heights), timeout=60)
        assert "error" not in warm, warm
        runs: list[dict] = []

        pids = {
            ("leader" if p is leader else f"follower {p.node_id}"): p.proc.pid
            for p in cluster.live()
        }
        cpu_before = {k: cpu_time(pid) for k, pid in pids.items()}
        syncs_before = leader.status()["journal"]["syncs"]

        def run() -> dict:
            out = leader.request("bench", n=N, start=next(heights), timeout=300)
            runs.append(out)
            return out

        out = benchmark.pedantic(run, rounds=1, iterations=1)
        cpu_ms: dict[str, float] = {}
        for k, pid in pids.items():
            a, b = cpu_time(pid), cpu_before[k]
            if a is not None and b is not None:
                cpu_ms[k] = round((a - b) * 1000.0 / N, 3)
        assert "error" not in out, out
        assert out["not_accepted"] == 0
        assert set(cpu_ms) == set(pids), cpu_ms  # every member measured
        benchmark.extra_info.update(
            {
                "members": members,
                "commits": N,
                "p50_ms": round(out["p50_ms"], 3),
                "p99_ms": round(out["p99_ms"], 3),
                "mean_ms": round(out["mean_ms"], 3),
                "cpu_ms_per_commit": cpu_ms,
            }
        )
        print(
            f"\nraft commit ({members} member{'s' if members > 1 else ''}, n={N}): "
            f"p50 {out['p50_ms']:.3f} ms, p99 {out['p99_ms']:.3f} ms, "
            f"mean {out['mean_ms']:.3f} ms; CPU per commit (user+system, ms): {cpu_ms}"
        )
        st = leader.status()
        assert st["journal"]["syncs"] - syncs_before >= N  # every entry was made durable
        assert st["chains"]["bench"]["height"] == str((len(runs) + 1) * N)
    finally:
        cluster.close()


def test_bench_core_commit_cycle(benchmark) -> None:
    """The binding's share of one commit on a one-member core: propose a 400-byte command
    (a v1.0 precommit with its extension), take the Ready, advance.  No I/O: what crossing
    into raft-rs and back costs per decision (the command's bytes are borrowed, not
    converted element by element)."""
    from nebula.raft import _core

    core = _core.Node(1, voters=[1])
    core.campaign()
    while core.ready() is not None:
        core.advance()
        core.advance_apply()
    data = os.urandom(400)

    def cycle() -> None:
        core.propose(b"", data)
        rd = core.ready()
        assert rd is not None and rd[4][-1][3] == data  # the entry carries the command
        core.advance()
        core.advance_apply()

    benchmark(cycle)
