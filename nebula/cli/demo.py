"""`nebula demo`: a local CometBFT chain signed by a local Nebula cluster, no edits needed.

It builds (once, with Go) a pinned CometBFT release, generates a validator key, writes a
fresh demo directory, starts one Nebula node (local state) or a 3/5-node Raft cluster and
a single-validator chain whose ``priv_validator_laddr`` they dial, then prints one line per
committed block after checking our precommit in that block's commit with the public key
(independently of Nebula's signing code). Ctrl-C, ``--blocks N`` or an error stops the
chain first, then the Nebula nodes; every process it started is stopped.

Layout of ``--dir`` (wiped at every start; logs stay there after the run)::

    .nebula-demo            marker (and the pid of the demo using the directory)
    cometbft/               the chain's home; cometbft/cometbft.log
    nebula/node<N>/         each Nebula node: nebula.toml, privkey, nebula.log, ...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from nebula.errors import ConfigError, NebulaError

if TYPE_CHECKING:
    from rich.console import Console

    from nebula.crypto.keys import SigningKey
    from nebula.devnet.cluster import NebulaNode, NodeDir
    from nebula.devnet.cometbft import LocalChain, VerifiedSignature

__all__ = ["DEFAULT_VERSION", "DEMO_VERSIONS", "cmd_demo", "register"]

DEMO_VERSIONS: tuple[str, ...] = ("v0.38.25", "v1.0.1", "v0.34.33", "v0.37.18")
DEFAULT_VERSION = "v0.38.25"
BLS_VERSION = "v1.0.1"
CHAIN_ID = "nebula-demo"
MARKER = ".nebula-demo"
# How long the first block may take (CometBFT start, Raft election, signer connection),
# and how long the chain may then go without a new block before the demo gives up.
FIRST_BLOCK_TIMEOUT_S = 90.0
STALL_TIMEOUT_S = 30.0
_DURATION_RE = re.compile(r"^\d+(\.\d+)?(ms|s|m)$")


class DemoError(NebulaError):
    """The demo could not run or the chain misbehaved (the message says what and where)."""


class _Stop(Exception):
    """SIGTERM or SIGHUP: shut down like Ctrl-C."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``nebula demo`` to the CLI."""
    s = subparsers.add_parser(
        "demo",
        help="run a local CometBFT chain signed by a local Nebula cluster",
        description=(
            "Start a local single-validator CometBFT chain whose validator key lives in a "
            "local Nebula cluster, and print every committed block with its verified "
            "signature. Needs Go the first time (to build CometBFT). Ctrl-C stops it."
        ),
    )
    s.add_argument(
        "--nodes",
        type=int,
        choices=[1, 3, 5],
        default=None,
        help="Nebula nodes: 1 (local state) or a 3/5-node Raft cluster (default 3)",
    )
    s.add_argument(
        "--cometbft-version",
        choices=DEMO_VERSIONS,
        default=None,
        help=f"CometBFT release (default {DEFAULT_VERSION}; {BLS_VERSION} for bls12381)",
    )
    s.add_argument(
        "--key-type",
        choices=["ed25519", "secp256k1", "bls12381"],
        default="ed25519",
        help="validator key type (bls12381 needs CometBFT v1.0.1, built with BLS)",
    )
    s.add_argument(
        "--dir",
        default="./nebula-demo",
        help="demo directory, wiped and rewritten at every start (default ./nebula-demo)",
    )
    s.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="stop after this many verified blocks (default: run until Ctrl-C)",
    )
    s.add_argument(
        "--timeout-commit",
        default="1s",
        help="CometBFT consensus.timeout_commit, i.e. the pause between blocks (default 1s)",
    )
    s.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    try:
        plan = _plan(args, console)
    except NebulaError as exc:
        console.print(f"[bold red]nebula demo:[/] {escape(str(exc))}")
        return 2
    demo = _Demo(plan, console)
    return demo.run()


# ---- the plan: validated options --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    nodes: int
    version: str
    key_type: str
    bls: bool
    dir: Path
    blocks: int | None
    timeout_commit: str


