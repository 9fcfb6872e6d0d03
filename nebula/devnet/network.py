"""A multi-validator CometBFT network on this machine: N nodes, one genesis, full mesh.

:class:`~nebula.devnet.cometbft.LocalChain` runs one node of a single-validator chain;
a :class:`LocalNetwork` is several LocalChains that share a genesis (validator set with
chosen powers, genesis time, chain id), list each other as persistent peers and use short
consensus timeouts. Everything listens on 127.0.0.1.

A validator's key is a FilePV (``priv_validator_key.json``, our own key or a random
ed25519 one) or held by a remote signer (``remote_key``: its public key; each of its
nodes gets a ``priv_validator_laddr``). A validator may run on more than one node
(``nodes=2``): the active/standby pair left running, or two sentries asking one signer.
With a FilePV on both, the validator double-signs and the other validators commit
DuplicateVoteEvidence; with a remote signer, the signer must prevent that. Nodes are
named after their validator (``"A"``), or ``"D1"``, ``"D2"`` when it runs on several.

Typical use::

    from nebula.devnet.network import LocalNetwork, ValidatorSpec

    specs = [ValidatorSpec("A"), ValidatorSpec("B"), ValidatorSpec("C"),
             ValidatorSpec("D", power=14, nodes=2)]
    with LocalNetwork.create(base_dir, "v0.38.25", specs) as net:
        net.wait_for_height(10, timeout=60)
        assert net.evidence_against("D", 1, net.latest_height()) == []
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nebula.devnet.cometbft import (
    VERIFIERS,
    DevnetError,
    GenesisValidator,
    LocalChain,
    SignBytesFn,
    ValidatorKey,
    duplicate_vote_evidence,
    ensure_cometbft,
    filepv_public_key,
    parse_vote,
)
from nebula.errors import ConfigError
from nebula.types import Vote

__all__ = [
    "FAST_TIMEOUTS",
    "LocalNetwork",
    "NodePlan",
    "ValidatorSpec",
    "evidence_validator_address",
    "evidence_votes",
    "network_config",
    "persistent_peers",
    "plan_nodes",
    "verify_duplicate_vote_evidence",
]

#: Consensus timeouts for a few validators on one loaded machine: a round that fails (a
#: missing proposal, split votes) costs about a second, a committed height ~0.5 s.
FAST_TIMEOUTS: dict[str, str] = {
    "timeout_propose": "1s",
    "timeout_propose_delta": "200ms",
    "timeout_prevote": "300ms",
    "timeout_prevote_delta": "200ms",
    "timeout_precommit": "300ms",
    "timeout_precommit_delta": "200ms",
    "timeout_commit": "300ms",
}


@dataclass(frozen=True, slots=True)
class ValidatorSpec:
    """One genesis validator and the nodes that run its key.

    ``filepv_key=(key_type, private key)`` is installed as the FilePV key of every node of
    this validator (None: a random ed25519 key); ``remote_key`` instead means the key lives
    in a remote signer, and ``laddrs`` gives each node's ``priv_validator_laddr`` (one per
    node, ``len(laddrs) == nodes``).
    """

    name: str
    power: int = 10
    nodes: int = 1
    filepv_key: tuple[str, bytes] | None = None
    remote_key: ValidatorKey | None = None
    laddrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.name.isalnum():
            raise ConfigError(f"validator name must be alphanumeric, got {self.name!r}")
        if self.power <= 0:
            raise ConfigError(f"validator {self.name}: power must be positive")
        if self.nodes < 1:
            raise ConfigError(f"validator {self.name}: needs at least one node")
        if self.remote_key is not None:
            if self.filepv_key is not None:
                raise ConfigError(f"validator {self.name}: a remote key has no FilePV key")
            if len(self.laddrs) != self.nodes:
                raise ConfigError(
                    f"validator {self.name}: {self.nodes} node(s) need as many "
                    f"priv_validator_laddrs, got {len(self.laddrs)}"
                )
            for a in self.laddrs:
                if not (a.startswith("tcp://") or a.startswith("unix://")):
                    raise ConfigError(f"validator {self.name}: bad priv_validator_laddr {a!r}")
        elif self.laddrs:
            raise ConfigError(f"validator {self.name}: laddrs without a remote_key")

    @property
    def key(self) -> ValidatorKey:
        """The validator's public key (as the genesis lists it)."""
        if self.remote_key is not None:
            return self.remote_key
        if self.filepv_key is None:
            raise ConfigError(f"validator {self.name}: no key chosen yet")
        return filepv_public_key(*self.filepv_key)


