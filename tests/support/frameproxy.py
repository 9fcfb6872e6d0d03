"""A TCP proxy that understands the Raft transport's framing, for the stale-frame attack.

``FrameProxy(listen_port, target_port)`` sits on one directed link ``A -> B`` (A dials
B's Raft port through it).  It knows the transport's wire format (version 1,
``nebula/raft/transport.py``) only as far as the bytes go, never the keys:

    dialer -> listener   hello, fixed size (53 B), then frames ``len u32 | sealed``
    listener -> dialer   nonce (32 B), then nothing

so it can forward frame by frame and do what an attacker on the network between two
members can do (issue 11)::

    px = FrameProxy(listen_port, target_port).start()
    held = px.hold_next(min_len=300)   # arm: the next frame of >= 300 B is held, not sent
    held.wait(5)                       # ... a frame was caught; the connection is frozen
    px.close_dialer_side(held.conn)    # A sees its connection closed; B's side stays open
    ...                                # A reconnects (a new connection) and goes on
    px.release(held)                   # the stale frame, written to B on the OLD connection

After a frame is held, nothing more is forwarded on that connection (a later frame would
fail B's nonce counter and close the connection, which is not the attack).  It also
offers the plain proxy's ``cut`` / ``blackhole`` / ``heal`` (same meaning as
:class:`tests.support.proxy.Proxy`), so a :class:`tests.support.raftnode.Cluster` can use
it on every link.

The module also has a blocking raw client of the same wire format (:func:`raw_exchange`,
:func:`hello_bytes`, :func:`sealed_frame`) for attacks on a Raft port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from nebula.raft.transport import AUTH_PLAINTEXT, HELLO_LEN, MAGIC, derive_key
from tests.support.proxy import BLACKHOLE, DROP, PASS, ThreadedServer

NONCE_LEN = 32
_LEN = struct.Struct(">I")


@dataclass(eq=False)
class ProxiedConnection:
    """One dialer connection through the proxy and its upstream connection to the target."""

    number: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    frames_forwarded: int = 0
    frozen: bool = False  # a frame was held: nothing more is forwarded
    tainted: bool = False  # blackholed / cut: swallowed
    dialer_closed: bool = False  # closed by the test (close_dialer_side)
    upstream_closed: threading.Event = field(default_factory=threading.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()
        for t in self.tasks:
            t.cancel()


@dataclass(eq=False)
class HeldFrame:
    """A frame taken off a connection (set once caught)."""

    min_len: int
    caught: threading.Event = field(default_factory=threading.Event)
    conn: ProxiedConnection | None = None
    frame: bytes = b""
    index: int = -1  # the frame's number on its connection (0 = the authenticator)

    def wait(self, timeout: float) -> bool:
        return self.caught.wait(timeout)


@dataclass
class Release:
    """What happened when a held frame was written to the target on its old connection."""

    upstream_was_closed: bool  # the target had already closed that connection
    written: bool  # the bytes went into the socket without an error
    closed_after: bool  # the target closed the connection within the wait


class FrameProxy(ThreadedServer):
    thread_name = "frameproxy"

    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        super().__init__(listen_port, target_port, host)
        self._mode = PASS
        self._conns: list[ProxiedConnection] = []
        self._hold: HeldFrame | None = None

    # -- public API (any thread) -------------------------------------------------------

    @property
    def connections(self) -> list[ProxiedConnection]:
        return list(self._conns)

    def cut(self) -> None:
        """Close every connection (both sides) and reset new ones."""
        self._call(self._set_mode, DROP)

    def blackhole(self) -> None:
        """Accept, forward nothing, swallow what arrives."""
        self._call(self._set_mode, BLACKHOLE)

    def heal(self) -> None:
        """Forward again (blackholed connections are closed)."""
        self._call(self._set_mode, PASS)

    def hold_next(self, min_len: int = 0) -> HeldFrame:
        """Arm: the next frame (after the authenticator) whose length field is at least
        ``min_len`` is held instead of forwarded, and its connection frozen."""
        held = HeldFrame(min_len)

        def arm() -> None:
            self._hold = held

        self._call(arm)
        return held

    def close_dialer_side(self, conn: ProxiedConnection) -> None:
        """Close the dialer's side of ``conn`` only; the target's side stays open."""

        def close() -> None:
            conn.dialer_closed = True
            conn.client.transport.abort()

        self._call(close)

    def release(self, held: HeldFrame, wait: float = 0.5) -> Release:
        """Write the held frame to the target on its old connection."""
        conn = held.conn
        if conn is None or not held.frame:
            raise RuntimeError("no frame was held")
        was_closed = conn.upstream_closed.is_set()

        async def write() -> bool:
            up = conn.upstream
            if up is None or up.transport.is_closing():
                return False
            try:
                up.write(held.frame)
                await up.drain()
            except (OSError, RuntimeError):
                return False
            return True

        loop = self._loop
        if loop is None:
            raise RuntimeError("proxy not started")
        written = asyncio.run_coroutine_threadsafe(write(), loop).result(5)
        closed_after = conn.upstream_closed.wait(wait)
        return Release(was_closed, written, closed_after)

    # -- loop side ---------------------------------------------------------------------

    def _set_mode(self, mode: str) -> None:
        self._mode = mode
        if mode == DROP:
            for c in self._conns:
                if not c.dialer_closed:  # a half-closed connection is the test's business
                    c.abort()
            self._conns = [c for c in self._conns if c.dialer_closed]
        elif mode == BLACKHOLE:
            for c in self._conns:
                c.tainted = True
        elif mode == PASS:
            for c in [c for c in self._conns if c.tainted and not c.dialer_closed]:
                c.abort()
                self._conns.remove(c)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == DROP:
            self._reset(writer)
            return
        conn = ProxiedConnection(self.accepted, writer)
        self._conns.append(conn)
        if self._mode == BLACKHOLE:
            conn.tainted = True
            conn.tasks.append(asyncio.ensure_future(self._swallow(conn, reader)))
            return
        try:
            ur, uw = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            self._conns.remove(conn)
            self._reset(writer)
            return
        if conn not in self._conns:  # cut while connecting
            uw.transport.abort()
            return
        conn.upstream = uw
        conn.tasks.append(asyncio.ensure_future(self._downstream(conn, ur)))
        conn.tasks.append(asyncio.ensure_future(self._upstream(conn, reader, uw)))

    async def _swallow(self, conn: ProxiedConnection, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while await reader.read(65536):
                pass

    def _passing(self, conn: ProxiedConnection) -> bool:
        if conn.tainted or self._mode != PASS:
            conn.tainted = True
            return False
        return True

    async def _downstream(self, conn: ProxiedConnection, ur: asyncio.StreamReader) -> None:
        """target -> dialer, raw (the nonce; the listener sends nothing after it)."""
        try:
            while True:
                data = await ur.read(65536)
                if not data:
                    break
                if conn.dialer_closed or not self._passing(conn):
                    continue
                conn.client.write(data)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            conn.upstream_closed.set()
            if not conn.dialer_closed:
                conn.abort()
                with contextlib.suppress(ValueError):
                    self._conns.remove(conn)

    async def _upstream(
        self, conn: ProxiedConnection, reader: asyncio.StreamReader, uw: asyncio.StreamWriter
    ) -> None:
        """dialer -> target, frame by frame."""
        try:
            hello = await reader.readexactly(HELLO_LEN)
            if self._passing(conn):
                uw.write(hello)
            index = 0
            while True:
                head = await reader.readexactly(4)
                (n,) = _LEN.unpack(head)
                body = await reader.readexactly(n)
                frame = head + body
                hold = self._hold
                if conn.frozen or not self._passing(conn):
                    continue
                if hold is not None and index > 0 and n >= hold.min_len:
                    self._hold = None
                    hold.conn, hold.frame, hold.index = conn, frame, index
                    conn.frozen = True
                    hold.caught.set()
                    continue
                uw.write(frame)
                await uw.drain()
                conn.frames_forwarded += 1
                index += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            if not conn.dialer_closed and not conn.frozen:
                conn.abort()
                with contextlib.suppress(ValueError):
                    self._conns.remove(conn)


# ---- a blocking raw client of the wire format ------------------------------------------


def hello_bytes(from_id: int, to_id: int, nonce_c: bytes, version: int = 1) -> bytes:
    return MAGIC + bytes([version]) + struct.pack(">QQ", from_id, to_id) + nonce_c


def sealed_frame(aead: ChaCha20Poly1305, counter: int, plaintext: bytes) -> bytes:
    sealed = aead.encrypt(counter.to_bytes(12, "little"), plaintext, None)
    return _LEN.pack(len(sealed)) + sealed


@dataclass
class Exchange:
    """What a Raft port did with one connection of :func:`raw_exchange`."""

    nonce: bytes  # what the listener answered the hello with (b"" if nothing)
    received: bytes  # everything it sent
    closed: bool  # it closed the connection within the timeout
    seconds: float  # how long until it closed (or the timeout)


def raw_exchange(
    port: int,
    *,
    hello: bytes | None = None,
    secret: bytes | None = None,
    ids: tuple[int, int] = (0, 0),
    then: list[Any] = (),  # type: ignore[assignment]
    timeout: float = 5.0,
) -> Exchange:
    """Connect to a Raft port, send ``hello`` (raw bytes, or None for none), wait for the
    nonce if a hello went out, then send each item of ``then``: raw ``bytes``, or
    ``("auth",)`` for the authenticator sealed under ``secret`` (as ``ids`` =
    (from, to)), or ``("frame", plaintext)`` for a sealed frame with the next counter.
    Reads until the listener closes or ``timeout`` passes."""
    t0 = time.monotonic()
    received = bytearray()
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        nonce_c = os.urandom(NONCE_LEN)
        aead: ChaCha20Poly1305 | None = None
        counter = 0
        try:
            if hello is not None:
                s.sendall(hello)
                if len(hello) == HELLO_LEN and hello.startswith(MAGIC):
                    nonce_c = hello[-NONCE_LEN:]
                    s.settimeout(timeout)
                    while len(received) < NONCE_LEN:
                        chunk = s.recv(NONCE_LEN - len(received))
                        if not chunk:
                            closed = True
                            break
                        received += chunk
                    if len(received) == NONCE_LEN and secret is not None:
                        key = derive_key(secret, nonce_c, bytes(received), ids[0], ids[1])
                        aead = ChaCha20Poly1305(key)
            for item in then if not closed else ():
                if isinstance(item, bytes | bytearray):
                    s.sendall(item)
                elif item[0] == "auth":
                    assert aead is not None, "no key: the hello was not answered"
                    s.sendall(sealed_frame(aead, counter, AUTH_PLAINTEXT))
                    counter += 1
                elif item[0] == "frame":
                    assert aead is not None, "no key: the hello was not answered"
                    s.sendall(sealed_frame(aead, counter, item[1]))
                    counter += 1
                else:
                    raise ValueError(f"unknown step {item!r}")
            s.settimeout(max(0.01, timeout - (time.monotonic() - t0)))
            while not closed:
                chunk = s.recv(4096)
                if not chunk:
                    closed = True
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        except TimeoutError:
            pass
    nonce = bytes(received[:NONCE_LEN]) if hello is not None else b""
    return Exchange(nonce, bytes(received), closed, time.monotonic() - t0)