def _raft_available() -> str | None:
    """None if the Raft store can be used, else why not."""
    try:
        from nebula.state.raft import RaftStore  # noqa: F401
    except Exception as exc:  # ImportError, or a half-finished module failing at import
        return f"{type(exc).__name__}: {exc}"
    return None


def _plan(args: argparse.Namespace, console: Console) -> _Plan:
    key_type: str = args.key_type
    version: str = args.cometbft_version or (
        BLS_VERSION if key_type == "bls12381" else DEFAULT_VERSION
    )
    bls = key_type == "bls12381"
    if bls and not version.startswith("v1."):
        raise ConfigError(
            f"--key-type bls12381 needs --cometbft-version {BLS_VERSION} (CometBFT {version} "
            "has no BLS12-381 validators)"
        )
    if args.blocks is not None and args.blocks < 1:
        raise ConfigError(f"--blocks must be >= 1, got {args.blocks}")
    if not _DURATION_RE.match(args.timeout_commit):
        raise ConfigError(
            f"--timeout-commit must be a duration like 500ms, 1s or 1.5s, got "
            f"{args.timeout_commit!r}"
        )
    nodes = args.nodes
    if nodes is None or nodes > 1:
        why = _raft_available()
        if why is not None:
            if nodes is not None:
                raise ConfigError(
                    f"--nodes {nodes} needs the Raft store, which cannot be loaded ({why}); "
                    "use --nodes 1"
                )
            console.print(
                f"[yellow]note: the Raft store cannot be loaded ({why}); running a single "
                "Nebula node with local state instead of a 3-node cluster[/]"
            )
            nodes = 1
    return _Plan(
        nodes=3 if nodes is None else nodes,
        version=version,
        key_type=key_type,
        bls=bls,
        dir=Path(args.dir).expanduser().resolve(),
        blocks=args.blocks,
        timeout_commit=args.timeout_commit,
    )


