"""The configuration: one strict schema, loaded once at the edge.

The format extends the Rust Nebula's TOML (which stays valid): unknown keys are
errors, every field is documented in :data:`TEMPLATE_NATIVE` (what ``nebula init``
writes), relative paths are resolved against the config file's directory, and
every error names the key and the file.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from nebula.errors import ConfigError
from nebula.raft.timing import TIMING_BOUNDS, check_timing
from nebula.state.base import check_commit_timeout
from nebula.types import WireFamily

LogLevel = Literal["trace", "debug", "info", "warn", "warning", "error"]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ConnectionConfig(_Strict):
    """One validator node to dial: ``host``/``port`` (TCP) or ``address``."""

    host: str | None = None
    port: int | None = None
    # "tcp://host:port" or "unix:///path/to.sock" (alternative to host/port)
    address: str | None = None


class DialConfig(_Strict):
    handshake_timeout: float = 3.0
    backoff_min: float = 0.05
    backoff_max: float = 1.0
    # Drop a connection that has been silent this long (the node pings every ~3.3 s).
    idle_timeout: float = 15.0


class RaftPeer(_Strict):
    id: int
    addr: str


class RaftConfig(_Strict):
    node_id: int = 1
    bind_addr: str = "127.0.0.1:8080"
    data_path: str = "./raft_data"
    initial_state_path: str | None = None
    peers: list[RaftPeer] = msgspec.field(default_factory=list)
    # File with the cluster secret (required when persist = "raft"; mode 0600).
    secret_path: str | None = None
    # Raft timing, seconds (bounds and tick rounding: nebula/raft/timing.py).
    commit_timeout: float = 1.0
    tick_interval: float = 0.05
    heartbeat_interval: float = 0.05
    election_timeout_min: float = 0.3
    election_timeout_max: float = 0.6
    connection_retry: float = 0.1
    handshake_timeout: float = 2.0
    # Inbound Raft connections that have not authenticated yet, at most (more are closed).
    max_unauthenticated: int = 64
    # Applied entries between snapshots (the log before a snapshot is dropped).  A snapshot
    # stops the node's loop for its fsyncs and the log rewrite (~2-4 ms on the benchmark
    # VM); every 1,000 entries, 16 busy chains had a p99 1.4-1.6x the one they have with
    # 10,000 (BENCHMARKS.md, twelfth session).  10,000 entries are ~3 MB of log, replayed
    # in ~13 ms at start.
    snapshot_entries: int = 10_000
    # A leader's fdatasync of a Ready with several decisions (several chains at once) runs
    # on a native thread while the event loop serves other requests (nebula/raft/node.py,
    # nebula/raft/syncthread.py).
    sync_off_loop: bool = True
    # With several chains, native Ed25519 keys sign on a native thread, not on the event
    # loop thread (nebula/crypto/signworker.py).
    sign_off_loop: bool = True
    # Allow `nebula cluster add|remove` (must be the same on every member; membership then
    # lives in the Raft log rather than in `peers`).
    dynamic_membership: bool = False
    # This node is being added to a running cluster (`nebula cluster add`): it starts with
    # no membership and takes the leader's snapshot.  Only for a first start.
    join: bool = False


class NativeSigning(_Strict):
    private_key_path: str = "./privkey"
    key_type: Literal["ed25519", "secp256k1", "bls12381"] = "ed25519"
    bls_dst: str | None = None


class VaultTransitSigning(_Strict):
    address: str = "http://127.0.0.1:8200"
    mount: str = "transit"
    key_name: str = "nebula"
    token_path: str | None = None
    token_env: str | None = "VAULT_TOKEN"
    ca_cert: str | None = None
    insecure_skip_verify: bool = False
    timeout: float = 1.0


class VaultSignerPluginSigning(_Strict):
    address: str = "http://127.0.0.1:8200"
    mount: str = "nebula"
    key_name: str = "nebula"
    token_path: str | None = None
    token_env: str | None = "VAULT_TOKEN"
    ca_cert: str | None = None
    insecure_skip_verify: bool = False
    timeout: float = 1.0
    bls_dst: str | None = None


class Pkcs11Signing(_Strict):
    # The token vendor's PKCS#11 module (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so).
    module_path: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "nebula"
    # File holding the user PIN (mode 0600).
    pin_path: str | None = None
    key_label: str | None = "nebula"
    key_id: str | None = None  # hex CKA_ID, with or instead of key_label
    key_type: Literal["ed25519", "secp256k1"] = "ed25519"
    # Optional base64 public key: the token's key must be this one (checked at start).
    public_key: str | None = None
    timeout: float = 1.0


class ThresholdBlsSigning(_Strict):
    # This member's share of a t-of-n split BLS12-381 key (`nebula keys split`); mode 0600.
    # Needs persist = "raft"; the share index must be this node's raft.node_id, n the
    # cluster size and t at least the Raft quorum (nebula/state/threshold.py).
    share_path: str = "./share.json"
    bls_dst: str | None = None


class SigningConfig(_Strict):
    native: NativeSigning | None = None
    vault_transit: VaultTransitSigning | None = None
    vault_signer_plugin: VaultSignerPluginSigning | None = None
    threshold_bls: ThresholdBlsSigning | None = None
    pkcs11: Pkcs11Signing | None = None


class MetricsConfig(_Strict):
    # "host:port" for the Prometheus /metrics, /healthz, /readyz server; empty = off.
    listen: str = ""


SigningMode = Literal["native", "vault_transit", "vault_signer_plugin", "pkcs11", "threshold_bls"]


class ChainConfig(_Strict):
    """One chain of a multi-chain config (``[[chains]]``): its own key and validators."""

    chain_id: str
    version: str = "v1_0"
    signing_mode: SigningMode = "native"
    signing: SigningConfig = msgspec.field(default_factory=SigningConfig)
    connections: list[ConnectionConfig] = msgspec.field(default_factory=list)
    initial_state_path: str | None = None
    # This chain's SecretConnection identity (default: the top-level connection_key_path).
    connection_key_path: str | None = None


class Config(_Strict):
    # The single-chain format: chain_id, version, signing_mode, [signing.*], [[connections]]
    # and initial_state_path at the top level describe the one chain.  A multi-chain config
    # lists [[chains]] instead (and sets none of those at the top level).
    chain_id: str | None = None
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"
    version: str | None = None
    signing_mode: SigningMode | None = None
    persist: Literal["local", "raft"] = "local"
    state_path: str = "./nebula_state.json"
    initial_state_path: str | None = None
    # Ed25519 identity for SecretConnection (base64 seed); a fresh one per start if unset.
    connection_key_path: str | None = None
    connections: list[ConnectionConfig] | None = None
    dial: DialConfig = msgspec.field(default_factory=DialConfig)
    raft: RaftConfig | None = None
    signing: SigningConfig | None = None
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    chains: list[ChainConfig] | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A validator address to dial."""

    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.scheme == "unix" else f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """One chain this signer serves, validated (from the top level or ``[[chains]]``)."""

    chain_id: str
    version: str
    family: WireFamily
    signing_mode: SigningMode
    signing: SigningConfig
    endpoints: tuple[Endpoint, ...]
    #: raw path strings (resolve with :meth:`LoadedConfig.resolve`)
    initial_state_path: str | None
    connection_key_path: str | None
    #: the config key this chain was read from: "" (top level) or "chains[i]"
    key: str = ""

    def where(self, field: str) -> str:
        """A field's key path for error messages, e.g. ``chains[1].signing.native``."""
        return f"{self.key}.{field}" if self.key else field


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config with resolved paths and derived values."""

    raw: Config
    path: Path
    chains: tuple[ChainSpec, ...]

    def resolve(self, p: str | None) -> Path | None:
        return resolve_path(self.path, p)

    @property
    def multi_chain(self) -> bool:
        return bool(self.raw.chains)

    @property
    def chain_ids(self) -> tuple[str, ...]:
        return tuple(c.chain_id for c in self.chains)

    def chain(self, chain_id: str | None = None) -> ChainSpec:
        """The chain named ``chain_id``; with None, the only chain (an error if several).

        An id the config does not serve is a :class:`ConfigError` naming the file."""
        if chain_id is None:
            if len(self.chains) != 1:
                raise ConfigError(
                    f"{self.path}: serves {len(self.chains)} chains "
                    f"({', '.join(self.chain_ids)}): say which with --chain"
                )
            return self.chains[0]
        for c in self.chains:
            if c.chain_id == chain_id:
                return c
        raise ConfigError(
            f"{self.path}: chain id {chain_id!r} is not configured (chains: "
            f"{', '.join(self.chain_ids)})"
        )

    # The single chain's values (most tools and every single-chain config).
    @property
    def family(self) -> WireFamily:
        return self.chain().family

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.chain().endpoints


def resolve_path(config_path: Path, p: str | None) -> Path | None:
    if p is None or p == "":
        return None
    q = Path(p).expanduser()
    return q if q.is_absolute() else (config_path.parent / q)


def parse_address(text: str, where: str) -> Endpoint:
    """Parse ``tcp://host:port`` / ``unix:///path`` (no scheme means tcp, as CometBFT)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    if scheme == "unix":
        if not rest:
            raise ConfigError(f"{where}: empty unix socket path in {text!r}")
        return Endpoint("unix", path=rest)
    if scheme != "tcp":
        raise ConfigError(f"{where}: expected a tcp:// or unix:// address, got {text!r}")
    # tmkms-style "tcp://id@host:port": the node's listener key is random per start,
    # so an id cannot be pinned (protocol.md §1.2); refuse rather than ignore it.
    if "@" in rest:
        raise ConfigError(
            f"{where}: peer-id pinning ('id@host:port') is not supported: CometBFT's privval "
            "listener key is random per node start"
        )
    host, _, port = rest.rpartition(":")
    return Endpoint("tcp", host=_host(host, where), port=_port(port, where))


