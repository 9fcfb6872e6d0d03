"""The validator's side of the privval connection, in Python.

CometBFT listens on ``priv_validator_laddr`` and the signer dials in; this module
does what the node does: listen (TCP with SecretConnection, or Unix), accept one
signer at a time, send requests and read responses, one in flight.  The test
suite, the fault-injection harness and ``nebula bench`` use it to drive Nebula
without a chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from nebula import proto
from nebula.aio.session import PlainSession, secret_handshake
from nebula.errors import ProtocolError
from nebula.types import Request, Response, WireFamily

_CHUNK = 1 << 16


class SignerConnection:
    """One accepted signer connection: send a request, get its response."""

    def __init__(self, reader, writer, session, family: WireFamily, max_size: int) -> None:
        self.reader = reader
        self.writer = writer
        self.session = session
        self.family = family
        self.framer = proto.DelimitedReader(max_size)
        self.pending: list[bytes] = []
        self.last_rtt = 0.0

    async def request(self, req: Request, timeout: float = 5.0) -> Response:
        return await asyncio.wait_for(self._request(req), timeout)

    async def _request(self, req: Request) -> Response:
        raw = self.session.seal(proto.encode_delimited(proto.encode_request(req, self.family)))
        t0 = time.perf_counter()
        self.writer.write(raw)
        msg = await self._read_message()
        self.last_rtt = time.perf_counter() - t0
        return proto.decode_response(msg, self.family)

    async def send_raw(self, data: bytes) -> None:
        """Send arbitrary (already framed) bytes through the session — for bad-input tests."""
        self.writer.write(self.session.seal(data))
        await self.writer.drain()

    async def _read_message(self) -> bytes:
        while not self.pending:
            data = await self.reader.read(_CHUNK)
            if not data:
                raise ProtocolError("signer closed the connection")
            self.pending.extend(self.framer.feed(self.session.feed(data)))
        return self.pending.pop(0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    @property
    def closed(self) -> bool:
        return self.writer.transport.is_closing()


class PrivvalListener:
    """Listen like a CometBFT node's privval listener and hand out signer connections."""

    def __init__(
        self,
        address: str,
        family: WireFamily,
        *,
        identity_seed: bytes | None = None,
        max_size: int = 10240,
        handshake_timeout: float = 5.0,
    ) -> None:
        self.address = address
        self.family = family
        self.identity_seed = identity_seed or os.urandom(32)
        self.max_size = max_size
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None
        self._conns: asyncio.Queue[SignerConnection] = asyncio.Queue()
        self.all_connections: list[SignerConnection] = []

    async def start(self) -> None:
        scheme, _, rest = self.address.partition("://")
        if scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rest)
            self._server = await asyncio.start_unix_server(self._on_conn, rest, limit=_CHUNK)
        else:
            host, _, port = rest.rpartition(":")
            self._server = await asyncio.start_server(
                self._on_conn, host, int(port), limit=_CHUNK, reuse_address=True
            )

    async def _on_conn(self, reader, writer) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.address.startswith("unix://"):
                session = PlainSession()
            else:
                session = await asyncio.wait_for(
                    self._handshake(reader, writer), self.handshake_timeout
                )
        except Exception:
            writer.transport.abort()
            return
        conn = SignerConnection(reader, writer, session, self.family, self.max_size)
        self.all_connections.append(conn)
        await self._conns.put(conn)

    async def _handshake(self, reader, writer):
        return await secret_handshake(reader, writer, self.identity_seed, "signer")

    async def accept(self, timeout: float = 10.0) -> SignerConnection:
        """The next signer connection (waits for one)."""
        return await asyncio.wait_for(self._conns.get(), timeout)

    async def close(self) -> None:
        for c in self.all_connections:
            c.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
