"""The composition root: config in, a running signer out.

This is the only module that installs uvloop and turns a config into objects:
the backend, the store (local file or Raft), the signing service and one dialer
per validator address.  With a Raft store only the leader dials (S5): it starts
dialing when it wins leadership and closes every validator connection the moment
it loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nebula import __version__
from nebula.aio import sdnotify
from nebula.aio.admin import AdminServer, socket_path
from nebula.aio.conn import Dialer, load_or_make_identity
from nebula.backends.base import Backend
from nebula.config import (
    LoadedConfig,
    VaultSignerPluginSigning,
    VaultTransitSigning,
    parse_hostport,
)
from nebula.errors import ConfigError
from nebula.guard import SignRecord
from nebula.metrics import ROLE_VALUES, HealthServer, Metrics
from nebula.service import SigningService
from nebula.state.base import (
    SignStore,
    load_priv_validator_state,
    record_from_json,
    record_to_json,
)

if TYPE_CHECKING:
    from nebula.backends._vault_common import VaultSettings

log = logging.getLogger("nebula.daemon")

# /readyz: a follower is ready only while it hears from its leader.
READY_HEARD_WITHIN = 2.0


def make_backend(cfg: LoadedConfig) -> Backend:
    raw = cfg.raw
    if raw.signing_mode == "native":
        from nebula.backends.native import NativeBackend
        from nebula.crypto.keys import BLS_DEFAULT_DST, load_key_file

        n = raw.signing.native
        if n is None:
            raise ConfigError(f"{cfg.path}: missing [signing.native]")
        path = cfg.resolve(n.private_key_path)
        dst = n.bls_dst.encode() if n.bls_dst else BLS_DEFAULT_DST
        return NativeBackend(load_key_file(path, n.key_type, bls_dst=dst))
    if raw.signing_mode == "vault_transit":
        from nebula.backends.vault_transit import VaultTransitBackend

        t = raw.signing.vault_transit
        if t is None:
            raise ConfigError(f"{cfg.path}: missing [signing.vault_transit]")
        return VaultTransitBackend.connect(
            _vault_settings(cfg, t, "vault_transit"), version=raw.version
        )
    from nebula.backends.vault_signer_plugin import VaultSignerPluginBackend
    from nebula.crypto.keys import BLS_DEFAULT_DST

    p = raw.signing.vault_signer_plugin
    if p is None:
        raise ConfigError(f"{cfg.path}: missing [signing.vault_signer_plugin]")
    dst = BLS_DEFAULT_DST
    if p.bls_dst:
        try:
            dst = p.bls_dst.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(
                f"{cfg.path}: signing.vault_signer_plugin.bls_dst must be ASCII"
            ) from None
    return VaultSignerPluginBackend.connect(
        _vault_settings(cfg, p, "vault_signer_plugin"), version=raw.version, bls_dst=dst
    )


def _vault_settings(
    cfg: LoadedConfig, section: VaultTransitSigning | VaultSignerPluginSigning, mode: str
) -> VaultSettings:
    """Plain, validated Vault settings from a ``[signing.<mode>]`` section (token read)."""
    from nebula.backends._vault_common import VaultSettings, load_token

    where = f"{cfg.path}: signing.{mode}"
    ca_cert = cfg.resolve(section.ca_cert)
    return VaultSettings.create(
        section.address,
        section.mount,
        section.key_name,
        load_token(cfg.resolve(section.token_path), section.token_env, where=where),
        ca_cert=str(ca_cert) if ca_cert is not None else None,
        insecure_skip_verify=section.insecure_skip_verify,
        timeout=section.timeout,
        where=where,
    )


def _initial(cfg: LoadedConfig, path: str | None) -> dict[str, SignRecord | None]:
    p = cfg.resolve(path)
    if p is None:
        return {}
    return {cfg.raw.chain_id: load_priv_validator_state(p)}


def make_store(cfg: LoadedConfig, loop: asyncio.AbstractEventLoop) -> SignStore:
    raw = cfg.raw
    if raw.persist == "local":
        from nebula.state.local import LocalStore

        state_path = cfg.resolve(raw.state_path)
        assert state_path is not None
        store = LocalStore(state_path, _initial(cfg, raw.initial_state_path))
        if store.last(raw.chain_id) is None:
            _warn_starting_from_zero(cfg, state_path, store.created)
        return store
    from nebula.crypto.keys import check_private_file
    from nebula.state.raft import RaftStore

    r = raw.raft
    if r is None or not r.secret_path:
        raise ConfigError(f"{cfg.path}: persist = 'raft' needs [raft] with secret_path")
    secret_path = cfg.resolve(r.secret_path)
    assert secret_path is not None
    check_private_file(secret_path)
    secret = secret_path.read_bytes().strip()
    if not secret:
        raise ConfigError(f"{secret_path}: the cluster secret is empty")
    data_path = cfg.resolve(r.data_path)
    assert data_path is not None
    return RaftStore(
        node_id=r.node_id,
        bind_addr=r.bind_addr,
        peers={p.id: p.addr for p in r.peers},
        data_path=data_path,
        secret=secret,
        initial=_initial(cfg, r.initial_state_path or raw.initial_state_path),
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
        loop=loop,
    )


def _warn_starting_from_zero(cfg: LoadedConfig, state_path: Path, created: bool) -> None:
    """A first start has no mark: say so loudly, with the fix, before anything is signed."""
    chain = cfg.raw.chain_id
    where = f"new state file {state_path}" if created else f"state file {state_path}"
    log.warning(
        "NO SIGN STATE for chain %s (%s): double-sign protection starts at height/round/step "
        "0/0/0. If this key has signed on %s before (another signer, an older state file), "
        "stop now and import its last state: set initial_state_path = "
        '"priv_validator_state.json" in %s and restart, or run `nebula state import -c %s '
        "priv_validator_state.json` (an import only ever raises the mark).",
        chain,
        where,
        chain,
        cfg.path,
        cfg.path,
        extra={"event": "no_sign_state", "chain_id": chain, "state_path": str(state_path)},
    )


def _known_states(store: SignStore, chain_id: str) -> dict[str, SignRecord]:
    rec = store.last(chain_id)
    return {chain_id: rec} if rec is not None else {}


class Daemon:
    def __init__(self, cfg: LoadedConfig) -> None:
        self.cfg = cfg
        self.backend: Backend | None = None
        self.store: SignStore | None = None
        self.service: SigningService | None = None
        self.dialers: list[Dialer] = []
        self.metrics: Metrics | None = None
        self.health: HealthServer | None = None
        self.admin: AdminServer | None = None
        self._stop = asyncio.Event()
        self._bg: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        cfg, raw = self.cfg, self.cfg.raw
        loop = asyncio.get_running_loop()
        self.backend = make_backend(cfg)
        self.store = make_store(cfg, loop)
        await self.store.start()
        self.metrics = Metrics()
        self.service = SigningService(
            raw.chain_id, cfg.family, self.backend, self.store, metrics=self.metrics
        )
        for chain_id, rec in _known_states(self.store, raw.chain_id).items():
            self.metrics.last_height.labels(chain_id).set(rec.height)
            self.metrics.last_round.labels(chain_id).set(rec.round)
            self.metrics.last_step.labels(chain_id).set(rec.step)
        if self.store.replicated:
            self.metrics.before_expose = self._update_raft_gauges
        if raw.metrics.listen:
            host, port = parse_hostport(raw.metrics.listen, "metrics.listen")
            self.health = HealthServer(self.metrics, host, port, self.ready)
            await self.health.start()
        ident_path = cfg.resolve(raw.connection_key_path)
        seed = load_or_make_identity(ident_path)
        d = raw.dial
        self.dialers = [
            Dialer(
                ep,
                self.service,
                cfg.family,
                identity_seed=seed,
                handshake_timeout=d.handshake_timeout,
                backoff_min=d.backoff_min,
                backoff_max=d.backoff_max,
                idle_timeout=d.idle_timeout,
                metrics=self.metrics,
            )
            for ep in cfg.endpoints
        ]
        from nebula.crypto.keys import address_of

        addr = address_of(self.backend.key_type, self.backend.public_key).hex().upper()
        log.info(
            "nebula signer for chain %s (%s, %s key, address %s, persist=%s)",
            raw.chain_id,
            cfg.family.value,
            self.backend.key_type,
            addr,
            raw.persist,
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

    def _dial(self, leader: bool) -> None:
        if leader:
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
        assert store is not None and self.backend is not None
        node = store.status()
        node["validators"] = [
            {"address": str(d.endpoint), "connected": d.connected, "connects": d.connects}
            for d in self.dialers
        ]
        node["chain_id"] = raw.chain_id
        node["persist"] = raw.persist
        node["key_type"] = self.backend.key_type
        node["version"] = __version__
        return node

    async def _admin_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _admin_export(self, req: dict[str, Any]) -> dict[str, Any] | None:
        assert self.store is not None
        rec = self.store.last(str(req.get("chain_id") or self.cfg.raw.chain_id))
        return record_to_json(rec) if rec is not None else None

    async def _admin_import(self, req: dict[str, Any]) -> dict[str, Any] | None:
        store = self.store
        assert store is not None
        chain_id = str(req.get("chain_id") or self.cfg.raw.chain_id)
        rec = record_from_json(req.get("state"), "imported state")
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
        if self.admin is not None:
            await self.admin.close()
        if self.health is not None:
            await self.health.close()
        if self.backend is not None:
            with contextlib.suppress(Exception):
                await self.backend.close()


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
        sdnotify.notify("READY=1", f"STATUS=serving chain {cfg.raw.chain_id}")
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
