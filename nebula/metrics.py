"""Prometheus metrics and the /metrics, /healthz, /readyz HTTP endpoints.

Every metric lives in one registry owned by :class:`Metrics`; the daemon creates one
and hands it to the service, the dialers and the store.  The HTTP server is a tiny
asyncio server on the daemon's event loop (no thread), bound to ``metrics.listen``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

log = logging.getLogger("nebula.metrics")

# Sub-millisecond resolution: the whole signing path targets < 1 ms.
_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

PHASES = ("receive_decode", "guard", "sign", "replicate", "encode_send", "total")


class LoopHistogram:
    """A histogram observed only from the event loop thread: plain counts, no lock.

    ``prometheus_client.Histogram.observe`` takes a lock per bucket and sum update
    (~4 µs); the signing path observes seven of them per request.  This costs a
    bisect and two additions, and is exposed in the same text format (``_bucket``
    with ``le``, ``_count``, ``_sum``) by :class:`_LoopHistograms` at scrape time,
    which also runs on the loop.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class _LoopHistograms:
    """Collector exposing one histogram family made of :class:`LoopHistogram` series."""

    def __init__(self, name: str, doc: str, label: str | None, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.label, self.bounds = name, doc, label, bounds
        self.series: dict[str, LoopHistogram] = {}
        self._les = [floatToGoString(b) for b in (*bounds, math.inf)]

    def child(self, key: str = "") -> LoopHistogram:
        h = self.series.get(key)
        if h is None:
            h = self.series[key] = LoopHistogram(self.bounds)
        return h

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(
            self.name, self.doc, labels=[self.label] if self.label else None
        )
        for key, h in self.series.items():
            cum, buckets = 0, []
            for le, c in zip(self._les, h.counts, strict=True):
                cum += c
                buckets.append((le, cum))
            fam.add_metric([key] if self.label else [], buckets, h.sum)
        yield fam


ROLE_VALUES = {"follower": 0, "candidate": 1, "leader": 2}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.phase_seconds = _LoopHistograms(
            "nebula_sign_phase_seconds",
            "Time spent per phase of a signing request",
            "phase",
            _LATENCY_BUCKETS,
        )
        self._phase = {p: self.phase_seconds.child(p) for p in PHASES}
        r.register(self.phase_seconds)
        self.requests = Counter(
            "nebula_requests_total",
            "privval requests received",
            ["chain_id", "type"],
            registry=r,
        )
        self.signatures = Counter(
            "nebula_signatures_total", "Signatures released", ["chain_id", "type"], registry=r
        )
        self.refusals = Counter(
            "nebula_refusals_total",
            "Requests refused, by reason",
            ["chain_id", "reason"],
            registry=r,
        )
        self.last_height = Gauge(
            "nebula_last_signed_height", "Last signed height", ["chain_id"], registry=r
        )
        self.last_round = Gauge(
            "nebula_last_signed_round", "Last signed round", ["chain_id"], registry=r
        )
        self.last_step = Gauge(
            "nebula_last_signed_step",
            "Last signed step (1 propose, 2 prevote, 3 precommit)",
            ["chain_id"],
            registry=r,
        )
        #: Called before every exposition (the Raft gauges are read from the store
        #: then, so a scrape never shows a role older than the scrape).
        self.before_expose: Callable[[], None] | None = None
        self.raft_role = Gauge(
            "nebula_raft_role", "Raft role (0 follower, 1 candidate, 2 leader)", registry=r
        )
        self.raft_term = Gauge("nebula_raft_term", "Raft term", registry=r)
        self.raft_leader = Gauge(
            "nebula_raft_leader_id", "Node id of the current Raft leader (0 = unknown)", registry=r
        )
        self._raft_commit = _LoopHistograms(
            "nebula_raft_commit_seconds",
            "Time from proposing a signing decision to its commit",
            None,
            _LATENCY_BUCKETS,
        )
        self.raft_commit_seconds = self._raft_commit.child()
        r.register(self._raft_commit)
        self.connections = Gauge(
            "nebula_validator_connections", "Open validator connections", registry=r
        )
        self.reconnects = Counter(
            "nebula_validator_connects_total",
            "Validator connections established (1 + reconnects)",
            ["address"],
            registry=r,
        )
        self.threshold_bad_shares = Counter(
            "nebula_threshold_bad_shares_total",
            "threshold-BLS signature shares that failed verification, per sending member",
            ["chain_id", "member"],
            registry=r,
        )
        self.backend_errors = Counter(
            "nebula_backend_errors_total", "Signing backend failures", ["backend"], registry=r
        )

        # Signatures are tallied in plain dicts on the loop (~0.1 µs, where a labelled
        # counter and three gauges cost ~1.2 µs per signature) and folded into the
        # Prometheus objects by flush(), before every exposition: a scrape shows the
        # same values as if each had been set at once.
        self._signed_counts: dict[tuple[str, str], int] = {}
        self._last_hrs: dict[str, tuple[int, int, int]] = {}
        self._signed_counters: dict[tuple[str, str], Counter] = {}
        self._chain_gauges: dict[str, tuple[Gauge, Gauge, Gauge]] = {}

    def phase(self, name: str, seconds: float) -> None:
        self._phase[name].observe(seconds)

    def signed(self, chain_id: str, height: int, round: int, step: int, kind: str) -> None:
        key = (chain_id, kind)
        counts = self._signed_counts
        counts[key] = counts.get(key, 0) + 1
        self._last_hrs[chain_id] = (height, round, step)

    def flush(self) -> None:
        """Fold the signatures tallied since the last call into nebula_signatures_total
        and the last-signed gauges (the event loop's thread, like :meth:`signed`)."""
        counts, self._signed_counts = self._signed_counts, {}
        for key, n in counts.items():
            counter = self._signed_counters.get(key)
            if counter is None:
                counter = self._signed_counters[key] = self.signatures.labels(*key)
            counter.inc(n)
        last, self._last_hrs = self._last_hrs, {}
        for chain_id, (height, round, step) in last.items():
            gauges = self._chain_gauges.get(chain_id)
            if gauges is None:
                gauges = self._chain_gauges[chain_id] = (
                    self.last_height.labels(chain_id),
                    self.last_round.labels(chain_id),
                    self.last_step.labels(chain_id),
                )
            gauges[0].set(height)
            gauges[1].set(round)
            gauges[2].set(step)

    def expose(self) -> bytes:
        self.flush()
        if self.before_expose is not None:
            try:
                self.before_expose()
            except Exception:
                log.warning("refreshing gauges for /metrics failed", exc_info=True)
        return generate_latest(self.registry)


class HealthServer:
    """Serves /metrics, /healthz (process alive) and /readyz (able to sign or to follow).

    Each connection gets one request and ``timeout`` seconds for all of it (reading the
    request, writing the answer); at most ``max_connections`` are served at once, any
    more are closed at once: clients that open connections and send nothing cannot take
    the file descriptors the validator connections, the Raft peers and the state file
    need, and a burst of scrapes cannot hold the event loop every chain shares (an
    exposition costs ~1 ms: hundreds at once held it for most of a second, longer than a
    Raft election timeout).  A scraper or a probe makes one connection at a time."""

    max_connections = 32
    timeout = 5.0

    def __init__(
        self, metrics: Metrics, host: str, port: int, ready: Callable[[], tuple[bool, str]]
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.ready = ready
        self._server: asyncio.AbstractServer | None = None
        self._active = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= self.max_connections:
            writer.transport.abort()
            return
        self._active += 1
        try:
            await asyncio.wait_for(self._serve(reader, writer), self.timeout)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.transport.abort()  # (close() would wait for a client that reads nothing)
        finally:
            self._active -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path == "/metrics":
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.metrics.expose()
        elif path == "/healthz":
            status, ctype, body = "200 OK", "text/plain", b"ok\n"
        elif path == "/readyz":
            ok, why = self.ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            ctype, body = "text/plain", (why + "\n").encode()
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + (body if method != "HEAD" else b"")
        )
        await writer.drain()