# ---- the demo directory ----------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_dir(path: Path) -> None:
    """Wipe ``path`` if it is a previous demo directory (or empty); refuse anything else."""
    marker = path / MARKER
    if path.exists():
        if not path.is_dir():
            raise DemoError(f"{path} exists and is not a directory; pass another --dir")
        if marker.is_file():
            with contextlib.suppress(ValueError, OSError):
                pid = int(marker.read_text().strip() or "0")
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise DemoError(
                        f"another nebula demo (pid {pid}) is using {path}; stop it or pass "
                        "another --dir"
                    )
        elif any(path.iterdir()):
            raise DemoError(
                f"{path} is not empty and is not a nebula demo directory; refusing to wipe it. "
                "Pass another --dir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    marker.write_text(f"{os.getpid()}\n")


# ---- running it ------------------------------------------------------------------------


def _short(h: bytes) -> str:
    return h.hex().upper()[:12]


def _local_time(rfc3339: str) -> str:
    from nebula.devnet.cometbft import parse_rfc3339_nano

    ts = parse_rfc3339_nano(rfc3339)
    t = _dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9)
    return t.strftime("%H:%M:%S.") + f"{ts.nanos // 1_000_000:03d}"


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt (even if SIGINT was inherited as ignored, as for
    background jobs of a non-interactive shell); SIGTERM and SIGHUP stop the demo alike."""

    def handler(signum: int, frame: Any) -> None:
        raise _Stop()

    sigs = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: handler,
        signal.SIGHUP: handler,
    }
    previous = {sig: signal.signal(sig, h) for sig, h in sigs.items()}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Let the shutdown finish: a second Ctrl-C must not leave processes behind."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


class _Demo:
    def __init__(self, plan: _Plan, console: Console) -> None:
        self.plan = plan
        self.console = console
        self.chain: LocalChain | None = None
        self.nodes: list[NebulaNode] = []
        self.node_dirs: list[NodeDir] = []
        self.key: SigningKey | None = None
        self.verified = 0
        self.last_leader: str | None = None
        self.own_dir = False

    # -- top level --

    def run(self) -> int:
        console = self.console
        code = 0
        # If anything still escapes (a signal in the gap below, a bug), the atexit hooks
        # of nebula.devnet kill every process it started.
        with _stop_on_signals():
            try:
                try:
                    self._setup()
                    self._follow()
                except (KeyboardInterrupt, _Stop):
                    console.print("\n[bold]stopping[/] (interrupted)")
                except (NebulaError, OSError) as exc:
                    console.print(f"[bold red]nebula demo failed:[/] {escape(str(exc))}")
                    code = 1
            finally:
                with _no_interrupts():
                    self._shutdown()
        if code == 0 and self.verified:
            console.print(
                f"[bold green]{self.verified} block(s) committed, every signature verified[/]"
            )
        elif code == 0 and self.chain is not None:
            console.print("[yellow]stopped before the first block was committed[/]")
        return code

    # -- setup --

    def _setup(self) -> None:
        from nebula.crypto.keys import generate
        from nebula.devnet.cluster import NebulaNode, config_version, write_cluster
        from nebula.devnet.cometbft import LocalChain, ValidatorKey
        from nebula.devnet.ports import free_port

        p, console = self.plan, self.console
        _prepare_dir(p.dir)
        self.own_dir = True
        binary = self._ensure_binary()

        self.key = key = generate(p.key_type)
        validator = ValidatorKey(key.key_type, key.public_key)
        laddr = f"tcp://127.0.0.1:{free_port()}"
        chain = LocalChain(
            binary,
            p.dir / "cometbft",
            version=p.version,
            chain_id=CHAIN_ID,
            validator=validator,
            priv_validator_laddr=laddr,
            timeout_commit=p.timeout_commit,
            moniker="nebula-demo",
        )
        chain.init()
        self.node_dirs = write_cluster(
            p.dir / "nebula",
            nodes=p.nodes,
            chain_id=CHAIN_ID,
            version=config_version(p.version),
            key=key,
            connections=[laddr],
            log_level="info",
        )

        mode = "local state" if p.nodes == 1 else f"Raft cluster of {p.nodes}"
        console.print(
            f"[bold]chain[/]      {CHAIN_ID} on CometBFT {p.version} ({escape(str(binary))})"
        )
        console.print(
            f"[bold]validator[/]  {key.key_type} key, address {key.address.hex().upper()}"
        )
        console.print(f"[bold]signer[/]     Nebula, {mode}, dialing the chain at {laddr}")
        for nd in self.node_dirs:
            node = NebulaNode(nd.config_path, log_path=nd.log_path).start()
            self.nodes.append(node)
            raft = f", raft {nd.raft_addr}" if nd.raft_addr else ""
            console.print(
                f"             node{nd.node_id}: pid {node.pid}{raft}, "
                f"config {escape(str(nd.config_path))}"
            )
        self.chain = chain
        chain.start()
        console.print(f"[bold]rpc[/]        {chain.rpc_url}")
        if p.nodes > 1:
            console.print(
                "tip: `kill <pid>` the leader in another terminal and watch another node take over"
            )
        console.print("waiting for the first block (Ctrl-C to stop)...")

    def _ensure_binary(self) -> Path:
        from nebula.devnet.cometbft import (
            GoToolchainMissing,
            cached_cometbft,
            cometbft_binary_path,
            ensure_cometbft,
        )

        p, console = self.plan, self.console
        cached = cached_cometbft(p.version, bls=p.bls)
        if cached is not None:
            return cached
        what = f"CometBFT {p.version}" + (" with BLS12-381" if p.bls else "")
        log = cometbft_binary_path(p.version, bls=p.bls).parent / "build.log"
        console.print(
            f"building {what} with Go (first run only; this takes one to a few minutes; log: {escape(str(log))})"
        )
        started = time.monotonic()
        try:
            with console.status(f"building {what}..."):
                binary = ensure_cometbft(p.version, bls=p.bls)
        except GoToolchainMissing as exc:
            raise DemoError(
                f"{exc} The demo builds CometBFT from source once: install Go 1.22 or newer "
                "(https://go.dev/dl/), or point NEBULA_CMT_CACHE at a directory holding "
                f"<version>/cometbft"
            ) from None
        console.print(f"built {what} in {time.monotonic() - started:.0f} s: {escape(str(binary))}")
        return binary

    # -- the block loop --

    def _check_processes(self) -> None:
        chain = self.chain
        if chain is not None and not chain.is_running():
            raise DemoError(f"CometBFT exited; see {chain.log_path}")
        if self.nodes and not any(n.alive() for n in self.nodes):
            logs = ", ".join(str(n.log_path) for n in self.nodes)
            raise DemoError(f"every Nebula node exited; see {logs}")

    def _leader(self) -> str:
        if len(self.nodes) == 1:
            return "node1" if self.nodes[0].alive() else "node1 (exited)"
        leaders = [
            f"node{nd.node_id}"
            for nd, node in zip(self.node_dirs, self.nodes, strict=True)
            if node.alive() and node.is_leader()
        ]
        return ",".join(leaders) if leaders else "none"

    def _latest_height(self) -> int:
        from nebula.devnet.cometbft import DevnetError

        assert self.chain is not None
        try:
            return self.chain.latest_height()
        except DevnetError:
            return 0  # RPC not up yet

    def _follow(self) -> None:
        from nebula.devnet.cometbft import (
            VERIFIERS,
            DevnetError,
            duplicate_vote_evidence,
            verify_commit_signatures,
        )

        chain, key, p = self.chain, self.key, self.plan
        assert chain is not None and key is not None
        verify = VERIFIERS[key.key_type]
        next_h = 1
        deadline = time.monotonic() + FIRST_BLOCK_TIMEOUT_S
        while p.blocks is None or next_h <= p.blocks:
            self._check_processes()
            latest = self._latest_height()
            if latest < next_h:
                if time.monotonic() > deadline:
                    what, waited = (
                        ("the first block", FIRST_BLOCK_TIMEOUT_S)
                        if next_h == 1
                        else (f"block {next_h}", STALL_TIMEOUT_S)
                    )
                    raise DemoError(f"no {what} after {waited:.0f} s; see the logs in {p.dir}")
                time.sleep(0.05)
                continue
            last = latest if p.blocks is None else min(latest, p.blocks)
            for h in range(next_h, last + 1):
                try:
                    header = chain.rpc("commit", height=h)["signed_header"]["header"]
                    (sig,) = verify_commit_signatures(
                        chain, key.public_key, key.key_type, [h], verify
                    )
                    evidence = duplicate_vote_evidence(chain, h, h)
                except DevnetError as exc:
                    raise DemoError(f"block {h}: {exc}") from None
                if evidence:
                    raise DemoError(f"block {h} holds double-sign evidence: {evidence}")
                self.verified += 1
                self._print_block(h, header["time"], sig)
                next_h = h + 1
            deadline = time.monotonic() + STALL_TIMEOUT_S

    def _print_block(self, h: int, block_time: str, sig: VerifiedSignature) -> None:
        leader = self._leader()
        if len(self.nodes) > 1 and leader != self.last_leader:
            if self.last_leader is not None:
                self.console.print(f"[yellow]leader changed: {self.last_leader} -> {leader}[/]")
            self.last_leader = leader
        round_note = f", round {sig.round}" if sig.round else ""
        self.console.print(
            f"height [bold]{h:>6}[/]  {_local_time(block_time)}  "
            f"block {_short(sig.vote.block_id.hash)}  leader [cyan]{leader}[/]  "
            f"[green]signature verified[/] ({self.plan.key_type}{round_note})"
        )

    # -- shutdown: the chain first, then the signers --

    def _shutdown(self) -> None:
        console = self.console
        try:
            if self.chain is not None:
                self.chain.stop()
        finally:
            for node in self.nodes:
                node.stop()
        if self.chain is not None or self.nodes:
            console.print("all processes stopped. logs:")
            if self.chain is not None:
                console.print(f"  cometbft  {escape(str(self.chain.log_path))}")
            for nd in self.node_dirs:
                console.print(f"  node{nd.node_id}     {escape(str(nd.log_path))}")
        if self.own_dir:
            with contextlib.suppress(OSError):
                (self.plan.dir / MARKER).write_text("0\n")  # the directory is free again


def main(argv: list[str] | None = None) -> int:
    """``python -m nebula.cli.demo``: the same as ``nebula demo``."""
    parser = argparse.ArgumentParser(prog="nebula")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
