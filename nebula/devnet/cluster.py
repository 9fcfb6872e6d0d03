"""Nebula node directories and ``nebula start`` processes on this machine.

Shared by ``nebula demo`` and the tests. :func:`write_node_dir` writes one node's
directory (config, key file, cluster secret); :func:`write_cluster` writes a whole local
cluster: one node with ``persist = "local"`` or N nodes replicating their sign state with
Raft on 127.0.0.1 ports. :class:`NebulaNode` runs ``python -m nebula.cli.main start``
for one config as a child process in its own session, logging to a file; every node still
running when the interpreter exits is killed (atexit).

Layout of a node directory::

    <home>/nebula.toml      the config (relative paths are relative to it)
    <home>/privkey          the validator key (native signing), 0600
    <home>/cluster_secret   the Raft cluster secret (raft only), 0600
    <home>/state.json       the local sign state (local only)
    <home>/raft_data/       the Raft journal and snapshots (raft only)
    <home>/nebula.log       stdout and stderr of the process
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nebula
from nebula.crypto.keys import SigningKey, write_key_file, write_private_file
from nebula.devnet.cometbft import DevnetError
from nebula.devnet.ports import free_ports
from nebula.errors import ConfigError
from nebula.types import WireFamily

__all__ = [
    "CONFIG_NAME",
    "LOG_NAME",
    "ChainDef",
    "NebulaNode",
    "NodeDir",
    "config_version",
    "write_cluster",
    "write_node_dir",
]

CONFIG_NAME = "nebula.toml"
LOG_NAME = "nebula.log"
KEY_NAME = "privkey"
SECRET_NAME = "cluster_secret"
_CMT_VERSION_RE = re.compile(r"^v(\d+)\.(\d+)\.\d+$")


def config_version(cometbft_version: str) -> str:
    """Nebula's ``version`` setting for a CometBFT release: ``"v0.38.25"`` -> ``"v0_38"``."""
    m = _CMT_VERSION_RE.match(cometbft_version)
    if m is None:
        raise ConfigError(f"CometBFT version must look like 'v0.38.25', got {cometbft_version!r}")
    line = f"v{m.group(1)}_{m.group(2)}"
    try:
        WireFamily.from_config(line)
    except ValueError as exc:
        raise ConfigError(f"Nebula does not speak CometBFT {cometbft_version}: {exc}") from None
    return line


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) as a TOML value")


@dataclass(frozen=True, slots=True)
class ChainDef:
    """One chain of a multi-chain node directory: written as a ``[[chains]]`` entry with
    its own native key file (``privkey-<chain index>``)."""

    chain_id: str
    version: str
    key: SigningKey
    connections: Sequence[str]


def _chain_lines(home: Path, chains: Sequence[ChainDef]) -> list[str]:
    lines: list[str] = []
    for i, c in enumerate(chains):
        key_name = f"{KEY_NAME}-{i}"
        write_key_file(home / key_name, c.key, overwrite=True)
        lines += [
            "[[chains]]",
            f"chain_id = {_toml_str(c.chain_id)}",
            f"version = {_toml_str(c.version)}",
            'signing_mode = "native"',
            "[chains.signing.native]",
            f"private_key_path = {_toml_str('./' + key_name)}",
            f"key_type = {_toml_str(c.key.key_type)}",
        ]
        for a in c.connections:
            lines += ["[[chains.connections]]", f"address = {_toml_str(a)}"]
    return lines


@dataclass(frozen=True, slots=True)
class NodeDir:
    """One written node directory."""

    home: Path
    config_path: Path
    log_path: Path
    node_id: int  # the Raft node id (1 for a single local node)
    raft_addr: str | None  # "127.0.0.1:port" of its Raft listener, None for persist="local"


