"""``nebula bench``: signing round trips measured end to end, as a validator sees them.

Three modes:

* ``--local N`` starts N local ``nebula start`` processes (1: ``persist = "local"``;
  3 or 5: a Raft cluster) in a temporary directory, benches them and stops them.
* ``--floor`` runs no Nebula: it measures the cheapest loopback and durable round
  trips the machine allows (:mod:`nebula.bench.floor`), the floor under the others.
* ``--listen ADDR`` (or ``-c CONFIG``, whose first connection address is listened on)
  benches a Nebula that is already running and dials that address.  Give its metrics
  endpoint(s) with ``--metrics host:port`` (taken from the config when it has
  ``metrics.listen``) for the per-phase breakdown.

The bench is the validator: it listens, accepts Nebula's connection, asks for the
public key, then sends a proposal, a prevote and a precommit per height on
consecutive heights, one request in flight, and verifies every signature returned.

``--local N --chains K`` makes the local nodes serve K chains (``bench-chain-1`` ..
``bench-chain-K``, each its own key and validator address) and drives all of them at
once, one request in flight per chain; ``--requests`` is then per chain.  A list
(``--chains 1,4,16``) runs each count in turn on fresh nodes (``--rounds R`` repeats
the list) and compares each run's aggregate signatures/s and worst chain p50 with
the fewest-chains run of the same round.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nebula.errors import ConfigError, NebulaError
from nebula.types import WireFamily

if TYPE_CHECKING:
    from nebula.bench.local import LocalSigners
    from nebula.bench.runner import RunOptions

__all__ = ["cmd_bench", "register"]


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "bench",
        help="measure signing round trips (local node/cluster, or a running signer)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = s.add_argument_group("target")
    target.add_argument(
        "--local", type=int, choices=[1, 3, 5], metavar="N",
        help="start N local nodes (1, or a 3/5-node Raft cluster), bench them, stop them",
    )  # fmt: skip
    target.add_argument(
        "--listen", metavar="ADDR",
        help="tcp://127.0.0.1:PORT or unix:///path: listen there for a running Nebula",
    )  # fmt: skip
    target.add_argument(
        "--floor", action="store_true",
        help="no Nebula: measure the cheapest loopback and durable round trips this "
        "machine allows (1 node, 3 and 5 nodes), the floor under --local runs",
    )  # fmt: skip
    target.add_argument(
        "-c", "--config", help="a running Nebula's config (chain id, version, address, metrics)"
    )
    target.add_argument(
        "--metrics", action="append", default=[], metavar="HOST:PORT",
        help="a node's metrics.listen (repeat for every cluster member)",
    )  # fmt: skip
    w = s.add_argument_group("workload")
    w.add_argument("--requests", "-n", type=int, default=3000, help="timed requests (3000)")
    w.add_argument("--warmup", type=int, default=300, help="untimed requests first (300)")
    w.add_argument(
        "--version", dest="cmt_version", metavar="FAMILY",
        help="wire family v0_34 | v0_37 | v0_38 | v1_0 (default: the config's, else v1_0)",
    )  # fmt: skip
    w.add_argument("--chain-id", help="default: the config's, else bench-chain")
    w.add_argument("--transport", choices=["tcp", "unix"], default="tcp", help="for --local")
    w.add_argument(
        "--chains", default="1", metavar="K[,K...]",
        help="for --local: serve K chains and drive them all at once, one request in flight "
        "per chain (--requests and --warmup are per chain); a list such as 1,4,16 runs "
        "each count in turn on fresh nodes and compares them (default 1); for --floor: "
        "also K clients at once against a group-committing 3-node floor",
    )  # fmt: skip
    w.add_argument(
        "--rounds", type=int, default=1, metavar="R",
        help="with --chains: run the list of chain counts R times (1)",
    )  # fmt: skip
    w.add_argument(
        "--client", choices=["loop", "threads"], default="loop",
        help="with --chains: one thread multiplexing every chain with epoll (loop, the "
        "cheaper on CPU) or one blocking thread per chain (threads)",
    )  # fmt: skip
    w.add_argument(
        "--persist",
        choices=["local", "raft"],
        help="for --local: the sign store (default: local for 1 node, raft for 3/5; "
        "--local 1 --persist raft is a one-member Raft cluster)",
    )
    w.add_argument(
        "--key-type", choices=["ed25519", "secp256k1", "bls12381"], default="ed25519",
        help="consensus key of the local nodes (--local)",
    )  # fmt: skip
    w.add_argument(
        "--backend", choices=["native", "pkcs11"], default="native",
        help="for --local: where the nodes' key lives: a key file (native) or a SoftHSM2 "
        "token through PKCS#11 (pkcs11: generated inside the token; needs SoftHSM2)",
    )  # fmt: skip
    w.add_argument(
        "--threshold", type=int, metavar="T",
        help="--local 3|5 --key-type bls12381: give node i share i of a T-of-N split of the "
        "key (BLS-Raft, signing_mode = threshold_bls) instead of the whole key",
    )  # fmt: skip
    w.add_argument(
        "--start-height", type=int,
        help="first height (default: one above the signer's last signed height, else 1)",
    )  # fmt: skip
    w.add_argument(
        "--proposal-every", type=int, default=1, metavar="K",
        help="sign a proposal every K heights (1: always the proposer; 0: never)",
    )  # fmt: skip
    w.add_argument(
        "--extension-size", type=int, default=64, metavar="BYTES",
        help="vote extension size on precommits (v0_38, v1_0)",
    )  # fmt: skip
    w.add_argument("--accept-timeout", type=float, default=60.0, metavar="SECONDS")
    w.add_argument(
        "--handshakes", type=int, default=20, metavar="N",
        help="after the run, drop the connection N times and time each re-dial's "
        "SecretConnection handshake (TCP; 0: skip)",
    )  # fmt: skip
    o = s.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the results as JSON")
    o.add_argument("--histogram", metavar="FILE.png", help="latency histogram (needs matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument(
        "--workdir", metavar="DIR",
        help="create the --local node directories under DIR (default: the temp dir); "
        "the sign state's fsyncs are measured on that disk",
    )  # fmt: skip
    o.add_argument("--keep", action="store_true", help="keep the --local node directories")
    s.set_defaults(func=cmd_bench)


def _resolve(args: argparse.Namespace) -> tuple[str, WireFamily, str | None, list[str]]:
    """(chain_id, family, listen address or None, metrics targets) from flags and config."""
    chain_id = args.chain_id
    version = args.cmt_version
    listen = args.listen
    metrics = list(args.metrics)
    if args.config:
        from nebula import config

        cfg = config.load(args.config)
        chain_id = chain_id or cfg.raw.chain_id
        version = version or cfg.raw.version
        if listen is None:
            if len(cfg.endpoints) != 1:
                raise ConfigError(
                    f"{cfg.path} lists {len(cfg.endpoints)} connections: say which with --listen"
                )
            listen = str(cfg.endpoints[0])
        if not metrics and cfg.raw.metrics.listen:
            metrics = [cfg.raw.metrics.listen]
    try:
        family = WireFamily.from_config(version or "v1_0")
    except ValueError as e:
        raise ConfigError(f"--version: {e}") from None
    return chain_id or "bench-chain", family, listen, metrics


def _progress(enabled: bool, total: int):  # type: ignore[no-untyped-def]
    """A rich progress bar refreshed by hand (no refresh thread competing for the GIL)."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        auto_refresh=False,
        transient=True,
    )
    task = bar.add_task("signing", total=total)

    def update(done: int, _total: int) -> None:
        bar.update(task, completed=done)
        bar.refresh()

    return bar, update


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _cmd_floor(args: argparse.Namespace) -> int:
    from nebula.bench import floor

    if args.requests < 1 or args.warmup < 0:
        raise ConfigError("--requests must be >= 1 and --warmup >= 0")
    setup = floor.machine_setup(args.workdir, args.requests, args.warmup)
    quiet = args.json or args.no_progress or not sys.stderr.isatty()

    def progress(name: str) -> None:
        if not quiet:
            print(f"floor: {name} ...", file=sys.stderr)

    # --chains K (K > 1): also K clients at once against a group-committing leader
    extra = tuple(floor.group_scenario(k) for k in _parse_chains(args.chains) if k > 1)
    results = floor.run_floor(
        args.requests, args.warmup, args.workdir, scenarios=floor.SCENARIOS + extra,
        progress=progress,
    )  # fmt: skip
    if args.json:
        print(json.dumps(floor.floor_json(results, setup), indent=2))
    else:
        print(floor.format_floor(results, setup))
    return 0


