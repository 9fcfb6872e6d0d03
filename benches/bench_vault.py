"""Vault transit signing latency through the backend, against a real OpenBao dev server.

Run the percentiles as a script (prints p50 / p99 in microseconds, and the client's CPU
time per signature)::

    python benches/bench_vault.py [N] [--tls]

or timed under pytest-benchmark: ``python -m pytest benches/bench_vault.py
--benchmark-enable``. The normal suite runs each once, quickly, as a smoke test.

What is measured, per signature of a 119-byte vote:

* ``native``       — the in-process key (the baseline);
* ``transit``      — ``VaultTransitBackend.sign`` on uvloop with Nebula's own keep-alive
  HTTP/1.1 client (``AsyncVaultHTTP``): request, JSON decode, ``vault:v1:`` parse and
  Ed25519 verification with the pinned key;
* ``aiohttp``      — the same backend with the HTTP exchange done by aiohttp instead
  (:class:`AiohttpVaultHTTP` below, same interface, same timeout bound): the candidate a
  well-kept library would be. The two alternate in rounds, so drift on a shared machine
  hits both alike;
* ``hvac``         — hvac ``sign_data`` (requests, synchronous), no verification;
* ``verify``       — the verification alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if __name__ == "__main__":  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nebula.backends._vault_common import (
    AsyncVaultHTTP,
    VaultSettings,
    hvac_client,
    ssl_context,
)
from nebula.backends.vault_transit import VaultTransitBackend
from nebula.crypto import keys
from nebula.errors import BackendError
from tests.support.openbao import OpenBao
from tests.support.vectors import h, load

_MSG = h(load("signatures_and_keys")["ed25519"]["signatures"][3]["message_hex"])
_ROUNDS = 6


class AiohttpVaultHTTP:
    """``AsyncVaultHTTP``'s interface over aiohttp (the comparison candidate).

    Bounded as a whole by the settings' timeout like Nebula's client; a pooled
    connection the server closed is retried once; every failure is a BackendError."""

    def __init__(self, settings: VaultSettings, ssl_ctx: Any) -> None:
        self._settings = settings
        self._ssl = ssl_ctx if ssl_ctx is not None else True
        self._session: Any = None

    async def request(
        self, method: str, path: str, body: bytes | None = None, *, what: str
    ) -> tuple[int, bytes]:
        import aiohttp
        import yarl

        s = self._settings
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, keepalive_timeout=30.0),
                headers={"X-Vault-Token": s.token, "X-Vault-Request": "true"},
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
                trust_env=False,
            )
        url = yarl.URL(s.address + path, encoded=True)
        headers = {"Content-Type": "application/json"} if body is not None else None

        async def exchange() -> tuple[int, bytes]:
            async with self._session.request(method, url, data=body, headers=headers) as resp:
                return resp.status, await resp.read()

        try:
            async with asyncio.timeout(s.timeout):
                try:
                    return await exchange()
                except aiohttp.ServerDisconnectedError:
                    return await exchange()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise BackendError(f"{what}: {s.address}: {exc!r}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


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


def measure(n: int = 2000, *, tls: bool = False) -> dict[str, dict[str, float]]:
    """p50/p99/mean per path (and client CPU µs per signature for the two HTTP clients);
    n signatures each, after a short warm-up."""
    import uvloop

    results: dict[str, dict[str, float]] = {}
    native = keys.Ed25519Key.generate()
    results["native"] = _percentiles(_time(lambda: native.sign(_MSG), n))
    sig = native.sign(_MSG)
    verify = keys.signature_verifier("ed25519", native.public_key)
    results["verify"] = _percentiles(_time(lambda: verify(_MSG, sig), n))

    with OpenBao(tls=tls) as bao:
        client = bao.client()
        client.secrets.transit.create_key("bench", key_type="ed25519", mount_point="transit")
        s = VaultSettings.create(
            bao.address, "transit", "bench", bao.root_token, timeout=1.0, ca_cert=bao.ca_cert
        )
        backend = VaultTransitBackend.connect(s)
        clients: dict[str, Any] = {
            "transit": backend._http,
            "aiohttp": AiohttpVaultHTTP(s, ssl_context(s)),
        }
        samples: dict[str, list[int]] = {k: [] for k in clients}
        cpu: dict[str, float] = dict.fromkeys(clients, 0.0)
        loop = uvloop.new_event_loop()

        def sign() -> object:
            return loop.run_until_complete(backend.sign(_MSG))

        try:
            per_round = max(1, n // _ROUNDS)
            for http in clients.values():  # warm-up: connections, code paths
                backend._http = http
                _time(sign, 50)
            for r in range(_ROUNDS):
                for name in clients if r % 2 == 0 else reversed(clients):
                    backend._http = clients[name]
                    c0 = time.process_time()
                    samples[name] += _time(sign, per_round)
                    cpu[name] += time.process_time() - c0
            for name in clients:
                results[name] = _percentiles(samples[name])
                results[name]["cpu_us"] = cpu[name] * 1e6 / len(samples[name])
        finally:
            for http in clients.values():
                with contextlib.suppress(Exception):
                    loop.run_until_complete(http.close())
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
    lines = [f"{'path':<10} {'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9} {'client CPU µs':>14}"]
    for name, r in results.items():
        cpu = f"{r['cpu_us']:>14.0f}" if "cpu_us" in r else f"{'':>14}"
        lines.append(
            f"{name:<10} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['mean_us']:>9.1f} {cpu}"
        )
    added = results["transit"]["p50_us"] - results["native"]["p50_us"]
    lines.append(f"transit adds {added:.0f} µs at p50 over the native key")
    t, a = results["transit"], results["aiohttp"]
    lines.append(
        f"aiohttp instead of Nebula's client: {a['p50_us'] - t['p50_us']:+.0f} µs at p50, "
        f"{a['cpu_us'] - t['cpu_us']:+.0f} µs of client CPU per signature"
    )
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
    assert isinstance(backend._http, AsyncVaultHTTP)
    sig = benchmark(lambda: loop.run_until_complete(backend.sign(_MSG)))
    assert keys.verify_signature("ed25519", backend.public_key, _MSG, sig)


def test_transit_latency_percentiles_smoke() -> None:
    r = measure(60)
    print("\n" + _report(r))
    # A local OpenBao answers in about a millisecond; anything near the 1 s timeout is a bug.
    assert r["transit"]["p99_us"] < 200_000 and r["aiohttp"]["p99_us"] < 200_000


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(_report(measure(int(args[0]) if args else 2000, tls="--tls" in sys.argv)))
