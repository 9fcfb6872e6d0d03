"""Vault transit signing latency through the backend, against a real OpenBao dev server.

Run the percentiles as a script (prints p50 / p99 in microseconds)::

    python benches/bench_vault.py [N]

or timed under pytest-benchmark: ``python -m pytest benches/bench_vault.py
--benchmark-enable``. The normal suite runs each once, quickly, as a smoke test.

What is measured, per signature of a 119-byte vote:

* ``native``       — the in-process key (the baseline);
* ``transit``      — ``VaultTransitBackend.sign`` on uvloop: HTTP/1.1 keep-alive request,
  JSON decode, ``vault:v1:`` parse and Ed25519 verification with the pinned key;
* ``hvac``         — hvac ``sign_data`` (requests, synchronous), no verification: the
  client the issue first suggested, for comparison;
* ``verify``       — the verification alone.
"""

from __future__ import annotations

import base64
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nebula.backends._vault_common import VaultSettings, hvac_client
from nebula.backends.vault_transit import VaultTransitBackend
from nebula.crypto import keys
from tests.support.openbao import OpenBao
from tests.support.vectors import h, load

_MSG = h(load("signatures_and_keys")["ed25519"]["signatures"][3]["message_hex"])


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    xs = sorted(samples_ns)
    n = len(xs)
    return {
        "p50_us": xs[n // 2] / 1e3,
        "p99_us": xs[min(n - 1, (n * 99) // 100)] / 1e3,
        "mean_us": statistics.fmean(xs) / 1e3,
    }


def _time(fn: Callable[[], object], n: int) -> list[int]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def measure(n: int = 2000) -> dict[str, dict[str, float]]:
    """p50/p99/mean per path; n signatures each (after a short warm-up)."""
    import uvloop

    results: dict[str, dict[str, float]] = {}
    native = keys.Ed25519Key.generate()
    results["native"] = _percentiles(_time(lambda: native.sign(_MSG), n))
    sig = native.sign(_MSG)
    verify = keys.signature_verifier("ed25519", native.public_key)
    results["verify"] = _percentiles(_time(lambda: verify(_MSG, sig), n))

    with OpenBao() as bao:
        client = bao.client()
        client.secrets.transit.create_key("bench", key_type="ed25519", mount_point="transit")
        s = VaultSettings.create(bao.address, "transit", "bench", bao.root_token, timeout=1.0)
        backend = VaultTransitBackend.connect(s)
        loop = uvloop.new_event_loop()
        try:
            for _ in range(50):
                loop.run_until_complete(backend.sign(_MSG))
            results["transit"] = _percentiles(
                _time(lambda: loop.run_until_complete(backend.sign(_MSG)), n)
            )
            loop.run_until_complete(backend.close())
        finally:
            loop.close()
        b64 = base64.b64encode(_MSG).decode()
        c = hvac_client(s)
        for _ in range(50):
            c.secrets.transit.sign_data("bench", hash_input=b64, mount_point="transit")
        results["hvac"] = _percentiles(
            _time(
                lambda: c.secrets.transit.sign_data("bench", hash_input=b64, mount_point="transit"),
                n,
            )
        )
    return results


def _report(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'path':<10} {'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<10} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['mean_us']:>9.1f}")
    added = results["transit"]["p50_us"] - results["native"]["p50_us"]
    lines.append(f"transit adds {added:.0f} µs at p50 over the native key")
    return "\n".join(lines)


# ---- pytest ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transit_backend():
    import uvloop

    with OpenBao() as bao:
        bao.client().secrets.transit.create_key("bench", key_type="ed25519", mount_point="transit")
        s = VaultSettings.create(bao.address, "transit", "bench", bao.root_token, timeout=1.0)
        backend = VaultTransitBackend.connect(s)
        loop = uvloop.new_event_loop()
        try:
            yield backend, loop
            loop.run_until_complete(backend.close())
        finally:
            loop.close()


def test_bench_transit_backend_sign(benchmark, transit_backend) -> None:
    backend, loop = transit_backend
    sig = benchmark(lambda: loop.run_until_complete(backend.sign(_MSG)))
    assert keys.verify_signature("ed25519", backend.public_key, _MSG, sig)


def test_transit_latency_percentiles_smoke() -> None:
    r = measure(100)
    print("\n" + _report(r))
    # A local OpenBao answers in about a millisecond; anything near the 1 s timeout is a bug.
    assert r["transit"]["p99_us"] < 200_000


if __name__ == "__main__":
    print(_report(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)))
