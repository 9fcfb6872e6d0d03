"""`nebula demo`: a local CometBFT chain signed by a local Nebula cluster, no edits needed.

It builds (once, with Go) a pinned CometBFT release, generates a validator key, writes a
fresh demo directory, starts one Nebula node (local state) or a 3/5-node Raft cluster and
a single-validator chain whose ``priv_validator_laddr`` they dial, then prints one line per
committed block after checking our precommit in that block's commit with the public key
(independently of Nebula's signing code). Ctrl-C, ``--blocks N`` or an error stops the
chains first, then the Nebula nodes; every process it started is stopped.

With ``--chains N`` (N > 1) the one Nebula cluster signs N chains at once, each on its own
CometBFT line (the chosen or default release first, then the other entries of
:data:`DEMO_VERSIONS` in order: ``--chains 2`` runs v0.38.25 and v1.0.1) with its own key
(``[[chains]]`` entries in every node's config); every block line names its chain.

With ``--backend pkcs11`` the validator key is generated inside a SoftHSM2 token (a
private installation under the demo directory, PKCS#11); every other Nebula node gets a
clone of that token in an installation of its own, and each node signs through its own.
The key never exists outside a token.  Without SoftHSM2 the demo stops at once and says
how to install it.

Layout of ``--dir`` (wiped at every start; logs stay there after the run)::

    .nebula-demo            marker (and the pid of the demo using the directory)
    cometbft/               the chain's home; cometbft/cometbft.log
                            (with --chains N: cometbft/<chain id>/, one per chain)
    nebula/node<N>/         each Nebula node: nebula.toml, privkey, nebula.log, ...
                            (with --chains N: privkey-0 .. privkey-<N-1>, one per chain;
                            with --backend pkcs11 no key file, the key is in the token)
    softhsm/node<N>/        with --backend pkcs11: node N's SoftHSM2 installation
                            (softhsm2.conf, tokens/; the PIN is nebula/node<N>/hsm_pin)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from nebula.errors import ConfigError, NebulaError

if TYPE_CHECKING:
    from rich.console import Console

    from nebula.crypto.keys import SigningKey
    from nebula.devnet.cluster import NebulaNode, NodeDir
    from nebula.devnet.cometbft import LocalChain, ValidatorKey, VerifiedSignature
    from nebula.devnet.softhsm import SoftHSM

__all__ = ["DEFAULT_VERSION", "DEMO_VERSIONS", "cmd_demo", "register"]

#: The releases the demo runs; with ``--chains N`` the chains take them in this order
#: (starting with ``--cometbft-version`` if given), one CometBFT line per chain.
DEMO_VERSIONS: tuple[str, ...] = ("v0.38.25", "v1.0.1", "v0.34.33", "v0.37.18")
DEFAULT_VERSION = "v0.38.25"
BLS_VERSION = "v1.0.1"
CHAIN_ID = "nebula-demo"
HSM_TOKEN = "nebula-demo"
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
        "--chains",
        type=int,
        choices=range(1, len(DEMO_VERSIONS) + 1),
        default=1,
        metavar="N",
        help=(
            "chains signed at once by the one Nebula cluster, each on its own CometBFT line "
            f"with its own key, in the order {', '.join(DEMO_VERSIONS)} (starting with "
            "--cometbft-version if given; default 1, 2 runs v0.38.25 and v1.0.1)"
        ),
    )
    s.add_argument(
        "--key-type",
        choices=["ed25519", "secp256k1", "bls12381"],
        default="ed25519",
        help="validator key type (bls12381 needs CometBFT v1.0.1, built with BLS)",
    )
    s.add_argument(
        "--backend",
        choices=["native", "pkcs11"],
        default="native",
        help="where the key lives: a key file on each node (native, default) or a SoftHSM2 "
        "token through PKCS#11 (pkcs11: generated inside the token; needs SoftHSM2)",
    )
    s.add_argument(
        "--threshold",
        metavar="T-of-N",
        help="sign with a BLS12-381 key split T-of-N across the N nodes (BLS-Raft, e.g. "
        "2-of-3; implies --key-type bls12381 and --nodes N): no node holds the whole key",
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
    versions: tuple[str, ...]  # one CometBFT release per chain, distinct lines
    key_type: str
    bls: bool
    dir: Path
    blocks: int | None
    timeout_commit: str
    backend: str = "native"
    threshold: tuple[int, int] | None = None  # (t, n): BLS-Raft


def _raft_available() -> str | None:
    """None if the Raft store can be used, else why not."""
    try:
        from nebula.state.raft import RaftStore  # noqa: F401
    except Exception as exc:  # ImportError, or a half-finished module failing at import
        return f"{type(exc).__name__}: {exc}"
    return None


def _plan(args: argparse.Namespace, console: Console) -> _Plan:
    threshold = _threshold(args)
    key_type: str = "bls12381" if threshold else args.key_type
    version: str = args.cometbft_version or (
        BLS_VERSION if key_type == "bls12381" else DEFAULT_VERSION
    )
    bls = key_type == "bls12381"
    if bls and not version.startswith("v1."):
        raise ConfigError(
            f"--key-type bls12381 needs --cometbft-version {BLS_VERSION} (CometBFT {version} "
            "has no BLS12-381 validators)"
        )
    chains: int = args.chains
    if bls and chains > 1:
        raise ConfigError(
            f"--key-type bls12381 runs one chain: only CometBFT {BLS_VERSION} has BLS12-381 "
            f"validators, and --chains {chains} puts each chain on another line"
        )
    versions = (version, *[v for v in DEMO_VERSIONS if v != version][: chains - 1])
    backend: str = getattr(args, "backend", "native")
    if backend == "pkcs11":
        from nebula.devnet.softhsm import check_installed

        if key_type not in ("ed25519", "secp256k1"):
            raise ConfigError("--backend pkcs11 signs ed25519 and secp256k1 keys, not bls12381")
        if chains > 1:
            raise ConfigError("--backend pkcs11 runs one chain (give it without --chains)")
        check_installed()  # SoftHSMMissing says how to install it
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
    if threshold is not None:
        nodes = threshold[1]
    return _Plan(
        nodes=3 if nodes is None else nodes,
        versions=versions,
        key_type=key_type,
        bls=bls,
        dir=Path(args.dir).expanduser().resolve(),
        blocks=args.blocks,
        timeout_commit=args.timeout_commit,
        backend=backend,
        threshold=threshold,
    )


def _threshold(args: argparse.Namespace) -> tuple[int, int] | None:
    """--threshold T-of-N, checked against the other options (None without it)."""
    text = getattr(args, "threshold", None)
    if not text:
        return None
    from nebula.devnet.threshold import parse_t_of_n

    t, n = parse_t_of_n(text)
    if args.key_type not in ("ed25519", "bls12381"):  # ed25519: the default
        raise ConfigError("--threshold splits a bls12381 key")
    if args.nodes is not None and args.nodes != n:
        raise ConfigError(f"--threshold {text} runs {n} nodes, not --nodes {args.nodes}")
    if args.chains > 1 or getattr(args, "backend", "native") != "native":
        raise ConfigError("--threshold runs one chain with native key shares")
    return t, n


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


@dataclass(slots=True)
class _DemoChain:
    """One chain of the demo: its node, its validator key, and how far it was followed."""

    chain: LocalChain
    key: SigningKey | ValidatorKey  # a ValidatorKey (public side only) for a key in a token
    laddr: str  # the priv_validator_laddr Nebula dials
    next_h: int = 1  # the next height to verify and print
    deadline: float = 0.0  # monotonic time by which that height must be committed
    verified: int = 0

    @property
    def chain_id(self) -> str:
        return self.chain.chain_id


@dataclass(slots=True)
class _Demo:
    plan: _Plan
    console: Console
    chains: list[_DemoChain] = field(default_factory=list)
    nodes: list[NebulaNode] = field(default_factory=list)
    node_dirs: list[NodeDir] = field(default_factory=list)
    last_leader: str | None = None
    own_dir: bool = False

    @property
    def verified(self) -> int:
        return sum(c.verified for c in self.chains)

    @property
    def multi(self) -> bool:
        return len(self.plan.versions) > 1

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
            where = (
                f" on {len(self.chains)} chains ("
                + ", ".join(f"{c.chain_id} {c.verified}" for c in self.chains)
                + ")"
                if self.multi
                else ""
            )
            console.print(
                f"[bold green]{self.verified} block(s) committed{escape(where)}, "
                "every signature verified[/]"
            )
        elif code == 0 and self.chains:
            console.print("[yellow]stopped before the first block was committed[/]")
        return code

    # -- setup --

    def _setup(self) -> None:
        from nebula.crypto.keys import generate
        from nebula.devnet.cluster import ChainDef, NebulaNode, config_version, write_cluster
        from nebula.devnet.cometbft import LocalChain, ValidatorKey
        from nebula.devnet.ports import free_port

        p, console = self.plan, self.console
        _prepare_dir(p.dir)
        self.own_dir = True
        binaries = [self._ensure_binary(v) for v in p.versions]
        hsms: list[SoftHSM] = []
        hsm_key: ValidatorKey | None = None
        if p.backend == "pkcs11":
            from nebula.devnet.softhsm import installations

            hsms, hsm_key = installations(p.dir / "softhsm", p.nodes, HSM_TOKEN, p.key_type)

        chains: list[_DemoChain] = []
        for i, (version, binary) in enumerate(zip(p.versions, binaries, strict=True)):
            chain_id = f"{CHAIN_ID}-{i + 1}" if self.multi else CHAIN_ID
            key = generate(p.key_type) if hsm_key is None else hsm_key
            laddr = f"tcp://127.0.0.1:{free_port()}"
            chain = LocalChain(
                binary,
                p.dir / "cometbft" / chain_id if self.multi else p.dir / "cometbft",
                version=version,
                chain_id=chain_id,
                validator=ValidatorKey(key.key_type, key.public_key),
                priv_validator_laddr=laddr,
                timeout_commit=p.timeout_commit,
                moniker=chain_id,
            )
            chain.init()
            chains.append(_DemoChain(chain, key, laddr))
        if self.multi:
            self.node_dirs = write_cluster(
                p.dir / "nebula",
                nodes=p.nodes,
                chains=[
                    ChainDef(c.chain_id, config_version(c.chain.version), c.key, [c.laddr])
                    for c in chains
                ],
                log_level="info",
            )
        else:
            (c,) = chains
            self.node_dirs = write_cluster(
                p.dir / "nebula",
                nodes=p.nodes,
                chain_id=c.chain_id,
                version=config_version(c.chain.version),
                key=c.key if not hsms else None,
                connections=[c.laddr],
                log_level="info",
                **(self._pkcs11_config(hsms[0], c.key) if hsms else {}),
            )
            for nd, hsm in zip(self.node_dirs, hsms, strict=False):
                hsm.pin_file(nd.home)
            if p.threshold is not None:
                from nebula.devnet.threshold import give_shares

                give_shares(self.node_dirs, c.key, p.threshold[0])

        mode = "local state" if p.nodes == 1 else f"Raft cluster of {p.nodes}"
        if self.multi:
            console.print(
                f"[bold]chains[/]     {len(chains)} single-validator chains on different "
                "CometBFT lines, each with its own key, all signed by one Nebula "
                + ("node" if p.nodes == 1 else "cluster")
            )
        for c, binary in zip(chains, binaries, strict=True):
            console.print(
                f"[bold]chain[/]      {c.chain_id} on CometBFT {c.chain.version} "
                f"({escape(str(binary))})"
            )
            console.print(
                f"[bold]validator[/]  {c.key.key_type} key, address {c.key.address.hex().upper()}"
            )
            if hsms:
                console.print(
                    f"             generated inside SoftHSM2 token {HSM_TOKEN!r} (PKCS#11, "
                    f"{escape(str(hsms[0].root))}); it never leaves a token"
                )
                if len(hsms) > 1:
                    console.print(
                        f"             nodes 2-{len(hsms)} sign from clones of that token, "
                        "each in a SoftHSM2 installation of its own"
                    )
            if self.multi:
                console.print(f"             Nebula dials it at {c.laddr}")
        if self.multi:
            both = "both" if len(chains) == 2 else f"all {len(chains)}"
            console.print(f"[bold]signer[/]     Nebula, {mode}, signing {both} chains")
        else:
            through = ", signing through PKCS#11" if hsms else ""
            if p.threshold is not None:
                through = (
                    f", {p.threshold[0]}-of-{p.threshold[1]} threshold BLS (each node holds "
                    "one key share, none the whole key)"
                )
            console.print(
                f"[bold]signer[/]     Nebula, {mode}{through}, dialing the chain at "
                f"{chains[0].laddr}"
            )
        for i, nd in enumerate(self.node_dirs):
            env = hsms[i].env if hsms else None
            node = NebulaNode(nd.config_path, log_path=nd.log_path, env=env).start()
            self.nodes.append(node)
            raft = f", raft {nd.raft_addr}" if nd.raft_addr else ""
            console.print(
                f"             node{nd.node_id}: pid {node.pid}{raft}, "
                f"config {escape(str(nd.config_path))}"
            )
        for c in chains:
            self.chains.append(c)
            c.chain.start()
        if self.multi:
            for c in chains:
                console.print(f"[bold]rpc[/]        {c.chain_id} {c.chain.rpc_url}")
        else:
            console.print(f"[bold]rpc[/]        {chains[0].chain.rpc_url}")
        if p.nodes > 1:
            console.print(
                "tip: `kill <pid>` the leader in another terminal and watch another node take over"
            )
        console.print("waiting for the first block (Ctrl-C to stop)...")

    @staticmethod
    def _pkcs11_config(hsm: SoftHSM, key: SigningKey | ValidatorKey) -> dict[str, Any]:
        """write_cluster arguments for nodes signing with ``key`` in their token (each
        node's SOFTHSM2_CONF names its own installation; the PIN is ``./hsm_pin``)."""
        from nebula.devnet.softhsm import pkcs11_toml

        extra = pkcs11_toml(hsm.module, HSM_TOKEN, key_type=key.key_type, public_key=key.public_key)
        return {"signing": "pkcs11", "extra": extra}

    def _ensure_binary(self, version: str) -> Path:
        from nebula.devnet.cometbft import (
            GoToolchainMissing,
            cached_cometbft,
            cometbft_binary_path,
            ensure_cometbft,
        )

        p, console = self.plan, self.console
        cached = cached_cometbft(version, bls=p.bls)
        if cached is not None:
            return cached
        what = f"CometBFT {version}" + (" with BLS12-381" if p.bls else "")
        log = cometbft_binary_path(version, bls=p.bls).parent / "build.log"
        console.print(
            f"building {what} with Go (first run only; this takes one to a few minutes; log: {escape(str(log))})"
        )
        started = time.monotonic()
        try:
            with console.status(f"building {what}..."):
                binary = ensure_cometbft(version, bls=p.bls)
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
        for c in self.chains:
            if not c.chain.is_running():
                what = f"CometBFT ({c.chain_id})" if self.multi else "CometBFT"
                raise DemoError(f"{what} exited; see {c.chain.log_path}")
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

    @staticmethod
    def _latest_height(chain: LocalChain) -> int:
        from nebula.devnet.cometbft import DevnetError

        try:
            return chain.latest_height()
        except DevnetError:
            return 0  # RPC not up yet

    def _done(self, c: _DemoChain) -> bool:
        return self.plan.blocks is not None and c.next_h > self.plan.blocks

    def _follow(self) -> None:
        """Verify and print every chain's blocks as they come, until ``--blocks`` on each
        (or Ctrl-C); a chain without its next block in time is an error."""
        p = self.plan
        start = time.monotonic()
        for c in self.chains:
            c.deadline = start + FIRST_BLOCK_TIMEOUT_S
        while not all(self._done(c) for c in self.chains):
            self._check_processes()
            progressed = False
            for c in self.chains:
                if self._done(c):
                    continue
                latest = self._latest_height(c.chain)
                if latest < c.next_h:
                    if time.monotonic() > c.deadline:
                        what, waited = (
                            ("the first block", FIRST_BLOCK_TIMEOUT_S)
                            if c.next_h == 1
                            else (f"block {c.next_h}", STALL_TIMEOUT_S)
                        )
                        on = f" on {c.chain_id}" if self.multi else ""
                        raise DemoError(
                            f"no {what}{on} after {waited:.0f} s; see the logs in {p.dir}"
                        )
                    continue
                last = latest if p.blocks is None else min(latest, p.blocks)
                for h in range(c.next_h, last + 1):
                    self._verify_and_print(c, h)
                c.deadline = time.monotonic() + STALL_TIMEOUT_S
                progressed = True
            if not progressed:
                time.sleep(0.05)

    def _verify_and_print(self, c: _DemoChain, h: int) -> None:
        from nebula.devnet.cometbft import (
            VERIFIERS,
            DevnetError,
            duplicate_vote_evidence,
            verify_commit_signatures,
        )

        on = f" of {c.chain_id}" if self.multi else ""
        try:
            header = c.chain.rpc("commit", height=h)["signed_header"]["header"]
            (sig,) = verify_commit_signatures(
                c.chain, c.key.public_key, c.key.key_type, [h], VERIFIERS[c.key.key_type]
            )
            evidence = duplicate_vote_evidence(c.chain, h, h)
        except DevnetError as exc:
            raise DemoError(f"block {h}{on}: {exc}") from None
        if evidence:
            raise DemoError(f"block {h}{on} holds double-sign evidence: {evidence}")
        c.verified += 1
        c.next_h = h + 1
        self._print_block(c, h, header["time"], sig)

    def _print_block(self, c: _DemoChain, h: int, block_time: str, sig: VerifiedSignature) -> None:
        leader = self._leader()
        if len(self.nodes) > 1 and leader != self.last_leader:
            if self.last_leader is not None:
                self.console.print(f"[yellow]leader changed: {self.last_leader} -> {leader}[/]")
            self.last_leader = leader
        round_note = f", round {sig.round}" if sig.round else ""
        chain = f"[magenta]{escape(c.chain_id)}[/]  " if self.multi else ""
        self.console.print(
            f"{chain}height [bold]{h:>6}[/]  {_local_time(block_time)}  "
            f"block {_short(sig.vote.block_id.hash)}  leader [cyan]{leader}[/]  "
            f"[green]signature verified[/] ({self.plan.key_type}{round_note})"
        )

    # -- shutdown: the chains first, then the signers --

    def _shutdown(self) -> None:
        console = self.console
        # Every stop runs even if one fails (the first error is raised after them all):
        # the chains first, in order, then the Nebula nodes.
        with contextlib.ExitStack() as stops:
            for node in reversed(self.nodes):
                stops.callback(node.stop)
            for c in reversed(self.chains):
                stops.callback(c.chain.stop)
        if self.chains or self.nodes:
            console.print("all processes stopped. logs:")
            for c in self.chains:
                label = f"cometbft {c.chain_id}" if self.multi else "cometbft"
                console.print(f"  {label}  {escape(str(c.chain.log_path))}")
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
