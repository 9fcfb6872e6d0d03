"""The composition root: config in, a running signer out.

This is the only module that installs uvloop and turns a config into objects: one
store (local file or Raft) shared by every chain, and per chain a backend, a signing
service and one dialer per validator address.  Chains never wait on each other: each
service decides one request at a time for its own chain, and a store commits the
decisions of several chains that arrive together in one write (group commit).  With a
Raft store only the leader dials (S5): it starts dialing when it wins leadership and
closes every validator connection the moment it loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nebula import __version__
from nebula.aio import sdnotify
from nebula.aio.admin import AdminServer, socket_path
from nebula.aio.conn import Dialer, load_or_make_identity
from nebula.backends.base import Backend
from nebula.config import (
    ChainSpec,
    LoadedConfig,
    VaultSignerPluginSigning,
    VaultTransitSigning,
    parse_hostport,
)
from nebula.errors import BackendError, ConfigError, KeyFileError, NebulaError, NotLeader
from nebula.guard import SignRecord
from nebula.metrics import ROLE_VALUES, HealthServer, Metrics
from nebula.service import SigningService
from nebula.state.base import (
    SignStore,
    check_state_chain,
    load_priv_validator_state,
    record_from_json,
    record_to_json,
)

if TYPE_CHECKING:
    from nebula.backends._vault_common import VaultSettings
    from nebula.crypto.signworker import SignWorker

log = logging.getLogger("nebula.daemon")

# /readyz: a follower is ready only while it hears from its leader.
READY_HEARD_WITHIN = 2.0


# Signing modes whose start-up calls go over a network or into a vendor module.
_REMOTE_MODES = frozenset({"vault_transit", "vault_signer_plugin", "pkcs11"})


def _in_thread(fn: Callable[..., Backend], *args: Any) -> asyncio.Future[Backend]:
    """``fn(*args)`` on a new daemon thread, as a future of the running loop.

    Not the loop's executor: a call that never returns (a server that answers a byte at
    a time) would keep ``asyncio.run`` from returning at shutdown, and a daemon thread
    does not hold the process."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Backend] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.cancelled():
            if ok:
                _close_when_made(fut, value)
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            out: tuple[bool, Any] = (True, fn(*args))
        except BaseException as e:  # handed to the loop, raised where it is awaited
            out = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, *out)

    threading.Thread(target=run, name=f"nebula-connect-{fn.__name__}", daemon=True).start()
    return fut


def _close_when_made(fut: asyncio.Future[Backend], backend: Backend | None = None) -> None:
    """Close a backend that was connected after nobody wanted it any more."""
    if backend is None:
        if fut.cancelled() or fut.exception() is not None:
            return
        backend = fut.result()
    task = asyncio.get_running_loop().create_task(backend.close())
    _ORPHANS.add(task)
    task.add_done_callback(_ORPHANS.discard)


_ORPHANS: set[asyncio.Task[None]] = set()


