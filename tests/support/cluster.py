"""Real Nebula Raft clusters for tests: processes, proxies, a validator-side driver, an auditor.

* :class:`ProcCluster` writes N node directories and runs each as a real `nebula start`
  process on 127.0.0.1; with ``proxied=True`` every Raft link i->j goes through its own
  fault-injecting :class:`~tests.support.proxy.Proxy`, so a node can be cut off.
* :class:`Auditor` records every signature that leaves the cluster, verifies it with the
  validator's public key, and fails on any two different signatures for one
  (chain, height, round, step).
* :class:`Driver` plays the validator: it listens like CometBFT, takes whatever signer
  connection is newest (only the leader dials), and retries a request identically after
  a dropped connection, as the node's RetrySignerClient does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nebula import proto
from nebula.aio import admin
from nebula.aio.validator_side import PrivvalListener, SignerConnection
from nebula.config import load as load_config
from nebula.crypto.keys import SigningKey, signature_verifier
from nebula.devnet.cluster import ChainDef, NebulaNode, NodeDir, write_node_dir
from nebula.errors import NebulaError
from nebula.types import (
    BlockID,
    PartSetHeader,
    Proposal,
    SignedMsgType,
    SignedProposalResponse,
    SignedVoteResponse,
    SignProposalRequest,
    SignVoteRequest,
    Timestamp,
    Vote,
    WireFamily,
)
from tests.support.ports import free_ports
from tests.support.proxy import Proxy

STEP_OF = {SignedMsgType.PREVOTE: 2, SignedMsgType.PRECOMMIT: 3, SignedMsgType.PROPOSAL: 1}


class ConflictError(AssertionError):
    pass


@dataclass
class Auditor:
    """Every signature that leaves the cluster, keyed by (chain, height, round, step)."""

    key_type: str
    public_key: bytes
    seen: dict[tuple[str, int, int, int], set[bytes]] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        self._verify = signature_verifier(self.key_type, self.public_key)

    def record(
        self, chain_id: str, hrs: tuple[int, int, int], sign_bytes: bytes, sig: bytes
    ) -> None:
        if not self._verify(sign_bytes, sig):
            raise ConflictError(f"signature at {hrs} does not verify with the validator key")
        sigs = self.seen.setdefault((chain_id, *hrs), set())
        sigs.add(sig)
        self.count += 1
        if len(sigs) > 1:
            raise ConflictError(
                f"DOUBLE SIGN: {len(sigs)} different signatures at {chain_id} {hrs}"
            )

    def vote(self, chain_id: str, req: SignVoteRequest, resp: SignedVoteResponse) -> None:
        v = req.vote
        signed = Vote(
            type=v.type,
            height=v.height,
            round=v.round,
            block_id=v.block_id,
            timestamp=resp.vote.timestamp,
        )
        self.record(
            chain_id,
            (v.height, v.round, STEP_OF[v.type]),
            proto.vote_sign_bytes(chain_id, signed),
            resp.vote.signature,
        )

    def proposal(
        self, chain_id: str, req: SignProposalRequest, resp: SignedProposalResponse
    ) -> None:
        p = req.proposal
        signed = Proposal(
            height=p.height,
            round=p.round,
            pol_round=p.pol_round,
            block_id=p.block_id,
            timestamp=resp.proposal.timestamp,
        )
        self.record(
            chain_id,
            (p.height, p.round, 1),
            proto.proposal_sign_bytes(chain_id, signed),
            resp.proposal.signature,
        )

    def check(self) -> None:
        for k, sigs in self.seen.items():
            if len(sigs) > 1:
                raise ConflictError(f"DOUBLE SIGN at {k}")


def block(h: int, salt: int = 0) -> BlockID:
    seed = h.to_bytes(8, "big") + salt.to_bytes(4, "big")
    return BlockID(seed.ljust(32, b"\xab"), PartSetHeader(1, seed.ljust(32, b"\xcd")))


def vote_req(
    chain_id: str,
    h: int,
    typ: int = SignedMsgType.PREVOTE,
    r: int = 0,
    salt: int = 0,
    ts: Timestamp | None = None,
) -> SignVoteRequest:
    return SignVoteRequest(
        Vote(
            type=typ,
            height=h,
            round=r,
            block_id=block(h, salt),
            timestamp=ts or Timestamp(1_700_000_000 + h, 1000 * r + salt),
            validator_address=b"\x01" * 20,
        ),
        chain_id,
    )


class ProcCluster:
    """N real `nebula start` processes forming one Raft cluster."""

    def __init__(
        self,
        base: Path,
        n: int,
        *,
        key: SigningKey | None = None,
        chain_id: str = "",
        connections: Sequence[str] = (),
        version: str = "v0_38",
        chains: Sequence[ChainDef] | None = None,
        proxied: bool = False,
        commit_timeout: float = 1.0,
        extra: str = "",
        signing: str | None = None,
        metrics: bool = False,
        node_env: Callable[[int], Mapping[str, str]] | None = None,
        raft_extra: Mapping[str, Any] | None = None,
    ) -> None:
        """``node_env(node_id)``: extra environment variables for that node's process;
        ``raft_extra``: more ``[raft]`` keys for every node (e.g. ``dynamic_membership``).
        With ``chains`` every node serves several chains (``[[chains]]``, each with its
        own key and validators) instead of ``chain_id``/``version``/``key``/``connections``."""
        self.base = Path(base)
        self.n = n
        self.key = key
        self.chain_id = chain_id
        self._node_args: dict[str, Any] = {"persist": "raft", "log_level": "debug"}
        if chains is not None:
            self._node_args["chains"] = list(chains)
        else:
            self._node_args.update(
                chain_id=chain_id,
                version=version,
                key=key,
                connections=list(connections),
                signing=signing,
            )
        self._raft_common: dict[str, Any] = {
            "data_path": "./raft_data",
            "commit_timeout": commit_timeout,
            "election_timeout_min": 0.4,
            "election_timeout_max": 0.8,
            **(raft_extra or {}),
        }
        self._node_env = node_env
        self.ports = free_ports(n)
        self.proxies: dict[tuple[int, int], Proxy] = {}
        if proxied:
            pp = iter(free_ports(n * (n - 1)))
            for i in range(1, n + 1):
                for j in range(1, n + 1):
                    if i != j:
                        self.proxies[(i, j)] = Proxy(next(pp), self.ports[j - 1])
        secret = self.secret = secrets.token_hex(32).encode()
        self.dirs: list[NodeDir] = []
        self.metrics_ports = free_ports(n) if metrics else []
        for i in range(1, n + 1):
            peers = {
                j: f"127.0.0.1:{self.proxies[(i, j)].listen_port if (i, j) in self.proxies else self.ports[j - 1]}"
                for j in range(1, n + 1)
            }
            raft = {
                "node_id": i,
                "bind_addr": f"127.0.0.1:{self.ports[i - 1]}",
                **self._raft_common,
                "peers": peers,
            }
            self.dirs.append(
                write_node_dir(
                    self.base / f"node{i}",
                    **self._node_args,
                    raft=raft,
                    secret=secret,
                    extra=extra
                    + (
                        f'\n[metrics]\nlisten = "127.0.0.1:{self.metrics_ports[i - 1]}"\n'
                        if metrics
                        else ""
                    ),
                )
            )
        self._extra = extra
        self.nodes = {
            d.node_id: NebulaNode(
                d.config_path,
                log_path=d.log_path,
                cwd=d.home,
                env=node_env(d.node_id) if node_env is not None else None,
            )
            for d in self.dirs
        }
        self._sockets = {
            d.node_id: admin.socket_path(load_config(d.config_path)) for d in self.dirs
        }

    def add_node(self) -> NodeDir:
        """Write (not start) the directory of node ``n + 1`` for a membership change.

        Same key, cluster secret and settings as the others, an empty Raft data
        directory, ``join = true`` and ``peers`` listing every node written so far plus
        itself (what ``nebula cluster add`` expects). Only for clusters without proxies.
        """
        if self.proxies:
            raise NebulaError("add_node does not wire proxies; use proxied=False")
        self.n += 1
        i = self.n
        self.ports += free_ports(1)
        raft = {
            "node_id": i,
            "bind_addr": f"127.0.0.1:{self.ports[i - 1]}",
            **self._raft_common,
            "join": True,  # a new member waits for the leader's snapshot
            "peers": {j: f"127.0.0.1:{self.ports[j - 1]}" for j in range(1, i + 1)},
        }
        d = write_node_dir(
            self.base / f"node{i}",
            **self._node_args,
            raft=raft,
            secret=self.secret,
            extra=self._extra,
        )
        self.dirs.append(d)
        self.nodes[i] = NebulaNode(
            d.config_path,
            log_path=d.log_path,
            cwd=d.home,
            env=self._node_env(i) if self._node_env is not None else None,
        )
        self._sockets[i] = admin.socket_path(load_config(d.config_path))
        return d

    def start(self) -> ProcCluster:
        for p in self.proxies.values():
            p.start()
        for node in self.nodes.values():
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for p in self.proxies.values():
            p.stop()

    def __enter__(self) -> ProcCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self, node_id: int) -> dict[str, Any] | None:
        try:
            return admin.request(self._sockets[node_id], "status", timeout=2)
        except (NebulaError, OSError):
            return None

    def leader(self, exclude: set[int] = frozenset()) -> int | None:  # type: ignore[assignment]
        for nid, node in self.nodes.items():
            if nid in exclude or not node.alive():
                continue
            st = self.status(nid)
            if st and st.get("role") == "leader" and st.get("authoritative"):
                return nid
        return None

    async def wait_leader(self, timeout: float = 15.0, exclude: set[int] = frozenset()) -> int:  # type: ignore[assignment]
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            nid = await loop.run_in_executor(None, self.leader, exclude)
            if nid is not None:
                return nid
            await asyncio.sleep(0.05)
        raise TimeoutError("no Raft leader elected")

    def wait_caught_up(self, nid: int, timeout: float = 20.0) -> None:
        """Wait until member ``nid`` has applied (nearly) everything the leader committed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lead = self.leader()
            st = self.status(nid)
            ls = self.status(lead) if lead is not None else None
            if (
                st
                and ls
                and st.get("fatal") is None
                and st["applied_index"] >= ls["commit_index"] - 2
            ):
                return
            time.sleep(0.05)
        raise AssertionError(f"node {nid} did not catch up within {timeout}s\n{self.logs()}")

    def wait_leader_sync(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nid = self.leader()
            if nid is not None:
                return nid
            time.sleep(0.05)
        raise TimeoutError(f"no Raft leader elected\n{self.logs()}")

    def cut(self, node_id: int) -> None:
        for (i, j), p in self.proxies.items():
            if node_id in (i, j):
                p.cut()

    def heal(self) -> None:
        for p in self.proxies.values():
            p.heal()

    def logs(self) -> str:
        return "\n".join(f"--- node{nid}\n{n.log_tail(4000)}" for nid, n in self.nodes.items())


class Driver:
    """The validator side: one listener per sentry address, newest connection wins."""

    def __init__(self, addresses: list[str], family: WireFamily, chain_id: str, auditor: Auditor):
        self.listeners = [PrivvalListener(a, family) for a in addresses]
        self.chain_id = chain_id
        self.auditor = auditor
        self.current: list[SignerConnection | None] = [None] * len(addresses)
        self.refusals: list[str] = []

    async def start(self) -> Driver:
        for lst in self.listeners:
            await lst.start()
        return self

    async def close(self) -> None:
        for lst in self.listeners:
            await lst.close()

    def _newest(self, i: int) -> SignerConnection | None:
        lst = self.listeners[i]
        while not lst._conns.empty():
            self.current[i] = lst._conns.get_nowait()
        c = self.current[i]
        return c if c is not None and not c.closed else None

    async def connection(self, i: int = 0, timeout: float = 15.0) -> SignerConnection:
        c = self._newest(i)
        if c is not None:
            return c
        self.current[i] = await self.listeners[i].accept(timeout)
        return self._newest(i) or self.current[i]  # type: ignore[return-value]

    async def request_once(self, req, i: int = 0, timeout: float = 3.0):
        conn = await self.connection(i)
        resp = await conn.request(req, timeout=timeout)
        self._audit(req, resp)
        return resp

    async def answer(self, req, i: int = 0, deadline: float = 20.0):
        """Send ``req`` until a signer answers it (signed or refused), retrying
        identically on a connection that fails, as a node would.  After a restart the
        newest connection may be the old leader's, closed but not yet read as closed."""
        end = time.monotonic() + deadline
        last_err = ""
        while time.monotonic() < end:
            try:
                conn = await self.connection(i, timeout=max(0.1, end - time.monotonic()))
                resp = await conn.request(req, timeout=3.0)
            except (NebulaError, TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                last_err = repr(e)
                if self.current[i] is not None:
                    self.current[i].close()
                    self.current[i] = None
                await asyncio.sleep(0.02)
                continue
            self._audit(req, resp)
            return resp
        raise TimeoutError(f"request not answered within {deadline}s: {last_err}")

    async def sign(self, req, i: int = 0, deadline: float = 20.0):
        """Send ``req`` until it is signed (retrying identically), as a node would."""
        end = time.monotonic() + deadline
        last_err = ""
        while time.monotonic() < end:
            try:
                resp = await self.answer(req, i, deadline=max(0.1, end - time.monotonic()))
            except TimeoutError as e:
                last_err = str(e)
                break
            err = resp.error
            if err is None:
                return resp
            last_err = err.description
            self.refusals.append(err.description)
            await asyncio.sleep(0.05)
        raise TimeoutError(f"request not signed within {deadline}s: {last_err}")

    def _audit(self, req, resp) -> None:
        if getattr(resp, "error", None) is not None:
            return
        if isinstance(req, SignVoteRequest):
            self.auditor.vote(self.chain_id, req, resp)
        elif isinstance(req, SignProposalRequest):
            self.auditor.proposal(self.chain_id, req, resp)


@contextlib.asynccontextmanager
async def driver(addresses: list[str], family: WireFamily, chain_id: str, auditor: Auditor):
    d = await Driver(addresses, family, chain_id, auditor).start()
    try:
        yield d
    finally:
        await d.close()