def _host(host: str, where: str) -> str:
    host = host.strip("[]")
    if not host:
        raise ConfigError(f"{where}: missing host")
    return host


def _port(port: str | int | None, where: str) -> int:
    # int() alone would also take "+80", " 80", "8_0" and non-ASCII digits
    if isinstance(port, str) and not (port.isascii() and port.isdigit()):
        raise ConfigError(f"{where}: invalid port {port!r}")
    try:
        n = int(port)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: invalid port {port!r}") from None
    if not 0 < n < 65536:
        raise ConfigError(f"{where}: port {n} out of range 1..65535")
    return n


def parse_hostport(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{where}: expected host:port, got {text!r}")
    return _host(host, where), _port(port, where)


def load(path: str | Path) -> LoadedConfig:
    """Read, parse and validate a config file; every error is a ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")  # TOML is UTF-8, whatever the locale says
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (create one with `nebula init`)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: config file is not valid UTF-8: {e}") from None
    return loads(text, p)


def loads(text: str, path: str | Path = "<config>") -> LoadedConfig:
    p = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except RecursionError:
        # tomllib parses arrays and inline tables recursively
        raise ConfigError(f"{p}: invalid TOML: arrays or inline tables nested too deeply") from None
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{p}: {_explain(str(e))}") from None
    return _validate(cfg, p)


def _explain(msg: str) -> str:
    # msgspec says "... - at `$.raft.peers[0]`"; show it as a TOML key path.
    if " - at `$" in msg:
        text, _, where = msg.partition(" - at `$")
        where = where.rstrip("`").lstrip(".")
        return f"{text} (at key `{where}`)"
    return msg


#: The longest one request may take inside Nebula (seconds): CometBFT gives up on its
#: signer after 5 s, and the network and the validator's side need the rest.
REQUEST_BUDGET = 4.5

#: CometBFT's limit on a chain id (types.MaxChainIDLen), in bytes.
MAX_CHAIN_ID_LEN = 50

_TOP_LEVEL_CHAIN_KEYS = (
    "chain_id",
    "version",
    "signing_mode",
    "signing",
    "connections",
    "initial_state_path",
)


def _validate(cfg: Config, p: Path) -> LoadedConfig:
    chains: list[ChainSpec] = []
    if cfg.chains is not None:
        given = [k for k in _TOP_LEVEL_CHAIN_KEYS if getattr(cfg, k) is not None]
        if given:
            raise ConfigError(
                f"{p}: {', '.join(given)} at the top level and [[chains]] together: a "
                "multi-chain config sets each chain's keys in its [[chains]] entry"
            )
        if not cfg.chains:
            raise ConfigError(f"{p}: chains is empty: list at least one [[chains]] entry")
        if cfg.raft is not None and cfg.raft.initial_state_path is not None:
            raise ConfigError(
                f"{p}: raft.initial_state_path is for a single-chain config; with [[chains]] "
                "set initial_state_path in each chain's entry"
            )
        seen: dict[str, int] = {}
        for i, c in enumerate(cfg.chains):
            key = f"chains[{i}]"
            if c.chain_id in seen:
                raise ConfigError(
                    f"{p}: {key}.chain_id: chain id {c.chain_id!r} is listed twice "
                    f"(also chains[{seen[c.chain_id]}])"
                )
            seen[c.chain_id] = i
            chains.append(
                _chain(
                    p,
                    key,
                    chain_id=c.chain_id,
                    version=c.version,
                    signing_mode=c.signing_mode,
                    signing=c.signing,
                    connections=c.connections,
                    initial_state_path=c.initial_state_path,
                    connection_key_path=c.connection_key_path or cfg.connection_key_path,
                )
            )
    else:
        if cfg.chain_id is None:
            raise ConfigError(
                f"{p}: chain_id is required (or list the chains to serve as [[chains]])"
            )
        if (
            cfg.raft is not None
            and cfg.raft.initial_state_path is not None
            and cfg.initial_state_path is not None
        ):
            raise ConfigError(
                f"{p}: initial_state_path and raft.initial_state_path name the one chain's "
                "initial state twice: keep one"
            )
        chains.append(
            _chain(
                p,
                "",
                chain_id=cfg.chain_id,
                version=cfg.version if cfg.version is not None else "v1_0",
                signing_mode=cfg.signing_mode if cfg.signing_mode is not None else "native",
                signing=cfg.signing if cfg.signing is not None else SigningConfig(),
                connections=cfg.connections or [],
                initial_state_path=cfg.initial_state_path,
                connection_key_path=cfg.connection_key_path,
            )
        )
    owner: dict[Endpoint, str] = {}
    for c in chains:
        for ep in c.endpoints:
            if ep in owner and owner[ep] != c.chain_id:
                raise ConfigError(
                    f"{p}: {c.where('connections')}: validator address {ep} is also "
                    f"listed for chain {owner[ep]!r}: one validator serves one chain"
                )
            owner[ep] = c.chain_id

    for c in chains:
        if c.signing_mode == "threshold_bls":
            if cfg.persist != "raft":
                raise ConfigError(
                    f"{p}: {c.where('signing_mode')} = 'threshold_bls' needs persist = "
                    '"raft": the shares are combined by the Raft cluster'
                )
            if cfg.raft is not None and cfg.raft.dynamic_membership:
                raise ConfigError(
                    f"{p}: {c.where('signing_mode')} = 'threshold_bls' needs a fixed "
                    "membership (raft.dynamic_membership = false): the key is split for "
                    "exactly the configured members"
                )

    d = cfg.dial
    for name in ("handshake_timeout", "backoff_min", "backoff_max", "idle_timeout"):
        v = getattr(d, name)
        if not (v > 0 and math.isfinite(v)):  # NaN and infinity too
            raise ConfigError(f"{p}: dial.{name} must be a finite number > 0")
    if d.backoff_min > d.backoff_max:
        raise ConfigError(f"{p}: dial.backoff_min must be <= dial.backoff_max")

    if cfg.persist == "raft":
        r = cfg.raft
        if r is None:
            raise ConfigError(f'{p}: persist = "raft" needs a [raft] section')
        if not r.secret_path:
            raise ConfigError(
                f"{p}: raft.secret_path is required: without a cluster secret anyone who "
                "reaches the Raft port can run code on this machine"
            )
        if not r.peers:
            raise ConfigError(f"{p}: raft.peers must list every member, including this node")
        ids = [peer.id for peer in r.peers]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{p}: raft.peers has duplicate ids")
        addrs = [peer.addr for peer in r.peers]
        if len(set(addrs)) != len(addrs):
            raise ConfigError(f"{p}: raft.peers has duplicate addresses")
        if r.node_id not in ids:
            raise ConfigError(f"{p}: raft.node_id {r.node_id} is not listed in raft.peers")
        for i, peer in enumerate(r.peers):
            parse_hostport(peer.addr, f"{p}: raft.peers[{i}].addr")
        parse_hostport(r.bind_addr, f"{p}: raft.bind_addr")
        check_commit_timeout(r.commit_timeout, f"{p}: raft.commit_timeout")
        check_timing(
            tick_interval=r.tick_interval,
            heartbeat_interval=r.heartbeat_interval,
            election_timeout_min=r.election_timeout_min,
            election_timeout_max=r.election_timeout_max,
            where=f"{p}: raft",
        )
        for key in ("connection_retry", "handshake_timeout"):
            lo, hi = TIMING_BOUNDS[key]
            v = getattr(r, key)
            if not lo <= v <= hi:  # NaN too
                raise ConfigError(f"{p}: raft.{key} must be in [{lo:g}, {hi:g}] seconds")
        if not 1 <= r.max_unauthenticated <= 10_000:
            raise ConfigError(f"{p}: raft.max_unauthenticated must be in [1, 10000]")
        if not 2 <= r.snapshot_entries <= 10_000_000:
            raise ConfigError(f"{p}: raft.snapshot_entries must be in [2, 10000000]")
        if any(i <= 0 for i in ids):
            raise ConfigError(f"{p}: raft node ids must be positive")

    # One request's worst case must leave CometBFT's 5 s with room to spare: every call to
    # a backend that waits (its timeout; two in a row on v0.38/v1.0, where a precommit
    # also signs its vote extension) plus the Raft commit (found in review: 3.0 s backend
    # timeouts answered a precommit after 5.2 s).
    commit = cfg.raft.commit_timeout if cfg.persist == "raft" and cfg.raft else 0.0
    for c in chains:
        section = getattr(c.signing, c.signing_mode, None)
        timeout = getattr(section, "timeout", None)
        if c.signing_mode == "threshold_bls" or not isinstance(timeout, int | float):
            continue
        calls = 1 if c.family is WireFamily.V0_34 else 2
        worst = calls * timeout + commit
        if not worst <= REQUEST_BUDGET:
            raise ConfigError(
                f"{p}: {c.where(f'signing.{c.signing_mode}.timeout')} = {timeout:g}: "
                f"{calls} backend call(s) of up to {timeout:g} s"
                + (f" and raft.commit_timeout = {commit:g}" if commit else "")
                + f" can take {worst:g} s, more than {REQUEST_BUDGET:g} s of CometBFT's 5 s"
            )

    if cfg.metrics.listen:
        host, _ = parse_hostport(cfg.metrics.listen, f"{p}: metrics.listen")
        if host not in ("localhost",):
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"{p}: metrics.listen: {host!r} is not an IP address") from None

    return LoadedConfig(raw=cfg, path=p, chains=tuple(chains))


def _chain(
    p: Path,
    key: str,
    *,
    chain_id: str,
    version: str,
    signing_mode: SigningMode,
    signing: SigningConfig,
    connections: list[ConnectionConfig],
    initial_state_path: str | None,
    connection_key_path: str | None,
) -> ChainSpec:
    """Validate one chain's keys (top level when ``key`` is "", else ``chains[i]``)."""
    pre = f"{key}." if key else ""
    if not chain_id.strip():
        raise ConfigError(f"{p}: {pre}chain_id must not be empty")
    if chain_id != chain_id.strip() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in chain_id):
        raise ConfigError(
            f"{p}: {pre}chain_id {chain_id!r}: no spaces at either end and no control "
            "characters (requests carry the chain's exact id)"
        )
    if len(chain_id.encode()) > MAX_CHAIN_ID_LEN:
        raise ConfigError(
            f"{p}: {pre}chain_id is {len(chain_id.encode())} bytes long; CometBFT allows "
            f"{MAX_CHAIN_ID_LEN} at most"
        )
    try:
        family = WireFamily.from_config(version)
    except ValueError as e:
        raise ConfigError(f"{p}: {pre}version: {e}") from None

    endpoints: list[Endpoint] = []
    for i, c in enumerate(connections):
        where = f"{p}: {pre}connections[{i}]"
        if c.address is not None:
            if c.host is not None or c.port is not None:
                raise ConfigError(f"{where}: give either address or host/port, not both")
            endpoints.append(parse_address(c.address, where))
        else:
            if c.host is None or c.port is None:
                raise ConfigError(f"{where}: needs host and port (or address)")
            endpoints.append(Endpoint("tcp", host=_host(c.host, where), port=_port(c.port, where)))
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"{p}: {pre}connections lists the same validator address twice")

    mode_section = getattr(signing, signing_mode)
    if mode_section is None:
        raise ConfigError(
            f"{p}: {pre}signing_mode = {signing_mode!r} needs a "
            f"[{pre}signing.{signing_mode}] section"
        )
    bls = signing_mode == "threshold_bls" or (
        signing_mode == "native" and mode_section.key_type == "bls12381"
    )
    v038 = version.strip().lower().replace(".", "_").lstrip("v") == "0_38"
    if bls and (family is WireFamily.V0_34 or v038):
        what = "signing_mode = 'threshold_bls'"
        if signing_mode == "native":
            what = "signing.native.key_type = 'bls12381'"
        raise ConfigError(
            f"{p}: {pre}{what}: BLS12-381 keys need CometBFT v0.39, v0.40 or v1.0, but "
            f"{pre}version = {version!r} (v0.34, v0.37 and v0.38 have no BLS public key)"
        )
    dst = getattr(mode_section, "bls_dst", None)
    if dst:
        # What every mode encodes it with (the signer plugin's JSON, blst's 255-byte
        # bound); one check here, naming the key, rather than at start (found in review).
        if not dst.isascii() or len(dst) > 255:
            raise ConfigError(
                f"{p}: {pre}signing.{signing_mode}.bls_dst must be ASCII and 1 to 255 bytes"
            )
    if signing_mode == "pkcs11":
        if not mode_section.pin_path:
            raise ConfigError(f"{p}: {pre}signing.pkcs11.pin_path is required (0600 PIN file)")
        if not mode_section.key_label and not mode_section.key_id:
            raise ConfigError(f"{p}: {pre}signing.pkcs11: set key_label or key_id")
    if signing_mode in ("vault_transit", "vault_signer_plugin"):
        if not mode_section.token_path and not mode_section.token_env:
            raise ConfigError(f"{p}: {pre}signing.{signing_mode}: set token_path or token_env")
    timeout = getattr(mode_section, "timeout", None)
    if timeout is not None and not 0 < timeout < 4.0:  # NaN too
        raise ConfigError(
            f"{p}: {pre}signing.{signing_mode}.timeout must be in (0, 4) seconds "
            "(CometBFT gives up after 5 s)"
        )
    return ChainSpec(
        chain_id=chain_id,
        version=version,
        family=family,
        signing_mode=signing_mode,
        signing=signing,
        endpoints=tuple(endpoints),
        initial_state_path=initial_state_path,
        connection_key_path=connection_key_path,
        key=key,
    )


