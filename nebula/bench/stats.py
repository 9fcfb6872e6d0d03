"""Latency summaries and the Prometheus scrape behind the per-phase breakdown."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence

from nebula.errors import NebulaError

__all__ = [
    "PhaseSnapshot",
    "Summary",
    "cpu_seconds",
    "cpu_time",
    "parse_phase_histograms",
    "percentile",
    "phase_means",
    "probe_fdatasync",
    "scrape",
    "summarize",
]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of sorted values, linearly interpolated."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    """Latencies in milliseconds."""

    count: int
    mean: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def summarize(seconds: Iterable[float]) -> Summary:
    ms = sorted(s * 1000.0 for s in seconds)
    if not ms:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan, nan)
    return Summary(
        count=len(ms),
        mean=sum(ms) / len(ms),
        min=ms[0],
        p50=percentile(ms, 50),
        p90=percentile(ms, 90),
        p99=percentile(ms, 99),
        max=ms[-1],
    )


def probe_fdatasync(directory: str | os.PathLike[str], n: int = 200) -> Summary:
    """Latency of one durable 512-byte overwrite (pwrite + fdatasync) in ``directory``.

    The floor under any durable sign-state write on that disk; the file is written
    (not just allocated) first, so each fdatasync flushes data, not metadata.
    """
    path = os.path.join(os.fspath(directory), ".nebula-bench-fsync-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, bytes(4096), 0)
        os.fsync(fd)
        block = os.urandom(512)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return summarize(times)


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds a process has used so far; None where there is no
    ``/proc`` or the process is gone.  Clock-tick resolution (usually 10 ms)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        fields = raw[raw.rindex(b")") + 2 :].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, ValueError, IndexError):
        return None


def cpu_time(pid: int) -> float | None:
    """CPU seconds (user + system) the live threads of ``pid`` have used so far: the
    scheduler's nanosecond count (``/proc/<pid>/task/*/schedstat``; a thread that ended
    is no longer counted), or the clock ticks of ``/proc/<pid>/stat`` where there is no
    schedstat; None where the process is gone."""
    try:
        total, read = 0, 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
                read += 1
            except FileNotFoundError:
                continue  # a thread that ended meanwhile (or no schedstat at all)
        if read:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    both = cpu_seconds(pid)
    return None if both is None else both[0] + both[1]


# ---- Prometheus ------------------------------------------------------------------------

_PHASE_LINE = re.compile(
    r'^nebula_sign_phase_seconds_(sum|count)\{phase="([a-z_]+)"\}\s+([0-9.eE+-]+|NaN)\s*$'
)
_ROLE_LINE = re.compile(r"^nebula_raft_role\s+([0-9.eE+-]+)\s*$")
_TERM_LINE = re.compile(r"^nebula_raft_term\s+([0-9.eE+-]+)\s*$")
_HEIGHT_LINE = re.compile(r'^nebula_last_signed_height\{chain_id="(.*)"\}\s+([0-9.eE+-]+)\s*$')


@dataclasses.dataclass(slots=True)
class PhaseSnapshot:
    """Summed ``nebula_sign_phase_seconds`` sums and counts, per phase."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, float] = dataclasses.field(default_factory=dict)
    last_heights: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ``nebula_raft_role`` per scraped target (0 follower, 1 candidate, 2 leader)
    raft_roles: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ``nebula_raft_term`` per scraped target
    raft_terms: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, other: PhaseSnapshot) -> None:
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0.0) + v
        for k, h in other.last_heights.items():
            self.last_heights[k] = max(h, self.last_heights.get(k, 0))
        self.raft_roles.update(other.raft_roles)
        self.raft_terms.update(other.raft_terms)


def parse_phase_histograms(text: str, target: str = "") -> PhaseSnapshot:
    """The phase histograms (and the Raft role and term, keyed by ``target``) of a scrape."""
    snap = PhaseSnapshot()
    for line in text.splitlines():
        m = _PHASE_LINE.match(line)
        if m is not None:
            kind, phase, value = m.groups()
            (snap.sums if kind == "sum" else snap.counts)[phase] = float(value)
            continue
        m = _HEIGHT_LINE.match(line)
        if m is not None:
            snap.last_heights[m.group(1)] = int(float(m.group(2)))
            continue
        m = _ROLE_LINE.match(line)
        if m is not None:
            snap.raft_roles[target] = int(float(m.group(1)))
            continue
        m = _TERM_LINE.match(line)
        if m is not None:
            snap.raft_terms[target] = int(float(m.group(1)))
    return snap


def scrape(targets: Sequence[str], timeout: float = 5.0) -> PhaseSnapshot:
    """GET ``http://<target>/metrics`` of every node and add their phase histograms.

    With a Raft cluster only the leader serves requests, so the sum over all members
    is the leader's; a member that cannot be reached is an error (its share would be
    silently missing otherwise).
    """
    total = PhaseSnapshot()
    for t in targets:
        url = t if t.startswith("http") else f"http://{t}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                text = r.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            raise NebulaError(f"cannot scrape {url}: {e}") from None
        total.add(parse_phase_histograms(text, t))
    return total


def phase_means(before: PhaseSnapshot, after: PhaseSnapshot) -> dict[str, dict[str, float]]:
    """Per phase: requests observed between the snapshots and their mean in ms."""
    out: dict[str, dict[str, float]] = {}
    for phase, count in after.counts.items():
        n = count - before.counts.get(phase, 0.0)
        if n <= 0:
            continue
        s = after.sums.get(phase, 0.0) - before.sums.get(phase, 0.0)
        out[phase] = {"count": n, "mean_ms": s / n * 1000.0}
    return out
