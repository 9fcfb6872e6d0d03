"""Local signers for ``nebula bench --local N``: one node, or an N-node Raft cluster.

With ``chains=K`` (``--chains K``) the nodes serve K chains (``[[chains]]`` entries
``<chain_id>-1`` .. ``<chain_id>-K``), each with its own fresh key and its own validator
address (listen address), all sharing the one sign store.

With ``backend="pkcs11"`` (``--backend pkcs11``) the key is generated inside a SoftHSM2
token (a private installation under the work directory, :mod:`nebula.devnet.softhsm`) when
the nodes start; every other node gets a clone of that token in an installation of its
own, and each signs through PKCS#11 (``[signing.pkcs11]``); ``keys`` then holds the token
key's public side.

The node directories are written by :func:`nebula.devnet.cluster.write_cluster` into a
temporary directory, each node gets a Prometheus endpoint (``metrics.listen``) for the
per-phase breakdown, and every ``nebula start`` process is stopped (SIGTERM, then
SIGKILL) when the context exits, whatever happened.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from nebula.crypto.keys import SigningKey, generate
from nebula.devnet.cluster import ChainDef, NebulaNode, write_cluster
from nebula.devnet.ports import free_port, free_ports
from nebula.errors import ConfigError

if TYPE_CHECKING:
    from nebula.devnet.cometbft import ValidatorKey
    from nebula.devnet.softhsm import SoftHSM

__all__ = ["LocalSigners"]

NODE_COUNTS = (1, 3, 5)
BACKENDS = ("native", "pkcs11")
HSM_TOKEN = "nebula-bench"
MAX_CHAINS = 64


class LocalSigners:
    """Start ``nodes`` Nebula processes dialing ``listen_address``; stop them on exit."""

    def __init__(
        self,
        nodes: int,
        *,
        chain_id: str,
        version: str,
        transport: str = "tcp",
        key_type: str = "ed25519",
        parent: Path | None = None,
        keep: bool = False,
        log_level: str = "info",
        persist: str | None = None,
        chains: int | None = None,
        backend: str = "native",
        threshold: int | None = None,
    ) -> None:
        if chains is not None and not 1 <= chains <= MAX_CHAINS:
            raise ConfigError(f"--chains takes 1..{MAX_CHAINS} chains, got {chains}")
        if nodes not in NODE_COUNTS:
            raise ConfigError(f"--local takes 1, 3 or 5 nodes, got {nodes}")
        if transport not in ("tcp", "unix"):
            raise ConfigError(f"transport must be tcp or unix, got {transport!r}")
        if persist not in (None, "local", "raft"):
            raise ConfigError(f'persist must be "local" or "raft", got {persist!r}')
        if persist == "local" and nodes != 1:
            raise ConfigError('persist = "local" is for one node only')
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "pkcs11" and (key_type not in ("ed25519", "secp256k1") or chains):
            raise ConfigError(
                "--backend pkcs11 signs one chain with an ed25519 or secp256k1 key in a "
                "SoftHSM2 token"
            )
        self.backend = backend
        self.key_type = key_type
        self.hsms: list[SoftHSM] = []  # one SoftHSM2 installation per node (pkcs11)
        if threshold is not None and (
            key_type != "bls12381" or chains is not None or nodes < 3 or persist == "local"
        ):
            raise ConfigError(
                "--threshold needs --key-type bls12381, a 3- or 5-node Raft cluster and one chain"
            )
        #: t of a t-of-N split of the key (BLS-Raft), or None for the whole key on each node
        self.threshold = threshold
        self.nodes_count = nodes
        self._persist = persist
        self.chain_id = chain_id
        self.version = version
        self.transport = transport
        #: None: the single-chain config format (``chain_id`` at the top level), as
        #: before ``--chains``; a number: that many ``[[chains]]`` entries
        self.chains = chains
        if chains is None:
            self.chain_ids = [chain_id]
        else:
            self.chain_ids = [f"{chain_id}-{i}" for i in range(1, chains + 1)]
        self.keys: list[SigningKey | ValidatorKey] = [generate(key_type) for _ in self.chain_ids]
        self.key: SigningKey | ValidatorKey = self.keys[0]
        self.keep = keep
        self.log_level = log_level
        # A fresh directory under ``parent`` (the system temp dir by default): the disk
        # that holds the sign state is what the durable writes are measured on.
        self.workdir = Path(tempfile.mkdtemp(prefix="nebula-bench-", dir=parent))
        if transport == "unix":
            names = (
                ["privval.sock"]
                if chains is None
                else [f"privval-{i}.sock" for i in range(1, chains + 1)]
            )
            self.listen_addresses = [f"unix://{self.workdir / n}" for n in names]
        elif chains is None:
            self.listen_addresses = [f"tcp://127.0.0.1:{free_port()}"]
        else:
            self.listen_addresses = [f"tcp://127.0.0.1:{p}" for p in free_ports(chains)]
        self.listen_address = self.listen_addresses[0]
        self.metrics_targets: list[str] = []
        self.nodes: list[NebulaNode] = []

    @property
    def persist(self) -> str:
        """``local`` for one node unless asked otherwise (``raft``: a one-member cluster)."""
        return self._persist or ("local" if self.nodes_count == 1 else "raft")

    def _token(self) -> dict[str, Any]:
        """Make the SoftHSM2 installations and the key; the write_cluster arguments."""
        from nebula.devnet.softhsm import installations, pkcs11_toml

        self.hsms, key = installations(
            self.workdir / "softhsm", self.nodes_count, HSM_TOKEN, self.key_type
        )
        self.key = key
        self.keys = [key]
        extra = pkcs11_toml(
            self.hsms[0].module, HSM_TOKEN, key_type=self.key_type, public_key=key.public_key
        )
        return {"key": None, "signing": "pkcs11", "extra": extra}

    def start(self) -> LocalSigners:
        if self.chains is None:
            signing: dict[str, Any] = {"key": self.key}
            if self.backend == "pkcs11":
                signing = self._token()
            dirs = write_cluster(
                self.workdir,
                nodes=self.nodes_count,
                chain_id=self.chain_id,
                version=self.version,
                connections=[self.listen_address],
                persist=self.persist,
                log_level=self.log_level,
                **signing,
            )
        else:
            dirs = write_cluster(
                self.workdir,
                nodes=self.nodes_count,
                chains=[
                    ChainDef(cid, self.version, key, [addr])
                    for cid, key, addr in zip(
                        self.chain_ids, self.keys, self.listen_addresses, strict=True
                    )
                ],
                persist=self.persist,
                log_level=self.log_level,
            )
        if self.threshold is not None:
            from nebula.devnet.threshold import give_shares

            # node i gets share i of a t-of-N split instead of the whole key
            give_shares(dirs, self.key, self.threshold)  # type: ignore[arg-type]
        ports = free_ports(len(dirs))
        for d, port in zip(dirs, ports, strict=True):
            target = f"127.0.0.1:{port}"
            with d.config_path.open("a") as f:
                f.write(f'\n[metrics]\nlisten = "{target}"\n')
            self.metrics_targets.append(target)
            env = None
            if self.hsms:  # node i signs from installation i (PIN in its directory)
                hsm = self.hsms[len(self.nodes)]
                hsm.pin_file(d.home)
                env = hsm.env
            self.nodes.append(NebulaNode(d.config_path, log_path=d.log_path, cwd=d.home, env=env))
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()
            raise
        return self

    def processes(self) -> list[tuple[str, int, str | None]]:
        """(label, pid, metrics target) of every running node, for CPU accounting.

        The target tells a Raft member's role (``nebula_raft_role``); a single node
        has none."""
        raft = self.persist == "raft"
        return [
            (f"node {i}", node.pid, target if raft else None)
            for i, (node, target) in enumerate(
                zip(self.nodes, self.metrics_targets, strict=True), start=1
            )
            if node.alive()
        ]

    def log_tails(self, n: int = 1500) -> str:
        return "\n".join(f"--- {node.config_path}:\n{node.log_tail(n)}" for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop(timeout=10)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalSigners:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