# ---- templates written by `nebula init` ------------------------------------------------

_COMMON_HEAD = """\
# Nebula configuration. Relative paths are relative to this file.
# Unknown keys are errors, so a typo never goes unnoticed.

log_level = "info"            # trace | debug | info | warn | error
log_format = "text"           # text | json
chain_id = "{chain_id}"       # requests for any other chain are refused
version = "{version}"             # CometBFT line: v0_34 | v0_37 | v0_38 | v0_39 | v0_40 | v1_0
signing_mode = "{signing_mode}"  # native | vault_transit | vault_signer_plugin | pkcs11

# Where the last signed height/round/step lives:
#   "local" - a state file on this machine, fsync'ed before every signature;
#   "raft"  - replicated to a 3- or 5-node Nebula cluster (see [raft]).
persist = "{persist}"
state_path = "./nebula_state.json"
# Optional: CometBFT's priv_validator_state.json to start from (only ever raises the mark).
# initial_state_path = "./priv_validator_state.json"

# Optional: base64 Ed25519 seed used as this signer's SecretConnection identity.
# connection_key_path = "./connection_key"

# The validator nodes to dial (their priv_validator_laddr). Either host/port (TCP with
# SecretConnection) or address = "tcp://host:port" / "unix:///path/to/privval.sock".
[[connections]]
host = "127.0.0.1"
port = 26659

[dial]
handshake_timeout = 3.0       # seconds for the SecretConnection handshake
backoff_min = 0.05            # reconnect backoff, doubling up to backoff_max
backoff_max = 1.0
idle_timeout = 15.0           # drop a connection silent this long (nodes ping every ~3.3 s)

[metrics]
listen = ""                   # e.g. "127.0.0.1:26661" for /metrics, /healthz, /readyz

# Raft cluster (used when persist = "raft"). peers lists every member, this one included.
[raft]
node_id = 1
bind_addr = "127.0.0.1:8080"
data_path = "./raft_data"
# initial_state_path = "./priv_validator_state.json"
secret_path = "./cluster_secret"   # required for raft; 0600; the same on every member
                                   # (`nebula cluster secret -o cluster_secret` writes one)
commit_timeout = 1.0               # seconds; a decision not committed by then is refused
tick_interval = 0.05               # seconds per Raft tick
heartbeat_interval = 0.05          # leader heartbeats
election_timeout_min = 0.3         # a follower that hears no leader for a random time in
election_timeout_max = 0.6         #   [min, max) starts an election: roughly the failover time
connection_retry = 0.1             # first reconnect delay to a peer (doubles up to 1 s)
handshake_timeout = 2.0            # an inbound Raft connection must authenticate within this
max_unauthenticated = 64           # concurrent unauthenticated inbound connections, at most
snapshot_entries = 10000           # applied entries between snapshots (log compaction)
sync_off_loop = true               # a leader syncs a multi-decision Ready on a native thread
sign_off_loop = true               # several chains: Ed25519 signs on a native thread
dynamic_membership = false         # true allows `nebula cluster add|remove` (same on all)
# join = true                      # only on a new member's first start (`nebula cluster add`)
[[raft.peers]]
id = 1
addr = "127.0.0.1:8080"
"""