def make_backend(cfg: LoadedConfig, chain: ChainSpec | None = None) -> Backend:
    """The backend of ``chain`` (the config's only chain if None)."""
    chain = chain or cfg.chain()
    signing = chain.signing
    if chain.signing_mode == "native":
        from nebula.backends.native import NativeBackend
        from nebula.crypto.keys import BLS_DEFAULT_DST, load_key_file

        n = signing.native
        if n is None:
            raise ConfigError(f"{cfg.path}: missing [{chain.where('signing.native')}]")
        path = cfg.resolve(n.private_key_path)
        dst = n.bls_dst.encode() if n.bls_dst else BLS_DEFAULT_DST
        try:
            key = load_key_file(path, n.key_type, bls_dst=dst)
        except KeyFileError as e:
            where = chain.where("signing.native.private_key_path")
            raise KeyFileError(f"{cfg.path}: {where}: {e}") from None
        return NativeBackend(key)
    if chain.signing_mode == "vault_transit":
        from nebula.backends.vault_transit import VaultTransitBackend

        t = signing.vault_transit
        if t is None:
            raise ConfigError(f"{cfg.path}: missing [{chain.where('signing.vault_transit')}]")
        return VaultTransitBackend.connect(
            _vault_settings(cfg, chain, t, "vault_transit"), version=chain.version
        )
    if chain.signing_mode == "pkcs11":
        from nebula.backends.pkcs11 import Pkcs11Backend, Pkcs11Settings

        h = signing.pkcs11
        if h is None:
            raise ConfigError(f"{cfg.path}: missing [{chain.where('signing.pkcs11')}]")
        return Pkcs11Backend.connect(
            Pkcs11Settings.create(
                module_path=h.module_path,
                token_label=h.token_label,
                pin_path=cfg.resolve(h.pin_path),
                key_type=h.key_type,
                key_label=h.key_label,
                key_id=h.key_id,
                public_key=h.public_key,
                timeout=h.timeout,
                where=f"{cfg.path}: {chain.where('signing.pkcs11')}",
            )
        )
    if chain.signing_mode == "threshold_bls":
        return _threshold_backend(cfg, chain)
    from nebula.backends.vault_signer_plugin import VaultSignerPluginBackend
    from nebula.crypto.keys import BLS_DEFAULT_DST

    p = signing.vault_signer_plugin
    if p is None:
        raise ConfigError(f"{cfg.path}: missing [{chain.where('signing.vault_signer_plugin')}]")
    dst = BLS_DEFAULT_DST
    if p.bls_dst:
        try:
            dst = p.bls_dst.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{cfg.path}: {chain.where('signing.vault_signer_plugin.bls_dst')} must be ASCII"
            ) from None
    return VaultSignerPluginBackend.connect(
        _vault_settings(cfg, chain, p, "vault_signer_plugin"), version=chain.version, bls_dst=dst
    )


def _threshold_backend(cfg: LoadedConfig, chain: ChainSpec) -> Backend:
    """This member's threshold-BLS share, checked against the cluster it serves."""
    from nebula.backends.threshold import ThresholdBackend
    from nebula.crypto.keys import BLS_DEFAULT_DST
    from nebula.crypto.threshold import load_share_file
    from nebula.state.threshold import check_cluster

    tb = chain.signing.threshold_bls
    r = cfg.raw.raft
    if tb is None or r is None:
        raise ConfigError(f"{cfg.path}: missing [{chain.where('signing.threshold_bls')}]")
    dst = tb.bls_dst.encode("ascii") if tb.bls_dst else BLS_DEFAULT_DST
    path = cfg.resolve(tb.share_path)
    assert path is not None
    share = load_share_file(path, dst=dst)
    check_cluster(
        share,
        r.node_id,
        [peer.id for peer in r.peers],
        f"{cfg.path}: {chain.where('signing.threshold_bls.share_path')} ({path})",
    )
    return ThresholdBackend(share)


def _vault_settings(
    cfg: LoadedConfig,
    chain: ChainSpec,
    section: VaultTransitSigning | VaultSignerPluginSigning,
    mode: str,
) -> VaultSettings:
    """Plain, validated Vault settings from a ``[signing.<mode>]`` section (token read)."""
    from nebula.backends._vault_common import VaultSettings, load_token

    where = f"{cfg.path}: {chain.where('signing.' + mode)}"
    ca_cert = cfg.resolve(section.ca_cert)
    token_path = cfg.resolve(section.token_path)
    return VaultSettings.create(
        section.address,
        section.mount,
        section.key_name,
        load_token(token_path, section.token_env, where=where),
        ca_cert=str(ca_cert) if ca_cert is not None else None,
        insecure_skip_verify=section.insecure_skip_verify,
        timeout=section.timeout,
        where=where,
        token_path=str(token_path) if token_path is not None else None,
    )