@dataclass(frozen=True, slots=True)
class NodePlan:
    """One node of the network: its name, whose key it runs, and how it signs."""

    name: str
    validator: str
    priv_validator_laddr: str | None = None
    filepv_key: tuple[str, bytes] | None = None


def plan_nodes(validators: Sequence[ValidatorSpec]) -> list[NodePlan]:
    """The nodes of a network, in validator order: ``A`` for a one-node validator,
    ``D1``, ``D2``, ... for one that runs on several. Every FilePV validator must have its
    key chosen (``LocalNetwork`` picks random ones)."""
    if not validators:
        raise ConfigError("a network needs at least one validator")
    names = [v.name for v in validators]
    if len(set(names)) != len(names):
        raise ConfigError(f"validator names must be distinct: {names}")
    plans: list[NodePlan] = []
    for v in validators:
        if v.remote_key is None and v.filepv_key is None:
            raise ConfigError(f"validator {v.name}: no FilePV key chosen")
        for i in range(v.nodes):
            plans.append(
                NodePlan(
                    name=v.name if v.nodes == 1 else f"{v.name}{i + 1}",
                    validator=v.name,
                    priv_validator_laddr=v.laddrs[i] if v.remote_key is not None else None,
                    filepv_key=v.filepv_key,
                )
            )
    node_names = [p.name for p in plans]
    if len(set(node_names)) != len(node_names):
        raise ConfigError(f"node names clash: {node_names}")
    keys = [v.key.address for v in validators]
    if len(set(keys)) != len(keys):
        raise ConfigError("two validators have the same key (use nodes=2 for one key twice)")
    return plans


def persistent_peers(p2p_addresses: Mapping[str, str], me: str) -> str:
    """``persistent_peers`` for node ``me``: every other node's ``id@host:port``."""
    if me not in p2p_addresses:
        raise ConfigError(f"unknown node {me!r}")
    return ",".join(addr for name, addr in p2p_addresses.items() if name != me)


def network_config(
    timeouts: Mapping[str, str] | None = None,
) -> dict[tuple[str, str], str | bool | int]:
    """config.toml settings every node of a local network gets (on top of LocalChain's):
    several nodes on one IP, quick p2p flushing and gossip, ``timeouts`` (default
    :data:`FAST_TIMEOUTS`, ``timeout_commit`` included), and the built-in ``noop`` ABCI
    app instead of ``kvstore``.

    Why not kvstore: it punishes each DuplicateVoteEvidence with a validator update
    (power - 1), one per evidence, so a block with two evidences against one validator
    carries two updates for it and every node halts ("CONSENSUS FAILURE ... changing
    validator set: duplicate entry", seen on v0.38.25). A network that is meant to record
    double signs must keep committing after them; ``noop`` leaves the validator set alone.
    """
    settings: dict[tuple[str, str], str | bool | int] = {
        ("", "proxy_app"): "noop",
        ("p2p", "allow_duplicate_ip"): True,
        ("p2p", "flush_throttle_timeout"): "10ms",
        ("consensus", "peer_gossip_sleep_duration"): "10ms",
    }
    for k, v in (FAST_TIMEOUTS if timeouts is None else timeouts).items():
        settings[("consensus", k)] = v
    return settings


