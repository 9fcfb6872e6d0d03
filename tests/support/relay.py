"""An auditing privval relay: CometBFT node <-> relay <-> Nebula cluster.

The relay sits on the privval connection and sees every signature that leaves the
cluster, independently of anything Nebula says about itself::

    CometBFT (listens on priv_validator_laddr)
        ^  the relay dials it, acting as the signer (SecretConnection, own identity)
        |
    AuditingRelay
        ^  Nebula dials the relay, which acts as the node (SecretConnection, own identity)
        |
    Nebula leader (only the leader dials; a new leader dials again)

Requests from the node and responses from Nebula are forwarded byte for byte; both are
also decoded, and every signed vote and proposal is verified with the validator's public
key and recorded in an :class:`~tests.support.cluster.Auditor` (two different signatures
for one chain/height/round/step are a double sign).  Anything wrong -- a double sign, a
signature that does not verify, a response that does not match its request, a wrong
public key -- goes to :attr:`AuditingRelay.violations`; a test fails on any.

Connections.  The node keeps one connection (the relay's) and only accepts another when
it needs one, so the relay keeps its node connection and redials when the node drops it
(node restart, read timeout).  Toward Nebula the newest connection wins: when a new
leader dials, older connections are closed.  A request is retried identically on the
next connection when its connection dies or stays silent for ``attempt_timeout``, for at
most ``request_deadline`` seconds (below the node's 5 s read timeout), as CometBFT's
RetrySignerClient would.  Responses that arrive on any connection are audited, also when
the node is no longer waiting for them.

Faults toward Nebula (armed now, fired on the next vote/proposal request):
:meth:`~AuditingRelay.inject_garbage` writes garbage into the encrypted stream (before
or after the request), :meth:`~AuditingRelay.inject_disconnect` closes the connection
after sending the request and before its response arrives.  The request is then retried
on Nebula's next connection, and must still be signed correctly.

The relay runs its own asyncio loop in a background thread, so synchronous code can use
it; everything binds to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nebula import proto
from nebula.crypto.keys import signature_verifier
from nebula.crypto.secretconn import SEALED_FRAME_SIZE, Handshake, Session
from nebula.errors import DecodeError, NebulaError, ProtocolError
from nebula.types import (
    PingRequest,
    PingResponse,
    PubKeyRequest,
    PubKeyResponse,
    Request,
    Response,
    SignedMsgType,
    SignedProposalResponse,
    SignedVoteResponse,
    SignProposalRequest,
    SignVoteRequest,
    WireFamily,
)
from tests.support.cluster import Auditor, ConflictError
from tests.support.ports import free_port

__all__ = ["GARBAGE_KINDS", "AuditingRelay", "InjectedFault", "RequestRecord"]

_CHUNK = 1 << 16
_MAX_RESPONSE = 1 << 20
GARBAGE_KINDS = ("raw", "sealed", "oversize")
"""raw: 1044 random bytes that are no sealed frame (authentication fails); sealed: a
valid frame carrying a message that cannot decode; oversize: a valid frame announcing a
message larger than Nebula accepts."""


class _ConnLost(Exception):
    pass


@dataclass
class InjectedFault:
    """One validator-side fault: armed by the caller, fired by the relay."""

    kind: str  # "garbage" | "disconnect"
    params: dict[str, Any]
    armed_at: float  # time.monotonic()
    fired_at: float | None = None
    request: str = ""  # what it hit, e.g. "prevote h=12 r=0"
    outcome: str = ""  # how it went, filled in when the request completes

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        state = "not fired" if self.fired_at is None else f"on {self.request}: {self.outcome}"
        return f"{self.kind}({p}) {state}"


@dataclass
class RequestRecord:
    """One request from the node, as the relay served it."""

    t: float  # time.monotonic() when it arrived from the node
    kind: str  # "prevote" | "precommit" | "proposal" | "ping" | "pubkey" | ...
    height: int | None
    round: int | None
    latency_s: float | None  # None: no answer within the deadline
    attempts: int
    outcome: str  # "signed" | "refused: ..." | "ok" | "unanswered"


@dataclass
class _Attempt:
    req: Request
    future: asyncio.Future[bytes]


@dataclass
class _NebulaConn:
    seq: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    session: Session
    in_flight: _Attempt | None = None
    closed: bool = False
    close_reason: str = ""
    task: asyncio.Task[None] | None = None
    log: Callable[[str], None] | None = None

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            with contextlib.suppress(Exception):
                self.writer.transport.abort()
            if self.log is not None:
                self.log(f"Nebula connection #{self.seq} closed: {reason}")
        att = self.in_flight
        if att is not None and not att.future.done():
            att.future.set_exception(_ConnLost(reason))


def _describe(req: Request) -> tuple[str, int | None, int | None]:
    if isinstance(req, SignVoteRequest):
        name = {SignedMsgType.PREVOTE: "prevote", SignedMsgType.PRECOMMIT: "precommit"}.get(
            req.vote.type, f"vote type {req.vote.type}"
        )
        return name, req.vote.height, req.vote.round
    if isinstance(req, SignProposalRequest):
        return "proposal", req.proposal.height, req.proposal.round
    if isinstance(req, PingRequest):
        return "ping", None, None
    if isinstance(req, PubKeyRequest):
        return "pubkey", None, None
    return type(req).__name__, None, None


async def _handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seed: bytes
) -> Session:
    hs = Handshake(seed)
    writer.write(hs.initial_bytes())
    while not hs.done:
        data = await reader.read(_CHUNK)
        if not data:
            raise ProtocolError("peer closed the connection during the handshake")
        out = hs.receive(data)
        if out:
            writer.write(out)
    return hs.session()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class AuditingRelay:
    """Relay privval traffic from a CometBFT node to Nebula, auditing every signature.

    ``node_address`` is the node's ``priv_validator_laddr`` ("tcp://127.0.0.1:P");
    Nebula must dial :attr:`listen_address`. ``log`` receives one line per notable event
    (from the relay's thread). ``rng`` makes garbage bytes reproducible.
    """

    def __init__(
        self,
        node_address: str,
        auditor: Auditor,
        family: WireFamily,
        *,
        listen_port: int | None = None,
        attempt_timeout: float = 2.0,
        request_deadline: float = 4.5,
        rng: random.Random | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        scheme, _, rest = node_address.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or host != "127.0.0.1" or not port.isdigit():
            raise ValueError(f"node_address must be tcp://127.0.0.1:PORT, got {node_address!r}")
        self.node_host, self.node_port = host, int(port)
        self.listen_port = listen_port if listen_port is not None else free_port()
        self.auditor = auditor
        self.family = family
        self.attempt_timeout = attempt_timeout
        self.request_deadline = request_deadline
        self.rng = rng or random.Random()
        self._log = log
        self._node_seed = os.urandom(32)  # our identity toward the node (as the signer)
        self._nebula_seed = os.urandom(32)  # our identity toward Nebula (as the node)
        self._verify = signature_verifier(auditor.key_type, auditor.public_key)
        # Guarded by _lock (read from other threads):
        self._lock = threading.Lock()
        self.violations: list[str] = []
        self.requests: list[RequestRecord] = []
        self.faults: list[InjectedFault] = []
        self.refusals: list[str] = []
        self.extension_signatures = 0
        self.late_responses = 0  # audited after the node stopped waiting for them
        self.nebula_connections = 0
        self.node_connections = 0
        #: Set by :meth:`withhold_next_signature`; the request whose signature was kept
        #: from the node ("proposal h=5 r=0"), once one was.
        self.withheld: str | None = None
        self._withhold = False
        self._withhold_kinds: frozenset[str] = frozenset()
        self.withheld_event = threading.Event()
        # Loop side:
        self._armed: list[InjectedFault] = []
        self._conns: list[_NebulaConn] = []
        self._conn_changed: asyncio.Event | None = None
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._running = False

    # ---- public API (any thread) -------------------------------------------------------

    @property
    def listen_address(self) -> str:
        """Where Nebula must dial: ``tcp://127.0.0.1:<listen_port>``."""
        return f"tcp://127.0.0.1:{self.listen_port}"

    def start(self) -> AuditingRelay:
        self._thread = threading.Thread(
            target=self._run, name=f"relay-{self.listen_port}", daemon=True
        )
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> AuditingRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject_garbage(self, kind: str = "raw", position: str = "after") -> InjectedFault:
        """On the next vote/proposal request, write garbage to Nebula ``position`` it.

        ``kind`` is one of :data:`GARBAGE_KINDS`, ``position`` "before" or "after".
        """
        if kind not in GARBAGE_KINDS:
            raise ValueError(f"garbage kind must be one of {GARBAGE_KINDS}, got {kind!r}")
        if position not in ("before", "after"):
            raise ValueError(f"position must be 'before' or 'after', got {position!r}")
        return self._arm(InjectedFault("garbage", {"kind": kind, "position": position}, 0.0))

    def inject_disconnect(self, delay_s: float = 0.0) -> InjectedFault:
        """On the next vote/proposal request, close Nebula's connection ``delay_s`` after
        sending it, unless the response is already there."""
        if not delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        return self._arm(InjectedFault("disconnect", {"delay_ms": round(delay_s * 1000, 1)}, 0.0))

    def withhold_next_signature(
        self, kinds: tuple[str, ...] = ("prevote", "precommit", "proposal")
    ) -> threading.Event:
        """Keep the next signed vote/proposal from the node (it is audited, not forwarded).

        The node waits for an answer it never gets; a test then kills the node, which
        after its restart must ask again for that height, round and step (it signs
        before it writes its WAL), with a new timestamp or block.  The returned event is
        set once a signature was withheld (:attr:`withheld` names the request).
        ``kinds``: only a signature of one of these kinds is withheld (a v1.0 node builds
        the same proposal again, whose identical bytes get the identical signature; a
        vote gets a new timestamp)."""
        with self._lock:
            self.withheld = None
            self._withhold = True
            self._withhold_kinds = frozenset(kinds)
            self.withheld_event.clear()
        return self.withheld_event

    def requests_for(self, kind: str, height: int, round_: int) -> list[RequestRecord]:
        """Every request of ``kind`` ("prevote", "precommit", "proposal") for one height
        and round that the node sent, in arrival order."""
        with self._lock:
            return [
                r for r in self.requests if (r.kind, r.height, r.round) == (kind, height, round_)
            ]

    def snapshot(self) -> dict[str, Any]:
        """Counters so far (thread-safe)."""
        with self._lock:
            return {
                "signatures": self.auditor.count,
                "keys": len(self.auditor.seen),
                "violations": list(self.violations),
                "requests": len(self.requests),
                "refusals": len(self.refusals),
                "extension_signatures": self.extension_signatures,
                "late_responses": self.late_responses,
                "nebula_connections": self.nebula_connections,
                "node_connections": self.node_connections,
                "faults_fired": sum(f.fired_at is not None for f in self.faults),
                "faults_armed": len(self.faults),
            }

    def requests_between(self, t0: float, t1: float) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if t0 <= r.t <= t1]

    def signatures(self, chain_id: str, height: int, round_: int, step: int) -> set[bytes]:
        """Every signature the relay saw for one (chain, height, round, step)."""
        with self._lock:
            return set(self.auditor.seen.get((chain_id, height, round_, step), ()))

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.fired_at is None for f in self.faults)

    # ---- plumbing ----------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self._log is not None:
            self._log(f"relay: {msg}")

    def _violation(self, msg: str) -> None:
        with self._lock:
            self.violations.append(msg)
        self._say(f"VIOLATION: {msg}")

    def _arm(self, fault: InjectedFault) -> InjectedFault:
        fault.armed_at = time.monotonic()
        with self._lock:
            self.faults.append(fault)
        loop = self._loop
        if loop is None:
            raise RuntimeError("relay not started")
        loop.call_soon_threadsafe(self._armed.append, fault)
        return fault

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._startup())
        except BaseException as e:
            self._error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _startup(self) -> None:
        self._conn_changed = asyncio.Event()
        self._running = True
        self._server = await asyncio.start_server(
            self._on_nebula, "127.0.0.1", self.listen_port, reuse_address=True, limit=_CHUNK
        )
        self._tasks.append(asyncio.ensure_future(self._node_loop()))

    async def _shutdown(self) -> None:
        self._running = False
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.close("relay stopped")
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t

    # ---- Nebula side (we are the node) -------------------------------------------------

    async def _on_nebula(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            session = await asyncio.wait_for(_handshake(reader, writer, self._nebula_seed), 5)
        except (NebulaError, OSError, TimeoutError) as e:
            self._say(f"Nebula handshake failed: {e!r}")
            writer.transport.abort()
            return
        if not self._running:
            writer.transport.abort()
            return
        self._seq += 1
        conn = _NebulaConn(self._seq, reader, writer, session, log=self._say)
        for old in self._conns:  # the newest connection wins
            old.close(f"superseded by Nebula connection #{conn.seq}")
        self._conns = [conn]
        with self._lock:
            self.nebula_connections += 1
        self._say(f"Nebula connection #{conn.seq} up")
        conn.task = asyncio.ensure_future(self._pump(conn))
        assert self._conn_changed is not None
        self._conn_changed.set()

    async def _pump(self, conn: _NebulaConn) -> None:
        framer = proto.DelimitedReader(_MAX_RESPONSE)
        reason = "closed by Nebula"
        try:
            pending = framer.feed(conn.session.feed(b""))
            while True:
                for msg in pending:
                    self._on_response(conn, msg)
                data = await conn.reader.read(_CHUNK)
                if not data:
                    break
                pending = framer.feed(conn.session.feed(data))
        except (NebulaError, OSError) as e:
            reason = f"read failed: {e!r}"
        except asyncio.CancelledError:
            reason = "relay stopped"
        conn.close(reason)
        with contextlib.suppress(ValueError):
            self._conns.remove(conn)

    def _on_response(self, conn: _NebulaConn, msg: bytes) -> None:
        att = conn.in_flight
        if att is None:
            self._violation(f"Nebula connection #{conn.seq} sent a response nobody asked for")
            return
        conn.in_flight = None
        try:
            resp = proto.decode_response(msg, self.family)
        except DecodeError as e:
            self._violation(f"undecodable response from Nebula: {e}")
            if not att.future.done():
                att.future.set_exception(_ConnLost("undecodable response"))
            conn.close("undecodable response")
            return
        self._audit(att.req, resp)
        if att.future.done():
            with self._lock:
                self.late_responses += 1
        else:
            att.future.set_result(msg)

    def _audit(self, req: Request, resp: Response) -> None:
        name, h, r = _describe(req)
        with self._lock:
            try:
                if isinstance(req, SignVoteRequest):
                    self._audit_vote(req, resp)
                elif isinstance(req, SignProposalRequest):
                    self._audit_proposal(req, resp)
                elif isinstance(req, PubKeyRequest):
                    if not isinstance(resp, PubKeyResponse):
                        raise ConflictError(f"{type(resp).__name__} answers a PubKeyRequest")
                    if resp.error is None and (
                        resp.pub_key != self.auditor.public_key
                        or resp.key_type != self.auditor.key_type
                    ):
                        raise ConflictError(
                            f"wrong public key {resp.key_type}:{resp.pub_key.hex()}"
                        )
                elif isinstance(req, PingRequest) and not isinstance(resp, PingResponse):
                    raise ConflictError(f"{type(resp).__name__} answers a PingRequest")
            except ConflictError as e:
                self.violations.append(f"{name} h={h} r={r}: {e}")
                msg = f"VIOLATION: {name} h={h} r={r}: {e}"
            else:
                return
        self._say(msg)

    def _audit_vote(self, req: SignVoteRequest, resp: Response) -> None:
        if not isinstance(resp, SignedVoteResponse):
            raise ConflictError(f"{type(resp).__name__} answers a SignVoteRequest")
        if resp.error is not None:
            self.refusals.append(f"vote h={req.vote.height}: {resp.error.description}")
            return
        v, got = req.vote, resp.vote
        if (got.type, got.height, got.round, got.block_id) != (
            v.type,
            v.height,
            v.round,
            v.block_id,
        ):
            raise ConflictError(
                f"signed vote {got.type}/{got.height}/{got.round} does not match the request "
                f"{v.type}/{v.height}/{v.round}"
            )
        self.auditor.vote(req.chain_id, req, resp)
        if got.extension_signature:
            if not self._verify(
                proto.vote_extension_sign_bytes(req.chain_id, v), got.extension_signature
            ):
                raise ConflictError("vote extension signature does not verify")
            self.extension_signatures += 1

    def _audit_proposal(self, req: SignProposalRequest, resp: Response) -> None:
        if not isinstance(resp, SignedProposalResponse):
            raise ConflictError(f"{type(resp).__name__} answers a SignProposalRequest")
        if resp.error is not None:
            self.refusals.append(f"proposal h={req.proposal.height}: {resp.error.description}")
            return
        p, got = req.proposal, resp.proposal
        if (got.height, got.round, got.pol_round, got.block_id) != (
            p.height,
            p.round,
            p.pol_round,
            p.block_id,
        ):
            raise ConflictError("signed proposal does not match the request")
        self.auditor.proposal(req.chain_id, req, resp)

    async def _current(self, timeout: float) -> _NebulaConn | None:
        assert self._conn_changed is not None
        deadline = time.monotonic() + timeout
        while True:
            live = [c for c in self._conns if not c.closed]
            if live:
                return live[-1]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._conn_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._conn_changed.wait(), left)

    def _garbage(self, kind: str, session: Session) -> bytes:
        rng = self.rng
        if kind == "raw":
            return rng.randbytes(SEALED_FRAME_SIZE)
        if kind == "oversize":
            size = proto.MAX_REQUEST_SIZE + 1 + rng.randrange(1 << 20)
            return session.seal(proto.encode_uvarint(size) + rng.randbytes(16))
        while True:  # a framed message that Nebula cannot decode
            body = b"\x0f" + rng.randbytes(rng.randrange(8, 200))  # field 1, wire type 7
            try:
                proto.decode_request(body, self.family)
            except DecodeError:
                return session.seal(proto.encode_delimited(body))

    async def _forward(self, msg: bytes, req: Request) -> tuple[bytes | None, int]:
        """Nebula's response to ``msg`` (retrying on new connections), and the attempts."""
        start = time.monotonic()
        deadline = start + self.request_deadline
        attempts = 0
        fault: InjectedFault | None = None
        if self._armed and isinstance(req, SignVoteRequest | SignProposalRequest):
            fault = self._armed.pop(0)
        while True:
            conn = await self._current(deadline - time.monotonic())
            if conn is None:
                break
            attempts += 1
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            firing = fault if fault is not None and fault.fired_at is None else None
            if firing is not None:
                name, h, r = _describe(req)
                with self._lock:
                    firing.fired_at = time.monotonic()
                    firing.request = f"{name} h={h} r={r} on connection #{conn.seq}"
            kind = firing.kind if firing is not None else ""
            params = firing.params if firing is not None else {}
            if kind == "garbage" and params["position"] == "before":
                # Sealed garbage takes a nonce: seal it before the request.
                conn.writer.write(self._garbage(params["kind"], conn.session))
            conn.in_flight = _Attempt(req, fut)
            conn.writer.write(conn.session.seal(proto.encode_delimited(msg)))
            if kind == "garbage" and params["position"] == "after":
                await asyncio.sleep(self.rng.uniform(0, 0.004))
                if not conn.closed:
                    conn.writer.write(self._garbage(params["kind"], conn.session))
            elif kind == "disconnect" and firing is not None:
                await asyncio.sleep(params["delay_ms"] / 1000)
                outcome = "the response arrived first; " if fut.done() else "cut mid-request; "
                conn.close("fault: disconnect mid-request")
                firing.outcome = outcome
            if firing is not None:
                self._say(f"injected {kind} {params} on {firing.request}")
            left = deadline - time.monotonic()
            try:
                resp = await asyncio.wait_for(fut, max(0.0, min(self.attempt_timeout, left)))
            except TimeoutError:
                conn.close(f"no response within {self.attempt_timeout}s")
                continue
            except _ConnLost:
                continue
            if fault is not None:
                fault.outcome += (
                    f"answered after {attempts} attempt(s) in "
                    f"{(time.monotonic() - start) * 1000:.0f} ms"
                )
            return resp, attempts
        if fault is not None:
            fault.outcome += f"NOT answered within {self.request_deadline}s"
        return None, attempts

    # ---- node side (we are the signer) -------------------------------------------------

    async def _node_loop(self) -> None:
        while self._running:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.node_host, self.node_port, limit=_CHUNK), 2
                )
                _nodelay(writer)
                # The node handshakes only when it accepts, i.e. when it needs a signer.
                session = await asyncio.wait_for(_handshake(reader, writer, self._node_seed), 60)
                with self._lock:
                    self.node_connections += 1
                self._say("connected to the node")
                await self._serve_node(reader, writer, session)
            except (OSError, TimeoutError):
                pass
            except NebulaError as e:
                self._say(f"node connection dropped: {e}")
            finally:
                if writer is not None:
                    writer.transport.abort()
            await asyncio.sleep(0.1)

    async def _serve_node(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session
    ) -> None:
        framer = proto.DelimitedReader(proto.MAX_REQUEST_SIZE)
        pending = framer.feed(session.feed(b""))
        while True:
            for msg in pending:
                req = proto.decode_request(msg, self.family)
                t0 = time.monotonic()
                resp, attempts = await self._forward(msg, req)
                name, h, r = _describe(req)
                if resp is None:
                    outcome, latency = "unanswered", None
                else:
                    latency = time.monotonic() - t0
                    decoded = proto.decode_response(resp, self.family)
                    err = getattr(decoded, "error", None)
                    outcome = (
                        f"refused: {err.description}"
                        if err is not None
                        else ("signed" if h is not None else "ok")
                    )
                    with self._lock:
                        withhold = (
                            self._withhold and outcome == "signed" and name in self._withhold_kinds
                        )
                        if withhold:
                            self._withhold = False
                            self.withheld = f"{name} h={h} r={r}"
                    if withhold:
                        outcome = "signed, withheld from the node"
                        self._say(f"withheld the signature of {name} h={h} r={r}")
                        self.withheld_event.set()
                    else:
                        writer.write(session.seal(proto.encode_delimited(resp)))
                with self._lock:
                    self.requests.append(RequestRecord(t0, name, h, r, latency, attempts, outcome))
                if resp is None:
                    self._say(f"{name} h={h} r={r} not answered within {self.request_deadline}s")
            data = await reader.read(_CHUNK)
            if not data:
                raise ProtocolError("the node closed the connection")
            pending = framer.feed(session.feed(data))