def read_cluster_secret(path: Path) -> bytes:
    """The cluster secret in ``path`` (a 0600 file; surrounding whitespace ignored)."""
    from nebula.crypto.keys import check_private_file

    check_private_file(path)
    secret = path.read_bytes().strip()
    if not secret:
        raise ConfigError(f"{path}: the cluster secret is empty")
    return secret


def load_identity_for(cfg: LoadedConfig, spec: ChainSpec) -> bytes:
    """The SecretConnection identity seed of ``spec``'s connections (a fresh one when the
    chain names no ``connection_key_path``); a key file error names the config key."""
    try:
        return load_or_make_identity(cfg.resolve(spec.connection_key_path))
    except KeyFileError as e:
        where = spec.where("connection_key_path")
        raise KeyFileError(
            f"{cfg.path}: {where} (the SecretConnection identity key): {e}"
        ) from None


def _initial_paths(cfg: LoadedConfig) -> dict[str, Path]:
    """Each chain's initial state file (``initial_state_path``; for a single-chain Raft
    config ``raft.initial_state_path`` too): chain id -> path."""
    out: dict[str, Path] = {}
    r = cfg.raw.raft
    for chain in cfg.chains:
        path = chain.initial_state_path
        if not cfg.multi_chain and cfg.raw.persist == "raft" and r is not None:
            path = r.initial_state_path or path
        p = cfg.resolve(path)
        if p is not None:
            out[chain.chain_id] = p
    return out


def _initial(cfg: LoadedConfig) -> dict[str, SignRecord | None]:
    """Each chain's initial state, read: chain id -> record."""
    return {c: load_priv_validator_state(p, c) for c, p in _initial_paths(cfg).items()}


def make_store(
    cfg: LoadedConfig,
    loop: asyncio.AbstractEventLoop,
    threshold: dict[str, Any] | None = None,
) -> SignStore:
    """The store; ``threshold``: chain id -> this member's KeyShare (BLS-Raft chains)."""
    raw = cfg.raw
    if raw.persist == "local":
        from nebula.state.local import LocalStore

        state_path = cfg.resolve(raw.state_path)
        assert state_path is not None
        store = LocalStore(state_path, _initial(cfg))
        for chain in cfg.chains:
            if store.last(chain.chain_id) is None:
                _warn_starting_from_zero(cfg, chain, state_path, store.created)
        return store
    from nebula.state.raft import RaftStore

    r = raw.raft
    if r is None or not r.secret_path:
        raise ConfigError(f"{cfg.path}: persist = 'raft' needs [raft] with secret_path")
    secret_path = cfg.resolve(r.secret_path)
    assert secret_path is not None
    secret = read_cluster_secret(secret_path)
    data_path = cfg.resolve(r.data_path)
    assert data_path is not None
    return RaftStore(
        node_id=r.node_id,
        bind_addr=r.bind_addr,
        peers={p.id: p.addr for p in r.peers},
        data_path=data_path,
        secret=secret,
        initial=_initial(cfg),
        commit_timeout=r.commit_timeout,
        tick_interval=r.tick_interval,
        heartbeat_interval=r.heartbeat_interval,
        election_timeout_min=r.election_timeout_min,
        election_timeout_max=r.election_timeout_max,
        connection_retry=r.connection_retry,
        handshake_timeout=r.handshake_timeout,
        max_unauthenticated=r.max_unauthenticated,
        snapshot_entries=r.snapshot_entries,
        dynamic_membership=r.dynamic_membership,
        join=r.join,
        threshold=threshold,
        sync_off_loop=r.sync_off_loop,
        loop=loop,
    )


