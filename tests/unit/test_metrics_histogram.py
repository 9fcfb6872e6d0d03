"""The loop-only histograms expose exactly what prometheus_client's Histogram would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from nebula.metrics import _LATENCY_BUCKETS, PHASES, Metrics


def _samples(text: str, family: str) -> list[str]:
    return sorted(
        line
        for line in text.splitlines()
        if line.startswith(family) and not line.startswith(f"{family}_created")
    )


def test_phase_histograms_match_prometheus_client() -> None:
    rng = random.Random(5)
    values = [rng.choice(_LATENCY_BUCKETS) for _ in range(50)]  # exactly on a bound: le
    values += [rng.uniform(0, 6) ** 3 / 100 for _ in range(500)] + [0.0, 1e9]
    m = Metrics()
    ref_registry = CollectorRegistry()
    ref = Histogram(
        "nebula_sign_phase_seconds", "x", ["phase"], buckets=_LATENCY_BUCKETS,
        registry=ref_registry,
    )  # fmt: skip
    for p in PHASES:
        ref.labels(p)
    for i, v in enumerate(values):
        p = PHASES[i % len(PHASES)]
        m.phase(p, v)
        ref.labels(p).observe(v)
    ours = _samples(m.expose().decode(), "nebula_sign_phase_seconds")
    theirs = _samples(generate_latest(ref_registry).decode(), "nebula_sign_phase_seconds")
    assert ours == theirs
    assert len(ours) == len(PHASES) * (len(_LATENCY_BUCKETS) + 3)


def test_raft_commit_histogram_is_unlabelled() -> None:
    m = Metrics()
    for v in (0.0004, 0.002, 0.002):
        m.raft_commit_seconds.observe(v)
    text = m.expose().decode()
    assert "nebula_raft_commit_seconds_count 3.0" in text
    assert 'nebula_raft_commit_seconds_bucket{le="0.0005"} 1.0' in text
    assert 'nebula_raft_commit_seconds_bucket{le="+Inf"} 3.0' in text
    assert "# TYPE nebula_raft_commit_seconds histogram" in text


def test_signatures_tallied_on_the_loop_show_at_every_scrape() -> None:
    """signed() only tallies; every exposition first folds the tallies into the counter
    and the last-signed gauges, so a scrape sees what live updates would have shown."""
    m = Metrics()
    m.signed("a", 5, 0, 2, "prevote")
    m.signed("a", 5, 0, 3, "precommit")
    m.signed("b", 9, 1, 1, "proposal")
    m.signed("a", 6, 0, 1, "proposal")
    text = m.expose().decode()
    assert 'nebula_signatures_total{chain_id="a",type="prevote"} 1.0' in text
    assert 'nebula_signatures_total{chain_id="a",type="proposal"} 1.0' in text
    assert 'nebula_signatures_total{chain_id="b",type="proposal"} 1.0' in text
    assert 'nebula_last_signed_height{chain_id="a"} 6.0' in text
    assert 'nebula_last_signed_step{chain_id="a"} 1.0' in text
    assert 'nebula_last_signed_round{chain_id="b"} 1.0' in text
    m.signed("a", 6, 0, 2, "prevote")
    text = m.expose().decode()
    assert 'nebula_signatures_total{chain_id="a",type="prevote"} 2.0' in text
    assert 'nebula_last_signed_step{chain_id="a"} 2.0' in text
    assert 'nebula_last_signed_height{chain_id="b"} 9.0' in text  # unchanged since
    assert m.expose().decode().count("nebula_signatures_total{") == 4