_SIGNING = {
    "native": """
[signing.native]
private_key_path = "./privkey"   # base64 of the 32-byte secret; 0600 (`nebula keys generate`)
key_type = "{key_type}"          # ed25519 | secp256k1 | bls12381
# bls_dst = "BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_NUL_"   # BLS only
""",
    "vault_transit": """
[signing.vault_transit]
address = "http://127.0.0.1:8200"
mount = "transit"
key_name = "nebula"              # an ed25519 transit key (`nebula vault create-key` / `import-key`)
token_path = "./vault_token"     # 0600; or leave unset and use token_env
token_env = "VAULT_TOKEN"
# ca_cert = "/etc/ssl/vault-ca.pem"
insecure_skip_verify = false
timeout = 1.0                    # seconds per request; a slow Vault is refused, not waited for
""",
    "pkcs11": """
[signing.pkcs11]
module_path = "/usr/lib/softhsm/libsofthsm2.so"   # the HSM vendor's PKCS#11 module
token_label = "nebula"
pin_path = "./hsm_pin"           # the user PIN, mode 0600 (a rejected PIN is never retried)
key_label = "nebula"             # `nebula hsm generate` / `nebula hsm import` create it
# key_id = "01"                  # hex CKA_ID, with or instead of key_label
key_type = "{key_type}"          # ed25519 (CKM_EDDSA) | secp256k1 (CKM_ECDSA, low-S)
# public_key = "base64..."       # optional pin: the token's key must be this one
timeout = 1.0                    # seconds per signature; a slow HSM is refused, not waited for
""",
    "vault_signer_plugin": """
[signing.vault_signer_plugin]
address = "http://127.0.0.1:8200"
mount = "nebula"
key_name = "nebula"
token_path = "./vault_token"     # 0600; or leave unset and use token_env
token_env = "VAULT_TOKEN"
# ca_cert = "/etc/ssl/vault-ca.pem"
insecure_skip_verify = false
timeout = 1.0
""",
}


def template(
    signing_mode: str = "native",
    *,
    chain_id: str = "test-chain-v1",
    version: str = "v1_0",
    persist: str = "local",
    key_type: str = "ed25519",
) -> str:
    if signing_mode not in _SIGNING:
        raise ConfigError(f"unknown backend {signing_mode!r}")
    return _COMMON_HEAD.format(
        chain_id=chain_id, version=version, signing_mode=signing_mode, persist=persist
    ) + _SIGNING[signing_mode].format(key_type=key_type)