def _check_workdir(args: argparse.Namespace) -> None:
    if args.workdir and not Path(args.workdir).is_dir():
        raise ConfigError(f"--workdir {args.workdir}: not an existing directory")


def _parse_chains(text: str) -> list[int]:
    from nebula.bench.local import MAX_CHAINS

    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--chains takes a number or a list like 1,4,16, got {text!r}") from None
    if not counts or any(not 1 <= c <= MAX_CHAINS for c in counts):
        raise ConfigError(f"--chains: each count must be in 1..{MAX_CHAINS}, got {text!r}")
    return counts


def _run_options(
    args: argparse.Namespace,
    chain_id: str,
    family: WireFamily,
    targets: list[str],
    **extra: Any,
) -> RunOptions:
    """The bench client's options for one chain, from the command line."""
    from nebula.bench.runner import RunOptions

    return RunOptions(
        chain_id=chain_id,
        family=family,
        requests=args.requests,
        warmup=args.warmup,
        start_height=args.start_height,
        proposal_every=args.proposal_every,
        extension_size=args.extension_size,
        accept_timeout=args.accept_timeout,
        metrics_targets=targets,
        **extra,
    )


def _local_signers(
    args: argparse.Namespace, chain_id: str, family: WireFamily, chains: int | None = None
) -> LocalSigners:
    """The ``--local N`` signers of this invocation (``chains``: a multi-chain run)."""
    from nebula.bench.local import LocalSigners

    return LocalSigners(
        args.local,
        chain_id=chain_id,
        version=family.value,
        transport=args.transport,
        key_type=args.key_type,
        backend=args.backend,
        keep=args.keep,
        parent=Path(args.workdir) if args.workdir else None,
        persist=args.persist,
        threshold=args.threshold,
        chains=chains,
    )


