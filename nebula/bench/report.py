"""Bench results as JSON, as rich tables, and as an optional latency histogram."""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

from nebula import _fast
from nebula.bench import stats
from nebula.bench.multi import MultiResult
from nebula.bench.runner import BenchResult, kinds_present
from nebula.bench.workload import KINDS
from nebula.metrics import PHASES

__all__ = [
    "comparison",
    "machine_info",
    "multi_to_json",
    "print_comparison",
    "print_multi_report",
    "print_report",
    "to_json",
    "write_histogram",
]

# The server-side phases in the order a request goes through them.
_SERVER_PHASES = ("receive_decode", "guard", "sign", "replicate", "encode_send")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_end": load,
        # Every kernel, loaded here if this process has not yet (the signer processes
        # load the same ones from the same installation).
        "kernels_compiled": {k: _loaded(k) for k in _fast.KERNELS},
    }


def _loaded(name: str) -> bool:
    if name not in _fast.COMPILED:
        _fast.load(name)
    return _fast.COMPILED[name]


def _clean(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else round(x, 4)


def _phase_rows(res: BenchResult) -> dict[str, float | None] | None:
    if res.phases is None:
        return None
    out: dict[str, float | None] = {}
    for p in PHASES:
        v = res.phases.get(p)
        out[p] = round(v["mean_ms"], 4) if v else None
    total = out.get("total")
    rtt_mean = res.summary().mean
    out["network_framing"] = (
        round(rtt_mean - total, 4) if total is not None and not math.isnan(rtt_mean) else None
    )
    return out


def to_json(res: BenchResult, setup: dict[str, Any]) -> dict[str, Any]:
    o = res.options
    per_kind = {}
    for k in kinds_present(res):
        s = res.summary(k)
        per_kind[k] = {
            key: _clean(v) if isinstance(v, float) else v for key, v in s.as_dict().items()
        }
        per_kind[k]["throughput_rps"] = round(1000.0 / s.mean, 1) if s.mean else None
    overall = {
        k: _clean(v) if isinstance(v, float) else v for k, v in res.summary().as_dict().items()
    }
    return {
        "setup": {
            **setup,
            "chain_id": o.chain_id,
            "version": o.family.value,
            "requests": o.requests,
            "warmup": o.warmup,
            "proposal_every": o.proposal_every,
            "extension_size": o.extension_size,
            "key_type": res.key_type,
            "start_height": res.start_height,
        },
        "machine": machine_info(),
        "requests": len(res.rtts),
        "errors": res.errors,
        "warmup_errors": res.warmup_errors,
        "error_samples": res.error_samples,
        "reconnects": res.reconnects,
        "signatures_verified": res.signatures_verified,
        "duration_s": round(res.duration, 6),
        "throughput_rps": round(res.throughput, 1),
        "signatures_per_s": round(res.signatures_per_second, 1),
        "handshake_ms": round(res.handshake_seconds * 1000.0, 4),
        "handshakes_ms": (
            {k: _clean(v) for k, v in stats.summarize(res.handshakes).as_dict().items()}
            if res.handshakes
            else None
        ),
        "cpu_ms_per_request": (
            {
                label: {
                    "role": c["role"],
                    "user": round(c["user_ms"], 4),
                    "system": round(c["system_ms"], 4),
                    "total": round(c["user_ms"] + c["system_ms"], 4),
                }
                for label, c in res.cpu.items()
            }
            or None
        ),
        "roles_stable": res.roles_stable,
        "roles_note": res.roles_note,
        "latency_ms": {"all": overall, **per_kind},
        "phases_mean_ms": _phase_rows(res),
        "phases_note": res.phases_note,
    }


def _print_cpu(console: Any, cpu: dict[str, Any] | None, title: str, note: str) -> None:
    """The CPU-per-request table of every process (and the roles note), if measured."""
    if not cpu:
        return
    from rich.table import Table

    ct = Table(title=title, title_justify="left")
    for c in ("process", "role", "user", "system", "total"):
        ct.add_column(c, justify="left" if c in ("process", "role") else "right")
    for label, c in cpu.items():
        ct.add_row(label, c["role"], _fmt(c["user"]), _fmt(c["system"]), _fmt(c["total"]))
    console.print(ct)
    if note:
        console.print(f"[yellow]{note}[/yellow]")


def _print_disk(console: Any, setup: dict[str, Any]) -> None:
    """The latency of a plain durable write on the bench's disk, if it was probed."""
    disk = setup.get("disk_fdatasync_ms")
    if disk:
        console.print(
            f"disk under the sign state: pwrite+fdatasync p50 {disk['p50']:.3f} ms, "
            f"p99 {disk['p99']:.3f} ms (the floor of every durable write)"
        )


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def print_report(res: BenchResult, setup: dict[str, Any], *, file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    data = to_json(res, setup)
    title = (
        f"nebula bench: {setup.get('mode', '')} · {data['setup']['version']} · "
        f"{res.key_type} · {len(res.rtts)} requests"
    )
    t = Table(title=title, title_justify="left")
    t.add_column("type")
    for c in ("count", "mean", "p50", "p90", "p99", "max"):
        t.add_column(f"{c}{'' if c == 'count' else ' ms'}", justify="right")
    t.add_column("req/s", justify="right")
    for name, s in data["latency_ms"].items():
        rps = data["throughput_rps"] if name == "all" else s.get("throughput_rps")
        t.add_row(
            name,
            str(s["count"]),
            *(_fmt(s[c]) for c in ("mean", "p50", "p90", "p99", "max")),
            "-" if rps is None else f"{rps:,.0f}",
            style="bold" if name == "all" else None,
        )
    console.print(t)

    phases = data["phases_mean_ms"]
    if phases is not None:
        pt = Table(title="where the time goes (means, ms)", title_justify="left")
        pt.add_column("phase")
        pt.add_column("mean ms", justify="right")
        pt.add_column("share of RTT", justify="right")
        rtt = data["latency_ms"]["all"]["mean"] or 0.0
        rows = [*_SERVER_PHASES, "network_framing"]
        for p in rows:
            v = phases.get(p)
            share = f"{100.0 * v / rtt:.0f}%" if v is not None and rtt else "-"
            label = "network + framing (RTT - server total)" if p == "network_framing" else p
            pt.add_row(label, _fmt(v), share)
        pt.add_row("server total", _fmt(phases.get("total")), "", style="bold")
        pt.add_row("round trip (client)", _fmt(rtt), "100%", style="bold")
        console.print(pt)
    elif res.phases_note:
        console.print(f"[dim]{res.phases_note}[/dim]")

    _print_cpu(
        console,
        data["cpu_ms_per_request"],
        "CPU time per request (ms, from /proc; 10 ms clock ticks)",
        res.roles_note,
    )

    summary = (
        f"throughput {data['throughput_rps']:,.0f} req/s, "
        f"{data['signatures_per_s']:,.0f} signatures/s verified "
        f"({res.signatures_verified} signatures); first handshake {data['handshake_ms']:.2f} ms"
    )
    console.print(summary)
    _print_disk(console, setup)
    hs = data["handshakes_ms"]
    if hs:
        console.print(
            f"SecretConnection handshake over {hs['count']} re-dials: p50 {hs['p50']:.3f} ms, "
            f"p90 {hs['p90']:.3f} ms, max {hs['max']:.3f} ms"
        )
    if res.reconnects:
        console.print(f"[yellow]reconnects: {res.reconnects}[/yellow]")
    errors = res.errors + res.warmup_errors
    if errors:
        console.print(
            f"[bold red]{res.errors} errors ({res.warmup_errors} more in warmup)[/bold red]"
        )
        for e in res.error_samples:
            console.print(f"  [red]{e}[/red]")
    else:
        console.print("[green]0 errors: every signature verified[/green]")


def write_histogram(res: BenchResult, path: str | Path, title: str) -> str | None:
    """Draw the latency histogram; returns an explanation instead if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            f"--histogram {path}: matplotlib is not installed "
            "(pip install matplotlib); no histogram written"
        )
    from nebula.bench.stats import percentile

    s = res.summary()
    ms = sorted(r * 1000.0 for r in res.rtts)
    # The tail beyond p99.5 would squash the body of the histogram; say how many are cut.
    hi = max(percentile(ms, 99.5), s.p99) * 1.1
    cut = sum(1 for v in ms if v > hi)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in kinds_present(res):
        vals = [r * 1000.0 for r, k in zip(res.rtts, res.kinds, strict=True) if k == kind]
        ax.hist(vals, bins=120, range=(0.0, hi), alpha=0.55, label=kind)
    for q, v in (("p50", s.p50), ("p99", s.p99)):
        ax.axvline(v, linestyle="--", linewidth=1, color="black")
        ax.text(v, ax.get_ylim()[1] * 0.95, f" {q} {v:.3f} ms", fontsize=8)
    ax.set_xlabel(f"round trip (ms); {cut} slower requests (> {hi:.2f} ms) not shown")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---- several chains at once (--chains) ------------------------------------------------


def _latency_block(s: stats.Summary) -> dict[str, Any]:
    return {k: _clean(v) if isinstance(v, float) else v for k, v in s.as_dict().items()}


def _cpu_json(cpu: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    return {
        label: {
            "role": c["role"],
            "user": round(c["user_ms"], 4),
            "system": round(c["system_ms"], 4),
            "total": round(c["user_ms"] + c["system_ms"], 4),
        }
        for label, c in cpu.items()
    } or None


def _wide_console(file: Any) -> Any:
    """A console at least 110 columns wide (the multi-chain tables' width), also when
    the output is not a terminal."""
    from rich.console import Console

    console = Console(file=file or sys.stdout)
    if console.width < 110:
        console = Console(file=file or sys.stdout, width=110)
    return console


def multi_to_json(res: MultiResult, setup: dict[str, Any]) -> dict[str, Any]:
    """A run over several chains.  The top-level names of the single-chain JSON keep
    their meaning, summed over the chains (``requests``, ``signatures_verified``,
    ``throughput_rps`` and ``signatures_per_s`` are the aggregates, ``latency_ms`` pools
    every chain's requests); ``per_chain`` has each chain's own figures."""
    first = res.chains[0]
    o = first.options
    overall = res.summary()
    kinds = [k for k in KINDS if any(k in r.kinds for r in res.chains)]
    per_kind = {k: _latency_block(res.summary(k)) for k in kinds}
    per_chain = []
    for r in res.chains:
        s = r.summary()
        per_chain.append(
            {
                "chain_id": r.options.chain_id,
                "requests": len(r.rtts),
                "signatures_verified": r.signatures_verified,
                "errors": r.errors,
                "warmup_errors": r.warmup_errors,
                "reconnects": r.reconnects,
                "start_height": r.start_height,
                "pub_key": r.pub_key.hex(),
                "duration_s": round(r.duration, 6),
                "throughput_rps": round(r.throughput, 1),
                "signatures_per_s": round(r.signatures_per_second, 1),
                "p50_ms": _clean(s.p50),
                "p99_ms": _clean(s.p99),
                "latency_ms": _latency_block(s),
            }
        )
    worst = res.worst_chain()
    handshakes = first.handshakes
    return {
        "setup": {
            **setup,
            "chains": len(res.chains),
            "chain_ids": [r.options.chain_id for r in res.chains],
            "client": res.client,
            "version": o.family.value,
            "requests_per_chain": o.requests,
            "warmup_per_chain": o.warmup,
            "proposal_every": o.proposal_every,
            "extension_size": o.extension_size,
            "key_type": first.key_type,
            "verified": "after the timed window, every signature against its chain's key",
        },
        "machine": machine_info(),
        "chains": len(res.chains),
        "requests": res.requests,
        "errors": res.errors,
        "warmup_errors": res.warmup_errors,
        "error_samples": [e for r in res.chains for e in r.error_samples][:20],
        "reconnects": res.reconnects,
        "signatures_verified": res.signatures_verified,
        "duration_s": round(res.duration, 6),
        "throughput_rps": round(res.throughput, 1),
        "signatures_per_s": round(res.signatures_per_second, 1),
        "worst_chain_p50_ms": _clean(worst.summary().p50) if worst else None,
        "worst_chain": worst.options.chain_id if worst else None,
        "handshake_ms": round(first.handshake_seconds * 1000.0, 4),
        "handshakes_ms": (
            {k: _clean(v) for k, v in stats.summarize(handshakes).as_dict().items()}
            if handshakes
            else None
        ),
        "cpu_ms_per_request": _cpu_json(res.cpu),
        "roles_stable": res.roles_stable,
        "roles_note": res.roles_note,
        "latency_ms": {"all": _latency_block(overall), **per_kind},
        "per_chain": per_chain,
        "phases_mean_ms": _multi_phase_rows(res, overall.mean),
        "phases_note": res.phases_note,
    }


def _multi_phase_rows(res: MultiResult, rtt_mean: float) -> dict[str, float | None] | None:
    if res.phases is None:
        return None
    out: dict[str, float | None] = {}
    for p in PHASES:
        v = res.phases.get(p)
        out[p] = round(v["mean_ms"], 4) if v else None
    total = out.get("total")
    out["network_framing"] = (
        round(rtt_mean - total, 4) if total is not None and not math.isnan(rtt_mean) else None
    )
    return out


def print_multi_report(res: MultiResult, setup: dict[str, Any], *, file: Any = None) -> None:
    from rich.table import Table

    console = _wide_console(file)
    data = multi_to_json(res, setup)
    t = Table(
        title=(
            f"nebula bench: {setup.get('mode', '')} · {data['chains']} chains at once · "
            f"{data['setup']['version']} · {data['setup']['key_type']} · "
            f"{data['setup']['requests_per_chain']} requests per chain · client {res.client}"
        ),
        title_justify="left",
    )
    t.add_column("chain", no_wrap=True)
    for c in ("count", "mean", "p50", "p90", "p99", "max"):
        t.add_column(f"{c}{'' if c == 'count' else ' ms'}", justify="right")
    t.add_column("req/s", justify="right")
    t.add_column("sig/s", justify="right")
    t.add_column("err", justify="right")
    worst = data["worst_chain"]
    for c in data["per_chain"]:
        s = c["latency_ms"]
        t.add_row(
            c["chain_id"] + (" *" if c["chain_id"] == worst else ""),
            str(s["count"]),
            *(_fmt(s[k]) for k in ("mean", "p50", "p90", "p99", "max")),
            f"{c['throughput_rps']:,.0f}",
            f"{c['signatures_per_s']:,.0f}",
            str(c["errors"] + c["warmup_errors"]),
        )
    s = data["latency_ms"]["all"]
    t.add_row(
        "all",
        str(s["count"]),
        *(_fmt(s[k]) for k in ("mean", "p50", "p90", "p99", "max")),
        f"{data['throughput_rps']:,.0f}",
        f"{data['signatures_per_s']:,.0f}",
        str(data["errors"] + data["warmup_errors"]),
        style="bold",
    )
    console.print(t)
    phases = data["phases_mean_ms"]
    if phases is not None:
        pt = Table(title="where the time goes (means over all chains, ms)", title_justify="left")
        pt.add_column("phase")
        pt.add_column("mean ms", justify="right")
        for p in [*_SERVER_PHASES, "total", "network_framing"]:
            label = "network + framing + client queueing" if p == "network_framing" else p
            pt.add_row(label, _fmt(phases.get(p)))
        console.print(pt)
    elif res.phases_note:
        console.print(f"[dim]{res.phases_note}[/dim]")
    _print_cpu(
        console,
        data["cpu_ms_per_request"],
        "CPU time per request (ms, all chains' requests; from /proc, 10 ms ticks)",
        res.roles_note,
    )
    console.print(
        f"aggregate: {data['throughput_rps']:,.0f} req/s, {data['signatures_per_s']:,.0f} "
        f"signatures/s over {data['chains']} chains ({data['signatures_verified']} signatures, "
        f"{data['duration_s']:.2f} s); worst chain p50 {_fmt(data['worst_chain_p50_ms'])} ms "
        f"({worst}, marked *)"
    )
    _print_disk(console, setup)
    hs = data["handshakes_ms"]
    if hs:
        console.print(
            f"SecretConnection handshake over {hs['count']} re-dials (first chain): "
            f"p50 {hs['p50']:.3f} ms, max {hs['max']:.3f} ms"
        )
    if res.reconnects:
        console.print(f"[yellow]reconnects: {res.reconnects}[/yellow]")
    if data["errors"] or data["warmup_errors"]:
        console.print(
            f"[bold red]{data['errors']} errors ({data['warmup_errors']} more in warmup)[/bold red]"
        )
        for e in data["error_samples"]:
            console.print(f"  [red]{e}[/red]")
    else:
        console.print(
            "[green]0 errors: every signature verified against its chain's key "
            "(after the timed window)[/green]"
        )


def comparison(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per multi-chain run (JSON from :func:`multi_to_json`): its aggregate signatures/s
    and worst-chain p50 against the single-chain run of the same round (the run with the
    fewest chains, if no round ran one)."""
    rows = []
    rounds: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        rounds.setdefault(r["setup"].get("round", 1), []).append(r)
    for rnd, group in sorted(rounds.items()):
        base = min(group, key=lambda r: r["chains"])
        b_sig, b_p50 = base["signatures_per_s"], base["latency_ms"]["all"]["p50"]
        for r in group:
            worst = r["worst_chain_p50_ms"]
            rows.append(
                {
                    "round": rnd,
                    "chains": r["chains"],
                    "baseline_chains": base["chains"],
                    "signatures_per_s": r["signatures_per_s"],
                    "throughput_rps": r["throughput_rps"],
                    "p50_ms": r["latency_ms"]["all"]["p50"],
                    "p99_ms": r["latency_ms"]["all"]["p99"],
                    "worst_chain_p50_ms": worst,
                    "aggregate_ratio": round(r["signatures_per_s"] / b_sig, 3) if b_sig else None,
                    "worst_p50_ratio": round(worst / b_p50, 3) if worst and b_p50 else None,
                    "errors": r["errors"] + r["warmup_errors"],
                }
            )
    return rows


def print_comparison(rows: list[dict[str, Any]], *, file: Any = None) -> None:
    from rich.table import Table

    console = _wide_console(file)
    t = Table(
        title="chains at once (ms; ratios against the fewest-chains run of the same round: "
        "aggregate signatures/s, and the worst chain's p50 against its p50)",
        title_justify="left",
    )
    for c in ("round", "chains", "sig/s", "req/s", "p50", "p99", "worst p50", "sig/s x",
              "p50 x", "err"):  # fmt: skip
        t.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(
            str(r["round"]),
            str(r["chains"]),
            f"{r['signatures_per_s']:,.0f}",
            f"{r['throughput_rps']:,.0f}",
            _fmt(r["p50_ms"]),
            _fmt(r["p99_ms"]),
            _fmt(r["worst_chain_p50_ms"]),
            "-" if r["aggregate_ratio"] is None else f"{r['aggregate_ratio']:.2f}x",
            "-" if r["worst_p50_ratio"] is None else f"{r['worst_p50_ratio']:.2f}x",
            str(r["errors"]),
        )
    console.print(t)