def write_node_dir(
    home: Path,
    *,
    chain_id: str = "",
    version: str = "",
    key: SigningKey | None = None,
    connections: Sequence[str] = (),
    chains: Sequence[ChainDef] | None = None,
    persist: str = "local",
    raft: Mapping[str, Any] | None = None,
    secret: bytes | None = None,
    extra: str = "",
    signing: str | None = None,
    log_format: str = "text",
    log_level: str = "debug",
    backoff_min: float = 0.05,
    backoff_max: float = 0.5,
) -> NodeDir:
    """Write ``home/nebula.toml`` (and ``home/privkey``, ``home/cluster_secret``).

    ``version`` is Nebula's wire-family setting ("v0_38", see :func:`config_version`),
    ``connections`` the validator addresses to dial ("tcp://host:port" or "unix://path").
    ``raft`` holds the ``[raft]`` keys, ``peers`` as ``{node_id: "host:port"}``; with
    ``secret`` the cluster secret is written (0600) to ``raft["secret_path"]`` (default
    ``./cluster_secret``). With ``signing=None`` and a ``key``, the key goes to
    ``./privkey`` and ``[signing.native]`` is written; with ``signing`` set, the caller
    puts the ``[signing.<mode>]`` section into ``extra`` (raw TOML for the top level).
    With ``chains`` the node serves several chains (``[[chains]]`` entries, each with its
    own key file) and ``chain_id``, ``version``, ``key``, ``connections`` and ``signing``
    must be left out.
    """
    if chains is not None and (chain_id or version or key or connections or signing):
        raise ConfigError("give either chains or chain_id/version/key/connections")
    if chains is None and not (chain_id and version):
        raise ConfigError("a node directory needs chain_id and version (or chains)")
    if persist not in ("local", "raft"):
        raise ConfigError(f'persist must be "local" or "raft", got {persist!r}')
    if persist == "raft" and raft is None:
        raise ConfigError('persist = "raft" needs the raft settings')
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / CONFIG_NAME
    chain_keys = (
        []
        if chains is not None
        else [
            f"chain_id = {_toml_str(chain_id)}",
            f"version = {_toml_str(version)}",
            f"signing_mode = {_toml_str('native' if signing is None else signing)}",
        ]
    )
    lines = [
        *chain_keys,
        f"log_format = {_toml_str(log_format)}",
        f"log_level = {_toml_str(log_level)}",
        f"persist = {_toml_str(persist)}",
        'state_path = "./state.json"',
        extra,
        "[dial]",
        f"backoff_min = {backoff_min!r}",
        f"backoff_max = {backoff_max!r}",
    ]
    for c in connections:
        lines += ["[[connections]]", f"address = {_toml_str(c)}"]
    node_id = 1
    raft_addr: str | None = None
    if raft is not None:
        settings = dict(raft)
        peers: Mapping[int, str] = settings.pop("peers", {})
        if secret is not None:
            settings.setdefault("secret_path", f"./{SECRET_NAME}")
        node_id = int(settings.get("node_id", 1))
        raft_addr = peers.get(node_id)
        lines += ["[raft]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
        for pid, addr in peers.items():
            lines += ["[[raft.peers]]", f"id = {int(pid)}", f"addr = {_toml_str(addr)}"]
        if secret is not None:
            secret_path = Path(settings["secret_path"])
            if not secret_path.is_absolute():
                secret_path = home / secret_path
            write_private_file(secret_path, secret, overwrite=True)
    if chains is not None:
        lines += _chain_lines(home, chains)
    elif signing is None and key is not None:
        write_key_file(home / KEY_NAME, key, overwrite=True)
        lines += [
            "[signing.native]",
            f'private_key_path = "./{KEY_NAME}"',
            f"key_type = {_toml_str(key.key_type)}",
        ]
    config_path.write_text("\n".join(lines) + "\n")
    return NodeDir(home, config_path, home / LOG_NAME, node_id, raft_addr)


def write_cluster(
    base_dir: Path,
    *,
    nodes: int,
    chain_id: str = "",
    version: str = "",
    key: SigningKey | None = None,
    connections: Sequence[str] = (),
    chains: Sequence[ChainDef] | None = None,
    persist: str | None = None,
    commit_timeout: float = 1.0,
    election_timeout_min: float = 0.3,
    election_timeout_max: float = 0.6,
    secret: bytes | None = None,
    log_level: str = "info",
    log_format: str = "text",
    signing: str | None = None,
    extra: str = "",
) -> list[NodeDir]:
    """Write ``base_dir/node1`` .. ``base_dir/node<N>`` for one validator key.

    ``persist`` defaults to "local" for one node and "raft" for several; several nodes
    with local state would each sign on their own (a double sign), so that is refused.
    Raft nodes listen on fresh 127.0.0.1 ports and share ``secret`` (32 random bytes,
    hex-encoded, by default). Every node dials every address in ``connections``; with
    Raft only the leader does.  With ``chains`` (instead of ``chain_id``, ``version``,
    ``key`` and ``connections``) every node serves all of them, each chain with its own
    key and validators.  ``signing`` and ``extra`` are passed to every node's
    :func:`write_node_dir` (e.g. ``signing="pkcs11"`` with its ``[signing.pkcs11]`` section
    in ``extra``, and no ``key``).
    """
    if nodes < 1:
        raise ConfigError(f"a cluster needs at least one node, got {nodes}")
    persist = persist or ("local" if nodes == 1 else "raft")
    if persist == "local" and nodes != 1:
        raise ConfigError(
            f'{nodes} nodes with persist = "local" would each sign on their own (a double '
            'sign): use persist = "raft"'
        )
    if persist not in ("local", "raft"):
        raise ConfigError(f'persist must be "local" or "raft", got {persist!r}')
    base_dir = Path(base_dir)
    if persist == "local":
        return [
            write_node_dir(
                base_dir / "node1",
                chain_id=chain_id,
                version=version,
                key=key,
                connections=connections,
                chains=chains,
                log_level=log_level,
                log_format=log_format,
                signing=signing,
                extra=extra,
            )
        ]
    if secret is None:
        secret = secrets.token_hex(32).encode("ascii")
    peers = {i + 1: f"127.0.0.1:{port}" for i, port in enumerate(free_ports(nodes))}
    out = []
    for node_id, addr in peers.items():
        raft = {
            "node_id": node_id,
            "bind_addr": addr,
            "data_path": "./raft_data",
            "secret_path": f"./{SECRET_NAME}",
            "commit_timeout": commit_timeout,
            "election_timeout_min": election_timeout_min,
            "election_timeout_max": election_timeout_max,
            "peers": peers,
        }
        out.append(
            write_node_dir(
                base_dir / f"node{node_id}",
                chain_id=chain_id,
                version=version,
                key=key,
                connections=connections,
                chains=chains,
                persist="raft",
                raft=raft,
                secret=secret,
                log_level=log_level,
                log_format=log_format,
                signing=signing,
                extra=extra,
            )
        )
    return out


# ---- processes -------------------------------------------------------------------------

_LIVE: set[NebulaNode] = set()
_LIVE_LOCK = threading.Lock()


def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        nodes = list(_LIVE)
    for node in nodes:
        node.kill()


atexit.register(_kill_leftovers)

# "raft node 2 is the leader (term 3)" / "raft node 2 is no longer the leader (term 4)"
_ROLE_RE = re.compile(rb"raft node \d+ (is the leader|is no longer the leader)")


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: it imports the very ``nebula`` this process runs.

    ``extra`` variables are added (overriding ours), except ``PYTHONPATH``: its entries go
    in front of the path that finds this ``nebula``.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    extra = dict(extra or {})
    first = extra.pop("PYTHONPATH", None)
    root = str(Path(nebula.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [first, root, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class NebulaNode:
    """One ``nebula start -c <config>`` child process, output appended to ``log_path``.

    The child runs in its own session, so a Ctrl-C in the terminal never reaches it:
    the owner decides the shutdown order (``stop()``: SIGTERM, then SIGKILL).
    ``env`` adds variables to the child's environment (a ``PYTHONPATH`` given there is
    searched first), e.g. to load test-only fault hooks.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        log_path: Path | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.env = dict(env or {})
        self.home = self.config_path.parent
        self.log_path = Path(log_path) if log_path is not None else self.home / LOG_NAME
        self.cwd = Path(cwd) if cwd is not None else self.home
        self.proc: subprocess.Popen[bytes] | None = None
        self._role_offset = 0
        self._leader: bool | None = None

    def start(self) -> NebulaNode:
        if self.alive():
            raise DevnetError(f"nebula for {self.config_path} is already running (pid {self.pid})")
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nebula.cli.main", "start", "-c", str(self.config_path)],
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=_child_env(self.env),
                start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DevnetError(f"nebula for {self.config_path} was never started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def _reap(self, timeout: float) -> None:
        if self.proc is not None:
            self.proc.wait(timeout)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL (a crash, no clean shutdown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)  # a stopped process must not keep its pid busy
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._reap(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._reap(10)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def wait_log(self, needle: str, timeout: float = 10.0) -> None:
        """Wait until ``needle`` appears in the log; DevnetError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if not self.alive():
                raise DevnetError(f"nebula exited: {self.log_tail()}")
            time.sleep(0.05)
        raise DevnetError(f"{needle!r} not in nebula log: {self.log_tail()}")

    def is_leader(self) -> bool | None:
        """The Raft role this node last logged (True leader, False not), None if none yet.

        Reads only what was appended to the log since the previous call.
        """
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._role_offset)
                chunk = f.read()
        except FileNotFoundError:
            return self._leader
        end = chunk.rfind(b"\n") + 1  # complete lines only
        for m in _ROLE_RE.finditer(chunk, 0, end):
            self._leader = m.group(1) == b"is the leader"
        self._role_offset += end
        return self._leader

    def __enter__(self) -> NebulaNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