def _local_setup(args: argparse.Namespace, signers: LocalSigners) -> dict[str, Any]:
    """The ``setup`` section of a ``--local`` report, with the disk's sync latency."""
    from nebula.bench import stats

    mode = f"local {args.local} node{'s' if args.local > 1 else ''}"
    if args.threshold:
        mode += f", {args.threshold}-of-{args.local} threshold BLS"
    if args.backend == "pkcs11":
        mode += ", key in a SoftHSM2 token (PKCS#11)"
    probe = stats.probe_fdatasync(signers.workdir)
    return {
        "mode": mode,
        "nodes": args.local,
        "persist": signers.persist,
        "transport": args.transport,
        "workdir": str(signers.workdir.parent),
        "disk_fdatasync_ms": {"p50": round(probe.p50, 4), "p99": round(probe.p99, 4)},
        "backend": args.backend,
    }


def _cmd_chains(
    args: argparse.Namespace, counts: list[int], chain_id: str, family: WireFamily
) -> int:
    """``--local N --chains K`` (or a list of counts): several chains at once."""
    from nebula.bench import runner
    from nebula.bench.client import BlockingListener
    from nebula.bench.multi import run_chains
    from nebula.bench.report import (
        comparison,
        multi_to_json,
        print_comparison,
        print_multi_report,
    )

    if args.histogram:
        raise ConfigError("--histogram is for single-chain runs (no --chains)")
    if args.rounds < 1:
        raise ConfigError("--rounds must be >= 1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    compare = len(counts) > 1 or args.rounds > 1
    show_progress = not args.no_progress and not args.json and sys.stderr.isatty()
    runs: list[dict[str, Any]] = []
    failed = False
    for rnd in range(1, args.rounds + 1):
        for n in counts:
            signers = _local_signers(args, chain_id, family, chains=n)
            setup = _local_setup(args, signers)
            if compare:
                setup["round"] = rnd
            if compare and not args.json:
                print(f"round {rnd}: {n} chain(s) ...", file=sys.stderr)
            bar, update = _progress(show_progress, n * (args.requests + args.warmup))
            with signers:
                listeners = [BlockingListener(a, family) for a in signers.listen_addresses]
                try:
                    for li in listeners:
                        li.start()
                    opts = [
                        _run_options(args, cid, family, signers.metrics_targets)
                        for cid in signers.chain_ids
                    ]

                    def go(
                        listeners: list[BlockingListener] = listeners,
                        opts: list[runner.RunOptions] = opts,
                        signers: LocalSigners = signers,
                        update: Any = update,
                    ) -> Any:
                        return run_chains(
                            listeners,
                            opts,
                            client=args.client,
                            metrics_targets=signers.metrics_targets,
                            processes=signers.processes(),
                            handshakes=args.handshakes,
                            progress=update,
                        )

                    try:
                        if bar is not None:
                            with bar:
                                res = go()
                        else:
                            res = go()
                    except (NebulaError, OSError) as e:
                        raise NebulaError(f"{e}\n{signers.log_tails()}") from None
                finally:
                    for li in listeners:
                        li.close()
                for r, key in zip(res.chains, signers.keys, strict=True):
                    if r.pub_key != key.public_key:
                        r.add_error(
                            f"{r.options.chain_id}: the signer's public key is not the key "
                            "the bench generated"
                        )
            if args.keep:
                print(f"node directories kept in {signers.workdir}", file=sys.stderr)
            data = multi_to_json(res, setup)
            runs.append(data)
            failed = failed or bool(res.errors or res.warmup_errors)
            if not args.json:
                print_multi_report(res, setup)
    rows = comparison(runs) if compare else []
    if args.json:
        print(json.dumps({"runs": runs, "comparison": rows} if compare else runs[0], indent=2))
    elif compare:
        print_comparison(rows)
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nebula.bench import runner

    _check_workdir(args)
    from nebula.bench.client import BlockingListener
    from nebula.bench.report import print_report, to_json, write_histogram

    if args.floor:
        if args.local is not None or args.listen or args.config:
            raise ConfigError("--floor runs no Nebula: give it without --local/--listen/-c")
        return _cmd_floor(args)
    if args.local is not None and (args.listen or args.config):
        raise ConfigError("give either --local N or --listen/-c, not both")
    if args.local is None and not (args.listen or args.config):
        raise ConfigError("give --local N, or --listen ADDR / -c CONFIG for a running Nebula")
    if args.requests < 1 or args.warmup < 0 or args.handshakes < 0:
        raise ConfigError("--requests must be >= 1, --warmup and --handshakes >= 0")
    chain_id, family, listen, metrics = _resolve(args)
    counts = _parse_chains(args.chains)
    if args.backend != "native" and args.local is None:
        raise ConfigError("--backend is for --local runs")
    if counts != [1] or args.rounds != 1:
        if args.local is None:
            raise ConfigError("--chains and --rounds are for --local runs")
        if args.backend != "native":
            raise ConfigError("--backend pkcs11 runs one chain (no --chains or --rounds)")
        if args.threshold:
            raise ConfigError("--threshold runs one chain (no --chains or --rounds)")
        return _cmd_chains(args, counts, chain_id, family)
    show_progress = not args.no_progress and not args.json and sys.stderr.isatty()
    bar, update = _progress(show_progress, args.requests + args.warmup)

    def run(
        address: str, targets: list[str], processes: list[tuple[str, int, str | None]] | None = None
    ) -> runner.BenchResult:
        listener = BlockingListener(address, family)
        listener.start()
        opts = _run_options(
            args,
            chain_id,
            family,
            targets,
            handshakes=args.handshakes,
            processes=processes or [],
        )
        try:
            if bar is not None:
                with bar:
                    return runner.run(listener, opts, progress=update)
            return runner.run(listener, opts)
        finally:
            listener.close()

    if args.local is not None:
        # The nodes run in their own sessions; a SIGTERM to the bench must still stop
        # them, so turn it into an exit that unwinds through ``with signers``.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)

        signers = _local_signers(args, chain_id, family)
        setup = _local_setup(args, signers)
        with signers:
            try:
                res = run(signers.listen_address, signers.metrics_targets, signers.processes())
            except (NebulaError, OSError) as e:
                raise NebulaError(f"{e}\n{signers.log_tails()}") from None
            if res.pub_key != signers.key.public_key:
                res.add_error("the signer's public key is not the key the bench generated")
        if args.keep:
            print(f"node directories kept in {signers.workdir}", file=sys.stderr)
    else:
        if listen is None:
            raise ConfigError("no address to listen on: give --listen")
        setup = {
            "mode": f"listen {listen}",
            "transport": listen.partition("://")[0],
            "metrics": metrics,
        }
        res = run(listen, metrics)

    if args.json:
        print(json.dumps(to_json(res, setup), indent=2))
    else:
        print_report(res, setup)
    if args.histogram:
        why = write_histogram(res, args.histogram, f"nebula bench: {setup['mode']}")
        if why:
            print(f"nebula bench: {why}", file=sys.stderr)
        elif not args.json:
            print(f"histogram written to {args.histogram}")
    return 1 if res.errors or res.warmup_errors else 0