def evidence_validator_address(ev: Mapping[str, Any]) -> bytes:
    """The validator a DuplicateVoteEvidence (``/block`` JSON) accuses."""
    try:
        value = ev.get("value", ev)
        return bytes.fromhex(value["vote_a"]["validator_address"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DevnetError(f"not a DuplicateVoteEvidence: {ev!r}") from exc


def evidence_votes(ev: Mapping[str, Any]) -> tuple[Vote, Vote]:
    """The two conflicting votes of a DuplicateVoteEvidence (``/block`` JSON)."""
    value = ev.get("value", ev)
    try:
        return parse_vote(value["vote_a"]), parse_vote(value["vote_b"])
    except (KeyError, TypeError) as exc:
        raise DevnetError(f"not a DuplicateVoteEvidence: {ev!r}") from exc


def verify_duplicate_vote_evidence(
    ev: Mapping[str, Any],
    key: ValidatorKey,
    chain_id: str,
    *,
    sign_bytes_fn: SignBytesFn | None = None,
) -> tuple[Vote, Vote]:
    """Check, independently of the node, that ``ev`` proves a double sign by ``key``:
    two votes from its address for one height, round and type, for different blocks,
    each signature valid over its canonical sign bytes. Returns the two votes."""
    if sign_bytes_fn is None:
        from nebula.proto import vote_sign_bytes as sign_bytes_fn
    a, b = evidence_votes(ev)
    if a.validator_address != key.address or b.validator_address != key.address:
        raise DevnetError(f"evidence is not against {key.address.hex().upper()}: {ev!r}")
    if (a.type, a.height, a.round) != (b.type, b.height, b.round):
        raise DevnetError(f"the two votes are for different steps: {a} / {b}")
    if a.block_id == b.block_id:
        raise DevnetError(f"the two votes are for the same block: {a} / {b}")
    verify = VERIFIERS[key.key_type]
    for v in (a, b):
        if not verify(key.pub_key, sign_bytes_fn(chain_id, v), v.signature):
            raise DevnetError(f"vote signature does not verify with the key: {v}")
    return a, b


def _now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


class LocalNetwork:
    """Nodes of one multi-validator chain, each a :class:`LocalChain` in ``base_dir/<name>``.

    Every node gets :func:`network_config` (``timeouts``) and ``config_overrides``;
    ``node_overrides[name]`` adds settings for that node only (e.g. a standby with other
    timeouts). ``create`` builds/finds the binary and initialises every node; ``start``
    runs them (remote-signer nodes then wait for their signer); use it as a context
    manager so no process outlives its user. RPC helpers ask the ``reference`` node (the
    first one, unless given), which must be running.
    """

    def __init__(
        self,
        base_dir: Path,
        binary: Path,
        version: str,
        validators: Sequence[ValidatorSpec],
        *,
        chain_id: str = "nebula-net",
        timeouts: Mapping[str, str] | None = None,
        log_level: str = "info",
        genesis_time: str | None = None,
        config_overrides: Mapping[tuple[str, str], str | bool | int] | None = None,
        node_overrides: Mapping[str, Mapping[tuple[str, str], str | bool | int]] | None = None,
        reference: str | None = None,
    ) -> None:
        self.validators = [
            replace(v, filepv_key=("ed25519", os.urandom(32)))
            if v.remote_key is None and v.filepv_key is None
            else v
            for v in validators
        ]
        self.plans = plan_nodes(self.validators)
        self.version = version
        self.chain_id = chain_id
        self.base_dir = Path(base_dir)
        genesis = [GenesisValidator(v.key, v.power, v.name) for v in self.validators]
        genesis_time = genesis_time or _now_rfc3339()
        settings = network_config(timeouts)
        settings.update(config_overrides or {})
        node_overrides = dict(node_overrides or {})
        unknown = set(node_overrides) - {p.name for p in self.plans}
        if unknown:
            raise ConfigError(f"node_overrides for unknown nodes {sorted(unknown)}")
        by_name = {v.name: v for v in self.validators}
        self.nodes: dict[str, LocalChain] = {}
        for plan in self.plans:
            mine = {**settings, **node_overrides.get(plan.name, {})}
            timeout_commit = str(mine.pop(("consensus", "timeout_commit"), "300ms"))
            self.nodes[plan.name] = LocalChain(
                binary,
                self.base_dir / plan.name,
                version=version,
                chain_id=chain_id,
                validator=by_name[plan.validator].key,
                priv_validator_laddr=plan.priv_validator_laddr,
                timeout_commit=timeout_commit,
                log_level=log_level,
                config_overrides=mine,
                moniker=plan.name,
                genesis_validators=genesis,
                genesis_time=genesis_time,
            )
        self.reference = reference or self.plans[0].name
        if self.reference not in self.nodes:
            raise ConfigError(f"unknown reference node {self.reference!r}")

    @classmethod
    def create(
        cls,
        base_dir: Path,
        version: str,
        validators: Sequence[ValidatorSpec],
        **kwargs: Any,
    ) -> LocalNetwork:
        """Build/fetch the binary, then write every node's directory (``init``)."""
        net = cls(base_dir, ensure_cometbft(version), version, validators, **kwargs)
        net.init()
        return net

    def init(self) -> None:
        """``cometbft init`` every node, install the FilePV keys, write one genesis, and
        list every other node in each node's ``persistent_peers``."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for plan in self.plans:
            self.nodes[plan.name].init(filepv_key=plan.filepv_key)
        addresses = {name: node.p2p_address for name, node in self.nodes.items()}
        for name, node in self.nodes.items():
            node.config_overrides[("p2p", "persistent_peers")] = persistent_peers(addresses, name)
            node.write_config()

    # ---- process control ------------------------------------------------------------

    def node(self, name: str) -> LocalChain:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(f"no node {name!r}; nodes are {list(self.nodes)}") from None

    def nodes_of(self, validator: str) -> list[LocalChain]:
        """The nodes that run ``validator``'s key."""
        return [self.nodes[p.name] for p in self.plans if p.validator == validator]

    def validator(self, name: str) -> ValidatorSpec:
        for v in self.validators:
            if v.name == name:
                return v
        raise ConfigError(f"no validator {name!r}")

    def start(self, names: Iterable[str] | None = None) -> None:
        """Start the nodes; if one cannot start, those this call started are stopped
        before the error propagates (a failed ``__enter__`` gets no ``__exit__``)."""
        started: list[LocalChain] = []
        try:
            for name in self.nodes if names is None else names:
                node = self.node(name)
                node.start()
                started.append(node)
        except BaseException:
            for node in started:
                with contextlib.suppress(Exception):
                    node.stop()
            raise

    def stop(self, names: Iterable[str] | None = None) -> None:
        """Stop the nodes, every one of them even if one fails to; then raise the first
        failure."""
        first: BaseException | None = None
        for name in self.nodes if names is None else names:
            try:
                self.node(name).stop()
            except Exception as e:
                first = first or e
        if first is not None:
            raise first

    def kill(self, name: str) -> None:
        self.node(name).kill()

    def __enter__(self) -> LocalNetwork:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- RPC ------------------------------------------------------------------------

    def _ref(self, node: str | None) -> LocalChain:
        return self.node(node or self.reference)

    def latest_height(self, node: str | None = None) -> int:
        return self._ref(node).latest_height()

    def wait_for_height(self, height: int, timeout: float = 60.0, node: str | None = None) -> int:
        return self._ref(node).wait_for_height(height, timeout=timeout)

    def block(self, height: int, node: str | None = None) -> dict[str, Any]:
        return self._ref(node).rpc("block", height=height)["block"]

    def evidence(self, from_h: int, to_h: int, node: str | None = None) -> list[dict[str, Any]]:
        """Every DuplicateVoteEvidence committed in blocks ``from_h..to_h``."""
        return duplicate_vote_evidence(self._ref(node), from_h, to_h)

    def evidence_against(
        self, validator: str, from_h: int, to_h: int, node: str | None = None
    ) -> list[dict[str, Any]]:
        """The DuplicateVoteEvidence against ``validator`` committed in ``from_h..to_h``."""
        address = self.validator(validator).key.address
        return [
            ev
            for ev in self.evidence(from_h, to_h, node)
            if evidence_validator_address(ev) == address
        ]

    def wait_for_evidence(
        self, validator: str, timeout: float = 60.0, from_h: int = 1, node: str | None = None
    ) -> list[dict[str, Any]]:
        """Poll the committed blocks until one holds evidence against ``validator``;
        returns it (raises DevnetError after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        ref = self._ref(node)
        next_h = from_h
        while time.monotonic() < deadline:
            top = 0
            with contextlib.suppress(DevnetError):
                top = ref.latest_height()
            if top >= next_h:
                found = self.evidence_against(validator, next_h, top, node)
                if found:
                    return found
                next_h = top + 1
            time.sleep(0.2)
        raise DevnetError(
            f"no DuplicateVoteEvidence against {validator} in blocks {from_h}..{next_h - 1} "
            f"within {timeout}s"
        )