def _warn_starting_from_zero(
    cfg: LoadedConfig, spec: ChainSpec, state_path: Path | str, created: bool
) -> None:
    """A first start has no mark: say so loudly, with the fix, before anything is signed."""
    chain = spec.chain_id
    if isinstance(state_path, str):  # (a description: the replicated state)
        where = state_path
    else:
        where = f"new state file {state_path}" if created else f"state file {state_path}"
    log.warning(
        "NO SIGN STATE for chain %s (%s): double-sign protection starts at height/round/step "
        "0/0/0. If this key has signed on %s before (another signer, an older state file), "
        "stop now and import its last state: set initial_state_path = "
        '"priv_validator_state.json" (%s) in %s and restart, or run `nebula state import -c %s '
        "%spriv_validator_state.json` (an import only ever raises the mark).",
        chain,
        where,
        chain,
        spec.where("initial_state_path"),
        cfg.path,
        cfg.path,
        f"--chain {chain} " if cfg.multi_chain else "",
        extra={"event": "no_sign_state", "chain_id": chain, "state_path": str(state_path)},
    )


@dataclasses.dataclass(slots=True)
class ChainRuntime:
    """What serves one chain: its backend, its signing service and its dialers."""

    spec: ChainSpec
    backend: Backend
    service: SigningService
    dialers: list[Dialer]
    address: str  # the validator address of its key, hex


