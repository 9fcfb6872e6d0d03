"""A blocking validator-side privval client for measuring round trips.

CometBFT listens on ``priv_validator_laddr`` and the signer dials in; so does this
listener.  It is deliberately synchronous (a blocking socket, no event loop): the time
between ``sendall`` and the arrival of the whole response is then only the signer,
the kernel's loopback and our own frame opening, not an event loop's scheduling.  The
asyncio twin used by the tests is :mod:`nebula.aio.validator_side`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

from nebula import proto
from nebula.aio.session import PlainSession
from nebula.crypto.secretconn import Handshake
from nebula.errors import ConfigError, ProtocolError
from nebula.types import Request, Response, WireFamily

_CHUNK = 1 << 16

__all__ = ["BlockingListener", "ValidatorConnection"]


class ValidatorConnection:
    """One accepted signer connection; one request in flight, as CometBFT does."""

    def __init__(
        self,
        sock: socket.socket,
        session: object,
        family: WireFamily,
        *,
        handshake_seconds: float = 0.0,
        max_size: int = proto.MAX_RESPONSE_SIZE,
    ) -> None:
        self.sock = sock
        self.session = session
        self.family = family
        self.handshake_seconds = handshake_seconds
        self._framer = proto.DelimitedReader(max_size)
        self._pending: list[bytes] = []

    def roundtrip(self, framed: bytes) -> tuple[bytes, float]:
        """Send one length-delimited request; return (response message, seconds).

        The clock starts right before the sealed bytes are handed to the kernel and
        stops when the whole response has arrived and been opened and unframed.
        """
        sealed = self.session.seal(framed)  # type: ignore[attr-defined]
        sock, feed, framer = self.sock, self.session.feed, self._framer  # type: ignore[attr-defined]
        pending = self._pending
        perf = time.perf_counter
        t0 = perf()
        sock.sendall(sealed)
        while not pending:
            data = sock.recv(_CHUNK)
            if not data:
                raise ProtocolError("the signer closed the connection")
            pending.extend(framer.feed(feed(data)))
        t1 = perf()
        return pending.pop(0), t1 - t0

    # ---- for a driver that multiplexes several connections (one request in flight
    # on each): send, then read when the socket is readable --------------------------

    def send(self, framed: bytes) -> float:
        """Seal and send one length-delimited request; return the send time
        (``time.perf_counter``, taken right before the bytes go to the kernel)."""
        sealed = self.session.seal(framed)  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        self.sock.sendall(sealed)
        return t0

    def read_available(self) -> bytes | None:
        """One ``recv`` (call it when the socket is readable): the response once it is
        complete, else None."""
        pending = self._pending
        if not pending:
            data = self.sock.recv(_CHUNK)
            if not data:
                raise ProtocolError("the signer closed the connection")
            pending.extend(self._framer.feed(self.session.feed(data)))  # type: ignore[attr-defined]
            if not pending:
                return None
        return pending.pop(0)

    def request(self, req: Request) -> Response:
        msg, _ = self.roundtrip(proto.encode_delimited(proto.encode_request(req, self.family)))
        return proto.decode_response(msg, self.family)

    def set_timeout(self, seconds: float | None) -> None:
        """Fail a send or receive that blocks longer than ``seconds`` (None: never).

        The socket stays in blocking mode with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO):
        Python's own ``settimeout`` would poll() before every recv, one more syscall
        inside the timed window.  A timeout surfaces as an OSError (EAGAIN).
        """
        self.sock.settimeout(None)
        secs = 0.0 if seconds is None else max(seconds, 1e-6)
        tv = struct.pack("ll", int(secs), int((secs - int(secs)) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class BlockingListener:
    """Listen like a CometBFT node's privval listener (TCP + SecretConnection, or unix)."""

    def __init__(
        self,
        address: str,
        family: WireFamily,
        *,
        identity_seed: bytes | None = None,
        handshake_timeout: float = 5.0,
    ) -> None:
        scheme, sep, rest = address.partition("://")
        if not sep or scheme not in ("tcp", "unix") or not rest:
            raise ConfigError(
                f"listen address must be tcp://host:port or unix:///path, got {address!r}"
            )
        self.address = address
        self.scheme = scheme
        self.family = family
        self.identity_seed = identity_seed or os.urandom(32)
        self.handshake_timeout = handshake_timeout
        self._sock: socket.socket | None = None
        self._path = rest if scheme == "unix" else ""
        if scheme == "tcp":
            host, _, port = rest.rpartition(":")
            try:
                self._hostport = (host.strip("[]"), int(port))
            except ValueError:
                raise ConfigError(f"bad port in listen address {address!r}") from None

    def start(self) -> None:
        if self.scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self._path)
        else:
            fam = socket.AF_INET6 if ":" in self._hostport[0] else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(self._hostport)
        s.listen(8)
        self._sock = s

    def accept(self, timeout: float = 30.0) -> ValidatorConnection:
        """Wait for the signer to dial in and complete the handshake."""
        if self._sock is None:
            raise ConfigError("listener not started")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no signer connected to {self.address} within {timeout:.0f}s")
            self._sock.settimeout(left)
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            try:
                return self._setup(conn)
            except (OSError, ProtocolError):
                # A half-open dial (e.g. a node that lost leadership); wait for the next.
                with contextlib.suppress(OSError):
                    conn.close()

    def _setup(self, conn: socket.socket) -> ValidatorConnection:
        conn.settimeout(self.handshake_timeout)
        if self.scheme == "unix":
            conn.settimeout(None)
            return ValidatorConnection(conn, PlainSession(), self.family)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        hs = Handshake(self.identity_seed)
        conn.sendall(hs.initial_bytes())
        while not hs.done:
            data = conn.recv(_CHUNK)
            if not data:
                raise ProtocolError("the signer closed the connection during the handshake")
            out = hs.receive(data)
            if out:
                conn.sendall(out)
        session = hs.session()
        elapsed = time.perf_counter() - t0
        conn.settimeout(None)
        return ValidatorConnection(conn, session, self.family, handshake_seconds=elapsed)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self.scheme == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self._path)