def withhold_then_restart(
    relay: AuditingRelay,
    chain: Any,
    cluster: Any = None,
    kinds: tuple[str, ...] = ("prevote", "precommit", "proposal"),
) -> bool:
    """Keep the next signature of ``kinds`` from ``chain``'s node, kill the node (and, with
    a ``cluster``, the Nebula leader with it), start them again and wait two heights past
    the withheld one.  The restarted node asks again for that step with a new timestamp
    or block: a second, different signature there is a double sign the relay's auditor
    records.  True when the node did ask again (else the round proved nothing)."""
    got = relay.withhold_next_signature(kinds)
    assert got.wait(30), "no signature to withhold"
    leader = cluster.wait_leader_sync() if cluster is not None else None
    chain.kill()
    if leader is not None:
        cluster.nodes[leader].kill()
    assert relay.withheld is not None
    kind, hh, rr = relay.withheld.split()
    h, r = int(hh[2:]), int(rr[2:])
    if leader is not None:
        cluster.nodes[leader].start()
    chain.start()
    chain.wait_for_rpc(timeout=30)
    chain.wait_for_height(h + 2, timeout=60)
    if leader is not None:
        cluster.wait_caught_up(leader)
    return len(relay.requests_for(kind, h, r)) >= 2


def withhold_rounds(
    relay: AuditingRelay,
    chain: Any,
    rounds: Sequence[tuple[str, ...]],
    cluster: Any = None,
) -> tuple[list[bool], list[str]]:
    """One :func:`withhold_then_restart` per entry of ``rounds`` (the kinds to withhold),
    each two heights after the chain's height at its start: (whether the node asked
    again, the withheld request) per round."""
    asked_twice: list[bool] = []
    withheld: list[str] = []
    for kinds in rounds:
        chain.wait_for_height(chain.latest_height() + 2, timeout=30)
        asked_twice.append(withhold_then_restart(relay, chain, cluster, kinds))
        withheld.append(str(relay.withheld))
    return asked_twice, withheld