class Daemon:
    #: First retry (seconds) of a backend that could not connect at start; doubles to 30.
    BACKEND_RETRY = 1.0
    BACKEND_START_WAIT = 10.0

    def __init__(self, cfg: LoadedConfig) -> None:
        self.cfg = cfg
        self.store: SignStore | None = None
        self.chains: dict[str, ChainRuntime] = {}
        self.metrics: Metrics | None = None
        self.health: HealthServer | None = None
        self.admin: AdminServer | None = None
        self._stop = asyncio.Event()
        self._bg: set[asyncio.Task[None]] = set()
        self.sign_worker: SignWorker | None = None
        #: chains whose backend could not connect yet: chain id -> why
        self.pending: dict[str, str] = {}
        self._seeds: dict[str | None, bytes] = {}

    @property
    def dialers(self) -> list[Dialer]:
        return [d for rt in self.chains.values() for d in rt.dialers]

    # The single chain's objects (tests and single-chain tools).
    @property
    def service(self) -> SigningService | None:
        rt = next(iter(self.chains.values()), None)
        return rt.service if rt is not None else None

    @property
    def backend(self) -> Backend | None:
        rt = next(iter(self.chains.values()), None)
        return rt.backend if rt is not None else None

    async def start(self) -> None:
        cfg = self.cfg
        backends: dict[str, Backend] = {}
        # Remote backends (Vault, PKCS#11) of a multi-chain config connect at once, each
        # on its own thread, for at most BACKEND_START_WAIT: one that is down or answers
        # a byte at a time (hvac's timeout is per read) must not hold the other chains.
        # It retries (or keeps waiting) in the background.  A single chain fails fast as
        # before; local keys load on the loop.
        remote: dict[str, asyncio.Future[Backend]] = {}
        try:
            for spec in cfg.chains:
                if len(cfg.chains) >= 2 and spec.signing_mode in _REMOTE_MODES:
                    remote[spec.chain_id] = _in_thread(make_backend, cfg, spec)
                    continue
                backends[spec.chain_id] = make_backend(cfg, spec)
            if remote:
                await self._wait_for_connects(list(remote.values()))
            for chain_id, fut in list(remote.items()):
                if not fut.done():
                    self.pending[chain_id] = (
                        f"no answer within {self.BACKEND_START_WAIT:g} s at start; still waiting"
                    )
                    continue
                del remote[chain_id]
                try:
                    backends[chain_id] = fut.result()
                except BackendError as e:  # down at start: retried in the background
                    self.pending[chain_id] = str(e)
        except BaseException:
            for fut in remote.values():  # whatever still connects is closed when it does
                fut.add_done_callback(_close_when_made)
            for b in backends.values():
                with contextlib.suppress(Exception):
                    await b.close()
            raise
        try:
            await self._serve_chains(backends, remote)
        except BaseException:
            # A later step failed (the store, the metrics port, the admin socket): what
            # still connects is closed when it does, as above.
            for fut in remote.values():
                fut.add_done_callback(_close_when_made)
            raise

    async def _wait_for_connects(self, futs: list[asyncio.Future[Backend]]) -> None:
        """Until every connect in ``futs`` is done, BACKEND_START_WAIT has passed, or a
        stop is asked for (a SIGTERM during the wait is not held for its rest)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.BACKEND_START_WAIT
        stop = loop.create_task(self._stop.wait())
        try:
            todo: set[asyncio.Future[Any]] = {f for f in futs if not f.done()}
            while todo and not self._stop.is_set():
                left = deadline - loop.time()
                if left <= 0:
                    return
                done, _ = await asyncio.wait(
                    todo | {stop}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                todo -= done
        finally:
            stop.cancel()

    async def _serve_chains(
        self, backends: dict[str, Backend], remote: dict[str, asyncio.Future[Backend]]
    ) -> None:
        """The rest of :meth:`start`, once the backends are connected (``backends``) or
        still connecting (``remote``: handed to :meth:`_connect_later` at the end)."""
        cfg, raw = self.cfg, self.cfg.raw
        loop = asyncio.get_running_loop()
        try:
            shares = {c: b.share for c, b in backends.items() if getattr(b, "threshold", False)}
            self.store = make_store(cfg, loop, shares)
        except BaseException:
            for b in backends.values():
                with contextlib.suppress(Exception):
                    await b.close()
            raise
        self.metrics = Metrics()
        if getattr(self.store, "tshares", None) is not None:
            bad = self.metrics.threshold_bad_shares
            self.store.on_bad_share = (  # type: ignore[attr-defined]
                lambda chain, member: bad.labels(chain, str(member)).inc()
            )
        # The services exist before the store serves, so that close() finds every backend.
        for spec in cfg.chains:
            backend = backends.get(spec.chain_id)
            if backend is not None:
                self._add_chain(spec, backend)
        if self.store.replicated and raw.raft is not None and raw.raft.sign_off_loop:
            self._use_sign_worker(backends)
        await self.store.start()
        for chain_id in self.chains:
            self._show_last(chain_id)
        if self.store.replicated:
            self.metrics.before_expose = self._update_raft_gauges
        if raw.metrics.listen:
            host, port = parse_hostport(raw.metrics.listen, "metrics.listen")
            self.health = HealthServer(self.metrics, host, port, self.ready)
            await self.health.start()
        for rt in self.chains.values():
            log.info(
                "nebula signer for chain %s (%s, %s key, address %s, persist=%s, %d validator(s))",
                rt.spec.chain_id,
                rt.spec.family.value,
                rt.backend.key_type,
                rt.address,
                raw.persist,
                len(rt.dialers),
                extra={"event": "chain", "chain_id": rt.spec.chain_id},
            )
        self.admin = AdminServer(
            socket_path(cfg),
            {
                "status": self._admin_status,
                "export": self._admin_export,
                "import": self._admin_import,
                "transfer": self._admin_transfer,
                "add_member": self._admin_add_member,
                "remove_member": self._admin_remove_member,
            },
        )
        await self.admin.start()
        self.store.on_role_change(self._dial)
        if self.store.is_authoritative():
            self._dial(True)
        for spec in cfg.chains:
            if spec.chain_id in self.pending:
                log.error(
                    "chain %s: its backend is unavailable (%s); the other chains are "
                    "served, this one connects when it can",
                    spec.chain_id,
                    self.pending[spec.chain_id],
                    extra={"event": "backend_unavailable", "chain_id": spec.chain_id},
                )
                task = loop.create_task(
                    self._connect_later(spec, remote.get(spec.chain_id)), name=f"backend {spec}"
                )
                self._bg.add(task)
                task.add_done_callback(self._bg.discard)

    def _add_chain(self, spec: ChainSpec, backend: Backend) -> ChainRuntime:
        """Serve ``spec`` with ``backend``: its signing service and its dialers."""
        from nebula.crypto.keys import address_of

        assert self.store is not None and self.metrics is not None
        d = self.cfg.raw.dial
        service = SigningService(
            spec.chain_id, spec.family, backend, self.store, metrics=self.metrics
        )
        seed = self._seeds.get(spec.connection_key_path)
        if seed is None:
            seed = self._seeds[spec.connection_key_path] = load_identity_for(self.cfg, spec)
        dialers = [
            Dialer(
                ep,
                service,
                spec.family,
                identity_seed=seed,
                handshake_timeout=d.handshake_timeout,
                backoff_min=d.backoff_min,
                backoff_max=d.backoff_max,
                idle_timeout=d.idle_timeout,
                metrics=self.metrics,
            )
            for ep in spec.endpoints
        ]
        addr = address_of(backend.key_type, backend.public_key).hex().upper()
        rt = self.chains[spec.chain_id] = ChainRuntime(spec, backend, service, dialers, addr)
        return rt

    def _show_last(self, chain_id: str) -> None:
        assert self.store is not None and self.metrics is not None
        rec = self.store.last(chain_id)
        if rec is not None:
            self.metrics.last_height.labels(chain_id).set(rec.height)
            self.metrics.last_round.labels(chain_id).set(rec.round)
            self.metrics.last_step.labels(chain_id).set(rec.step)

    async def _connect_later(
        self, spec: ChainSpec, first: asyncio.Future[Backend] | None = None
    ) -> None:
        """Connect ``spec``'s backend (off the loop: the start-up calls block), retrying
        with backoff up to 30 s; then serve the chain, dialing if this node leads.
        ``first``: the start's attempt, still under way: its outcome is awaited first."""
        delay = self.BACKEND_RETRY
        while True:
            if first is not None:
                attempt, first = first, None
            else:
                await asyncio.sleep(delay)
                attempt = _in_thread(make_backend, self.cfg, spec)
            try:
                backend = await attempt
            except BackendError as e:
                self.pending[spec.chain_id] = str(e)
                delay = min(delay * 2, 30.0)
                log.warning(
                    "chain %s: backend still unavailable (%s); next try in %.0f s",
                    spec.chain_id,
                    e,
                    delay,
                    extra={"chain_id": spec.chain_id},
                )
                continue
            except NebulaError as e:  # a key or config problem: no retry mends it
                self.pending[spec.chain_id] = str(e)
                log.error("chain %s: not served: %s", spec.chain_id, e)
                return
            if self._stop.is_set() or self.store is None:
                await backend.close()
                return
            try:
                rt = self._add_chain(spec, backend)
            except NebulaError as e:  # its connection key
                self.pending[spec.chain_id] = str(e)
                log.error("chain %s: not served: %s", spec.chain_id, e)
                await backend.close()
                return
            del self.pending[spec.chain_id]
            self._show_last(spec.chain_id)
            log.info(
                "chain %s: backend connected (%s key, address %s); serving it",
                spec.chain_id,
                backend.key_type,
                rt.address,
                extra={"event": "chain", "chain_id": spec.chain_id},
            )
            if self.store.is_authoritative():
                for dialer in rt.dialers:
                    dialer.start()
            return

    def _dial(self, leader: bool) -> None:
        if leader:
            store = self.store
            if store is not None and store.replicated:
                # The cluster's first leader (or any leader) with no mark for a chain
                # whose initial state was not given: the same loud warning as a first
                # local start, before anything is signed.
                initial = set(_initial_paths(self.cfg))
                for chain_id, rt in self.chains.items():
                    if store.last(chain_id) is None and chain_id not in initial:
                        _warn_starting_from_zero(
                            self.cfg, rt.spec, "the cluster's replicated state", False
                        )
            log.info("dialing %d validator(s)", len(self.dialers))
            for dialer in self.dialers:
                dialer.start()
        else:
            log.info("not the leader: closing validator connections")
            for dialer in self.dialers:
                task = asyncio.get_running_loop().create_task(dialer.stop())
                self._bg.add(task)  # keep a reference until it is done
                task.add_done_callback(self._bg.discard)

    def _update_raft_gauges(self) -> None:
        """The Raft role/term/leader gauges, read from the store as /metrics is scraped."""
        m, store = self.metrics, self.store
        assert m is not None and store is not None
        st = store.status()
        m.raft_role.set(ROLE_VALUES.get(st.get("role", ""), 0))
        m.raft_term.set(st.get("term") or 0)
        m.raft_leader.set(st.get("leader_id") or 0)

    # ---- admin commands (nebula status / leader transfer / state / cluster) ------------

    def status(self) -> dict[str, Any]:
        raw = self.cfg.raw
        store = self.store
        assert store is not None
        node = store.status()
        node["validators"] = [
            {
                "chain_id": chain_id,
                "address": str(d.endpoint),
                "connected": d.connected,
                "connects": d.connects,
            }
            for chain_id, rt in self.chains.items()
            for d in rt.dialers
        ]
        states = node.get("chains") or {}
        node["served"] = {
            chain_id: {
                "version": rt.spec.family.value,
                "key_type": rt.backend.key_type,
                "address": rt.address,
                "signing_mode": rt.spec.signing_mode,
                # "worker": signed on the native signing thread (nebula.crypto.signworker)
                "signs_on": "worker" if rt.backend.signs_later() else "loop",
                "validators_connected": sum(1 for d in rt.dialers if d.connected),
                "validators": len(rt.dialers),
                "state": states.get(chain_id),
            }
            for chain_id, rt in self.chains.items()
        }
        for chain_id, why in self.pending.items():
            spec = self.cfg.chain(chain_id)
            node["served"][chain_id] = {
                "version": spec.family.value,
                "signing_mode": spec.signing_mode,
                "backend_unavailable": why,
                "validators_connected": 0,
                "validators": len(spec.endpoints),
                "state": states.get(chain_id),
            }
        if len(self.chains) == 1:
            rt = next(iter(self.chains.values()))
            node["chain_id"] = rt.spec.chain_id
            node["key_type"] = rt.backend.key_type
        node["persist"] = raw.persist
        node["version"] = __version__
        return node

    async def _admin_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def _chain_arg(self, req: dict[str, Any]) -> str:
        """The request's chain id: the only served chain if it names none."""
        chain_id = req.get("chain_id")
        if chain_id is None:
            if len(self.chains) != 1:
                raise ConfigError(
                    f"this node serves {len(self.chains)} chains ({', '.join(self.chains)}): "
                    "say which with --chain"
                )
            return next(iter(self.chains))
        return str(chain_id)

    async def _admin_export(self, req: dict[str, Any]) -> dict[str, Any] | None:
        store = self.store
        assert store is not None
        chain_id = self._chain_arg(req)
        if store.replicated and not store.is_authoritative():
            # A follower's applied state may trail the leader's by the entries it has not
            # applied yet; an export that is too low, imported elsewhere, would allow a
            # double sign.  Only the leader (every committed entry applied) answers.
            leader = store.status().get("leader_id")
            raise NotLeader(
                "this node is not the Raft leader: its sign state may trail the "
                "cluster's; export through the leader"
                + (f" (node {leader})" if leader else " (no leader now)")
            )
        rec = store.last_for_export(chain_id)
        return record_to_json(rec) if rec is not None else None

    async def _admin_import(self, req: dict[str, Any]) -> dict[str, Any] | None:
        store = self.store
        assert store is not None
        chain_id = self._chain_arg(req)
        rec = record_from_json(req.get("state"), "imported state")
        check_state_chain(rec, chain_id, "imported state")
        if rec is not None:
            await store.raise_to(chain_id, rec)
        cur = store.last(chain_id)
        return record_to_json(cur) if cur is not None else None

    async def _admin_transfer(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        to = req.get("to")
        new = await self.store.transfer_leadership(int(to) if to is not None else None)
        return {"leader_id": new}

    async def _admin_add_member(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        await self.store.add_member(int(req["id"]), str(req["addr"]))
        return {"members": self.status().get("members")}

    async def _admin_remove_member(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.store is not None
        await self.store.remove_member(int(req["id"]))
        return {"members": self.status().get("members")}

    def ready(self) -> tuple[bool, str]:
        """/readyz: a leader with quorum, or a follower that knows its leader."""
        store = self.store
        if store is None:
            return False, "starting"
        if not store.replicated:
            return True, "ready: local store"
        st = store.status()
        if store.is_authoritative():
            return True, f"ready: leader with quorum (term {st.get('term')})"
        leader = st.get("leader_id")
        if leader is not None and st.get("role") == "follower":
            peer = (st.get("peers") or {}).get(leader) or {}
            heard = peer.get("last_heard_s")
            if heard is not None and heard < READY_HEARD_WITHIN:
                return True, f"ready: follower of node {leader} (heard {heard:.2f}s ago)"
            return False, f"not ready: leader node {leader} not heard from recently"
        return False, f"not ready: role {st.get('role')}, no known leader"

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    def _use_sign_worker(self, backends: dict[str, Backend]) -> None:
        """With several chains on a Raft cluster, native Ed25519 keys sign on one native
        thread (nebula.crypto.signworker): the event loop reads and answers the other
        chains' requests meanwhile, and a loop pass's decisions still share one Raft
        round.  One chain keeps signing on the loop (a hand-over would only add a
        wake-up to its latency: BENCHMARKS.md)."""
        from nebula.backends.native import NativeBackend
        from nebula.crypto.signworker import SignWorker

        natives = [
            b for b in backends.values() if isinstance(b, NativeBackend) and b.key_type == "ed25519"
        ]
        if len(backends) < 2 or not natives:
            return
        self.sign_worker = SignWorker()
        for b in natives:
            b.use_worker(self.sign_worker)
        log.info("%d chain(s) with a native Ed25519 key sign on the signing thread", len(natives))

    async def close(self) -> None:
        """Stop in the order that keeps the state safe: validators first (no new request
        is read; a decision in flight is either durable or was never answered), then
        the store (files closed, lock released), then the local endpoints."""
        for task in list(self._bg):
            task.cancel()
        for dialer in self.dialers:
            await dialer.stop()
        if self.store is not None:
            await self.store.close()
        if self.sign_worker is not None:
            self.sign_worker.close()
        if self.admin is not None:
            await self.admin.close()
        if self.health is not None:
            await self.health.close()
        for rt in self.chains.values():
            with contextlib.suppress(Exception):
                await rt.backend.close()


async def serve(cfg: LoadedConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly (the process exits 0).

    Under systemd (``Type=notify``) it sends ``READY=1`` once it serves and
    ``STOPPING=1`` when it begins to stop (:mod:`nebula.aio.sdnotify`).
    """
    daemon = Daemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, daemon.request_stop)
    try:
        await daemon.start()
        what = "chain" if len(cfg.chains) == 1 else f"{len(cfg.chains)} chains:"
        sdnotify.notify("READY=1", f"STATUS=serving {what} {', '.join(cfg.chain_ids)}")
        await daemon.wait()
        log.info("stopping: closing validator connections and the sign state")
    finally:
        sdnotify.notify("STOPPING=1")
        await daemon.close()
    log.info("stopped cleanly")


def run(cfg: LoadedConfig) -> None:
    import uvloop

    uvloop.run(serve(cfg))


__all__ = ["Daemon", "Path", "run", "serve"]
