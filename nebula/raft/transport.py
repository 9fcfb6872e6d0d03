"""The Raft transport: authenticated, encrypted frames between cluster members.

It moves opaque payloads (raft-rs ``Message`` protobuf bytes) from one member to another
and knows nothing of Raft.  Everything runs on the event loop thread (uvloop in the
daemon, plain asyncio works too); ``send()`` and ``on_message`` are loop-thread only.
Why it looks like this: design.md §4 and issue 11 (a stale frame delivered on a
superseded connection caused a double sign; 1,000 idle unauthenticated connections
exhausted descriptors and pysyncobj's listener unbound for good on ``EMFILE``).

Connections
-----------
Each member dials every peer and uses that *outbound* connection only to send to it; it
accepts *inbound* connections only to receive.  A pair of members therefore holds two TCP
connections, one per direction, each written by one side only (``TCP_NODELAY``, TCP
keepalive, ``TCP_USER_TIMEOUT`` so a vanished peer is noticed in seconds).

* Outbound: dialled lazily (first ``send()`` to the peer, ``wait_connected()``, or an
  authenticated inbound connection from it), then kept up: on any failure it is dialled
  again after ``retry_interval``, doubling up to ``max_retry_interval`` (with jitter); a
  connection that stayed up for at least ``max_retry_interval`` starts over from
  ``retry_interval``; an authenticated inbound connection from the peer (it restarted)
  ends a pending wait at once.  There is no queue of its own: ``send()`` seals and writes
  at once; while the peer is not connected, or the transport's write buffer (what the
  kernel did not take yet) is above ``max_queue_bytes`` (its high-water mark), the
  payload is dropped and ``send()`` returns False.  Raft retransmits; memory stays
  bounded.
* Inbound: one *live* authenticated connection per peer.  When a newer connection from
  peer X authenticates, the older one is aborted and its generation is retired: each
  frame is checked against the peer's current generation right before delivery, so
  nothing read from a superseded connection (even already in the buffer of the same
  read) reaches ``on_message``.  This is the defence against the stale-frame attack.
* Unauthenticated inbound connections are capped at ``max_unauthenticated``: a connection
  accepted beyond the cap closes the *oldest* unauthenticated one at once, so idle
  connections held by someone without the secret cannot lock a real peer out (a real
  handshake completes in one round trip).  The oldest from an address that is no
  configured peer's host goes first: a steady flood faster than ``max_unauthenticated``
  per round trip would otherwise close every real handshake before its authenticator
  arrived (a peer far away, found in review).  Each must complete the handshake within
  ``handshake_timeout`` or is closed.
* The listener never stops: a non-blocking listening socket with ``loop.add_reader`` and
  our own ``accept()`` loop.  On ``EMFILE``/``ENFILE``/``ENOBUFS``/``ENOMEM`` it closes the
  oldest unauthenticated connection (if any) and pauses accepting for 75 ms, then
  resumes; other ``accept()`` errors lose that one connection.  The listening socket is
  closed only by ``close()``.
* A misbehaving peer only ever loses its own connection: receiving never raises into
  the loop (an exception from ``on_message`` is logged and the connection kept).

Wire format, version 1 (integers big-endian unless said otherwise)
------------------------------------------------------------------
::

    dialer -> listener   hello (53 B):  b"NBRT" | version u8 (=1) | from_id u64 | to_id u64 | nonce_c 32 B
    listener -> dialer   nonce_s 32 B   (or, for an unsupported version: b"NBRT" | highest
                                         version the listener speaks u8, then close)
    K = HKDF-SHA256(ikm = cluster secret, salt = nonce_c || nonce_s,
                    info = b"nebula raft transport v1" || from_id u64 || to_id u64, length 32)
    dialer -> listener   frames:        len u32 | ChaCha20-Poly1305(K, nonce, ad = b"", kind u8 | body)

* ``len`` is the length of the sealed part (ciphertext + 16-byte tag), 17..``max_frame``.
* ``nonce`` is the frame's index on this connection, 0, 1, 2, ... as a 96-bit
  little-endian integer.  It is implicit (not on the wire): the receiver opens frame i
  with nonce i, so a dropped, replayed, reordered or tampered frame fails its tag and the
  connection is closed.  K is fresh per connection (``nonce_s``), so a recorded
  connection replayed later fails at its first frame.
* Frame 0 is the authenticator: kind 0, body ``b"nebula raft transport v1
  authenticator"`` (fixed size).  Opening it proves the dialer holds the cluster secret;
  only then is the connection authenticated and made the peer's live inbound connection.
* Then kind 1: one payload (the body); kind 2: several payloads, each ``len u32 | bytes``
  (``send_many``).  Any other kind is a protocol error.
* The listener checks magic, version, ``to_id`` == itself and that ``from_id`` is a current
  peer before it answers; before authentication it accepts exactly the hello and then a
  frame of exactly the authenticator's size - anything else (extra bytes, another length)
  closes the connection before it is buffered.  After the nonce the listener never
  writes again and the dialer never reads: data from the listener closes the connection.

Compatibility rule (rolling upgrades)
-------------------------------------
The hello's version byte fixes the format of the whole connection (KDF info, frame
kinds, bodies).  A listener accepts every version it supports and answers any other with
``b"NBRT" | its highest version`` and a close, so a dialer learns what to fall back to.
A release that introduces version 2 must keep accepting version 1 and keep dialling
version 1 until the peer accepts 2 (dial 2, fall back on a reject naming 1), so a
cluster is upgraded one member at a time.  New frame kinds need a new version.  This
release speaks version 1 only.  The payloads are the Raft layer's (protobuf) business.

Security notes
--------------
The listener authenticates the dialer (the authenticator); the dialer does not
authenticate the listener, and needs not: everything it sends is sealed under K, which
takes the secret to derive, so an impostor listener learns nothing and can only drop
frames, as any network can.  The key is the *cluster* secret: every member can claim any
member id (``from_id``); per-member keys would be a new version.  Ids and both nonces
are bound into K, so a frame cannot be moved to another connection or direction.

Limits
------
``max_frame`` bounds a sealed frame after authentication (a larger payload is dropped
by ``send()``: ``False``); before it only the 53-byte hello and the fixed authenticator
are accepted.  Counters, in ``stats()`` and ``listener_stats()``, are for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nebula.errors import (
    AuthenticationError,
    ConfigError,
    FrameError,
    HandshakeError,
    ProtocolError,
    StateError,
)

__all__ = [
    "AUTH_PLAINTEXT",
    "HELLO_LEN",
    "KDF_INFO",
    "KIND_AUTH",
    "KIND_BATCH",
    "KIND_MSG",
    "MAGIC",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "Transport",
    "derive_key",
]

log = logging.getLogger("nebula.raft.transport")

MAGIC = b"NBRT"
VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
NONCE_LEN = 32
TAG_LEN = 16
_HELLO = struct.Struct(">4sBQQ32s")
HELLO_LEN = _HELLO.size  # 53
KDF_INFO = b"nebula raft transport v1"
KIND_AUTH = 0
KIND_MSG = 1
KIND_BATCH = 2
AUTH_PLAINTEXT = bytes([KIND_AUTH]) + b"nebula raft transport v1 authenticator"
_AUTH_SEALED = len(AUTH_PLAINTEXT) + TAG_LEN
_MIN_SEALED = 1 + TAG_LEN
_LEN = struct.Struct(">I")
_IDS = struct.Struct(">QQ")
_MAX_ID = (1 << 64) - 1
_MIN_SECRET = 16

_ACCEPT_PAUSE = 0.075  # seconds without accept() after EMFILE & co.
_ACCEPT_BATCH = 32  # accept() calls per readiness callback, so reads interleave
_ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LOG_INTERVAL = 5.0  # seconds between two log lines of one kind (the rest are counted)

# Connection states of an inbound connection.
_HELLO_WAIT, _AUTH_WAIT, _OPEN, _CLOSED = 0, 1, 2, 3


def derive_key(secret: bytes, nonce_c: bytes, nonce_s: bytes, from_id: int, to_id: int) -> bytes:
    """The per-connection key K of wire version 1 (see the module docstring)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=nonce_c + nonce_s,
        info=KDF_INFO + _IDS.pack(from_id, to_id),
    ).derive(secret)


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "little")


def _parse_addr(text: str, where: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected 'host:port', got {text!r}")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError(f"{where}: expected 'host:port', got {text!r}")
    if not (port.isascii() and port.isdigit()):
        raise ConfigError(f"{where}: invalid port in {text!r}")
    n = int(port)
    if not (0 if allow_port_zero else 1) <= n <= 65535:
        raise ConfigError(f"{where}: port out of range in {text!r}")
    return host, n


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)


def _tune(sock: Any, *, nodelay: bool = True, keepalive: bool = True) -> None:
    """TCP_NODELAY, keepalive and a user timeout; best effort (any error is ignored)."""
    if sock is None:
        return
    opts: list[tuple[int, int, int]] = []
    if nodelay:
        opts.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
    if keepalive:
        opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        for name, value in (
            ("TCP_KEEPIDLE", 5),
            ("TCP_KEEPINTVL", 2),
            ("TCP_KEEPCNT", 3),
            ("TCP_USER_TIMEOUT", 10_000),
        ):
            if hasattr(socket, name):
                opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, name, value in opts:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(level, name, value)


class _Throttle:
    """At most one log line per key per interval; the suppressed ones are counted."""

    __slots__ = ("_interval", "_last", "_suppressed")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def __call__(self, key: object) -> str | None:
        """None: stay silent; else a suffix naming how many lines were suppressed."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        return f" ({n} similar suppressed)" if n else ""


class _Peer:
    __slots__ = (
        "addr",
        "attempt",
        "backoff",
        "connects",
        "dial_task",
        "drops",
        "frames_in",
        "frames_out",
        "host",
        "id",
        "in_gen",
        "inbound",
        "inbound_connects",
        "last_heard",
        "msgs_in",
        "msgs_out",
        "out",
        "port",
        "removed",
        "retry",
        "superseded",
        "up_since",
        "wanted",
    )

    def __init__(self, peer_id: int, host: str, port: int, addr: str, backoff: float) -> None:
        self.id = peer_id
        self.host = host
        self.port = port
        self.addr = addr
        self.out: _Outbound | None = None  # ready outbound connection
        self.attempt: _Outbound | None = None  # outbound connection being set up
        self.dial_task: asyncio.Task[None] | None = None
        self.retry: asyncio.TimerHandle | None = None
        self.backoff = backoff
        self.up_since = 0.0
        self.wanted = False
        self.removed = False
        self.inbound: _Inbound | None = None
        self.in_gen = 0
        self.last_heard: float | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.msgs_in = 0
        self.msgs_out = 0
        self.drops = 0
        self.connects = 0
        self.inbound_connects = 0
        self.superseded = 0


class _Outbound(asyncio.Protocol):
    """This member -> one peer: hello, wait for nonce_s, authenticator, then frames."""

    def __init__(self, t: Transport, peer: _Peer) -> None:
        self.t = t
        self.peer = peer
        self.tr: asyncio.Transport | None = None
        self.buf = bytearray()
        self.counter = 0
        self.ready = False
        self.paused = False
        self.closed = False
        self.nonce_c = os.urandom(NONCE_LEN)
        self.timer: asyncio.TimerHandle | None = None
        self.seal: Callable[[bytes, bytes, bytes | None], bytes] | None = None
        self.write: Callable[[bytes], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self.tr = tr
        if self.closed:
            tr.abort()
            return
        _tune(tr.get_extra_info("socket"))
        tr.set_write_buffer_limits(high=self.t._max_queue_bytes)
        tr.write(_HELLO.pack(MAGIC, VERSION, self.t.node_id, self.peer.id, self.nonce_c))
        self.timer = self.t._loop_or_raise().call_later(self.t._handshake_timeout, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if not self.ready and not self.closed:
            self.t._note(
                ("dial-timeout", self.peer.id),
                logging.INFO,
                "raft transport: peer %d at %s did not answer the handshake within %.1f s",
                self.peer.id,
                self.peer.addr,
                self.t._handshake_timeout,
            )
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            if self.ready:
                raise HandshakeError("the listener sent data after the handshake")
            self.buf += data
            if len(self.buf) < NONCE_LEN:
                return
            if len(self.buf) > NONCE_LEN:
                raise HandshakeError("the listener's reply is longer than a nonce")
            t = self.t
            key = derive_key(t._secret, self.nonce_c, bytes(self.buf), t.node_id, self.peer.id)
            aead = ChaCha20Poly1305(key)
            self.seal = aead.encrypt
            tr = self.tr
            assert tr is not None
            self.write = tr.write
            sealed = aead.encrypt(_nonce(0), AUTH_PLAINTEXT, None)
            tr.write(_LEN.pack(len(sealed)) + sealed)
            self.counter = 1
            self.ready = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            t._outbound_ready(self)
        except ProtocolError as e:
            self.t._note(
                ("dial-refused", self.peer.id),
                logging.WARNING,
                "raft transport: outbound connection to peer %d at %s dropped: %s",
                self.peer.id,
                self.peer.addr,
                e,
            )
            self.abort()
        except Exception:
            log.exception("raft transport: outbound connection to peer %d failed", self.peer.id)
            self.abort()

    def eof_received(self) -> bool:
        buf = self.buf
        if not self.ready and len(buf) == len(MAGIC) + 1 and buf.startswith(MAGIC):
            self.t._note(
                ("version", self.peer.id),
                logging.WARNING,
                "raft transport: peer %d at %s speaks transport versions up to %d, "
                "this node speaks %s",
                self.peer.id,
                self.peer.addr,
                buf[-1],
                sorted(SUPPORTED_VERSIONS),
            )
        return False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.closed = True
        if self.tr is not None:
            self.tr.abort()
        self.t._outbound_lost(self)  # at once: send() must not write to it any more

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.t._outbound_lost(self)


class _Inbound(asyncio.Protocol):
    """One peer -> this member: answer the hello, check the authenticator, deliver."""

    def __init__(self, t: Transport, remote: Any) -> None:
        self.t = t
        self.remote = remote
        self.tr: asyncio.Transport | None = None
        self.state = _HELLO_WAIT
        self.buf = bytearray()
        self.from_id = 0
        self.peer: _Peer | None = None
        self.gen = -1
        self.counter = 0
        self.aead: ChaCha20Poly1305 | None = None
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        if self.state == _CLOSED:
            transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            if self.state == _OPEN:
                self._frames(data)
            elif self.state != _CLOSED:
                self._handshake(data)
        except ProtocolError as e:
            self._fail(str(e))
        except Exception as e:  # a bug of ours must not take the loop down
            log.exception("raft transport: inbound connection from %s failed", self._who())
            self._fail(f"internal error: {e!r}")
        finally:
            # Every message of this read has been delivered (or the rest was dropped).
            self.t._read_done()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = _CLOSED
        self._cancel_timer()
        t = self.t
        t._unauth.pop(self, None)
        peer = self.peer
        if was == _OPEN and peer is not None and peer.inbound is self:
            peer.inbound = None
            t._note(
                ("in-down", peer.id),
                logging.INFO,
                "raft transport: inbound connection from peer %d (%s) closed%s",
                peer.id,
                _fmt_addr(self.remote),
                f": {exc}" if exc else "",
            )

    # -- handshake ------------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        t = self.t
        if self.state == _HELLO_WAIT:
            if len(buf) >= 4 and buf[:4] != MAGIC:
                raise HandshakeError("not a Nebula raft transport hello (bad magic)")
            if len(buf) >= 5 and buf[4] not in SUPPORTED_VERSIONS:
                version = buf[4]
                self.state = _CLOSED
                self._cancel_timer()
                t._unauth.pop(self, None)
                t._refused += 1
                self._warn(f"unsupported transport version {version}")
                if self.tr is not None:
                    self.tr.write(MAGIC + bytes([max(SUPPORTED_VERSIONS)]))
                    self.tr.close()
                return
            if len(buf) < HELLO_LEN:
                return
            if len(buf) > HELLO_LEN:
                raise HandshakeError("bytes after the hello before the listener answered")
            _, _, from_id, to_id, nonce_c = _HELLO.unpack(buf)
            if to_id != t.node_id:
                raise HandshakeError(f"hello addressed to node {to_id}, this is node {t.node_id}")
            if from_id not in t._peers:
                raise HandshakeError(f"hello from node {from_id}, which is not a peer")
            nonce_s = os.urandom(NONCE_LEN)
            self.aead = ChaCha20Poly1305(derive_key(t._secret, nonce_c, nonce_s, from_id, to_id))
            self.from_id = from_id
            self.state = _AUTH_WAIT
            buf.clear()
            assert self.tr is not None
            self.tr.write(nonce_s)
            return
        # _AUTH_WAIT: exactly one authenticator frame, possibly followed by frames.
        if len(buf) < 4:
            return
        (n,) = _LEN.unpack_from(buf)
        if n != _AUTH_SEALED:
            raise HandshakeError(f"first frame of {n} bytes is not the authenticator")
        end = 4 + n
        if len(buf) < end:
            return
        assert self.aead is not None
        try:
            plain = self.aead.decrypt(_nonce(0), bytes(buf[4:end]), None)
        except InvalidTag:
            raise AuthenticationError("authenticator failed (wrong cluster secret?)") from None
        if plain != AUTH_PLAINTEXT:
            raise HandshakeError("authenticator carries the wrong text")
        rest = bytes(buf[end:])
        buf.clear()
        self.counter = 1
        t._inbound_authenticated(self)
        if rest and self.state == _OPEN:
            self._frames(rest)

    # -- frames ------------------------------------------------------------------------

    def _frames(self, data: bytes) -> None:
        """Open and deliver every complete frame; keep a partial one for the next read."""
        buf = self.buf
        src: bytes | bytearray
        if buf:
            buf += data
            src = buf
        else:
            src = data
        peer = self.peer
        assert peer is not None and self.aead is not None
        gen = self.gen
        t = self.t
        from_id = self.from_id
        decrypt = self.aead.decrypt
        on_message = t._on_message
        max_frame = t._max_frame
        size = len(src)
        off = 0
        heard = False
        mv = memoryview(src)
        try:
            while size - off >= 4:
                (n,) = _LEN.unpack_from(src, off)
                if n > max_frame or n < _MIN_SEALED:
                    raise FrameError(f"frame length {n} outside {_MIN_SEALED}..{max_frame}")
                end = off + 4 + n
                if end > size:
                    break
                c = self.counter
                try:
                    plain = decrypt(c.to_bytes(12, "little"), mv[off + 4 : end], None)
                except InvalidTag:
                    raise AuthenticationError(f"frame {c} failed authentication") from None
                self.counter = c + 1
                off = end
                peer.frames_in += 1
                if not heard:
                    heard = True
                    peer.last_heard = time.monotonic()
                kind = plain[0]
                if kind == KIND_MSG:
                    if self.state != _OPEN or peer.in_gen != gen:
                        return  # superseded or removed: nothing more from this connection
                    peer.msgs_in += 1
                    t._delivered = True
                    try:
                        on_message(from_id, plain[1:])
                    except Exception:
                        t._callback_failed(from_id)
                elif kind == KIND_BATCH:
                    if not self._batch(plain, peer, gen):
                        return
                else:
                    raise FrameError(f"unknown frame kind {kind}")
        finally:
            mv.release()
        if self.state != _OPEN:
            return
        if src is buf:
            if off:
                del buf[:off]
        elif off < size:
            buf += data[off:]

    def _batch(self, plain: bytes, peer: _Peer, gen: int) -> bool:
        spans: list[tuple[int, int]] = []
        i, end = 1, len(plain)
        while i < end:
            if end - i < 4:
                raise FrameError("truncated batch")
            (n,) = _LEN.unpack_from(plain, i)
            i += 4
            if n > end - i:
                raise FrameError("batch entry longer than its frame")
            spans.append((i, i + n))
            i += n
        on_message = self.t._on_message
        from_id = self.from_id
        for a, b in spans:
            if self.state != _OPEN or peer.in_gen != gen:
                return False
            peer.msgs_in += 1
            self.t._delivered = True
            try:
                on_message(from_id, plain[a:b])
            except Exception:
                self.t._callback_failed(from_id)
        return True

    # -- closing ----------------------------------------------------------------------

    def _who(self) -> str:
        if self.peer is not None:
            return f"peer {self.peer.id} ({_fmt_addr(self.remote)})"
        return _fmt_addr(self.remote)

    def _warn(self, reason: str, key: object = ("refused",)) -> None:
        if self.peer is not None:
            key = ("in-fail", self.peer.id)
            what = f"dropped the connection from peer {self.peer.id} at {_fmt_addr(self.remote)}"
        else:
            what = f"refused a connection from {_fmt_addr(self.remote)}"
        self.t._note(key, logging.WARNING, "raft transport: %s: %s", what, reason)

    def _fail(self, reason: str) -> None:
        if self.state == _CLOSED:
            return
        t = self.t
        if self.peer is None:
            t._refused += 1
        self._warn(reason)
        self.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.state in (_HELLO_WAIT, _AUTH_WAIT):
            self.t._timeouts += 1
            self._warn(
                f"handshake not completed within {self.t._handshake_timeout:g} s", ("timeout",)
            )
            self.abort()

    def abort(self) -> None:
        was = self.state
        self.state = _CLOSED
        self._cancel_timer()
        self.t._unauth.pop(self, None)
        peer = self.peer
        if was == _OPEN and peer is not None and peer.inbound is self:
            peer.inbound = None
            self.t._note(
                ("in-down", peer.id),
                logging.INFO,
                "raft transport: inbound connection from peer %d (%s) closed",
                peer.id,
                _fmt_addr(self.remote),
            )
        if self.tr is not None:
            self.tr.abort()


class Transport:
    """Authenticated, encrypted frames between the members of one Raft cluster.

    ``peers`` maps every other member's id to its ``host:port`` (this node's own id may be
    present; it is ignored).  ``secret`` is the cluster secret (at least 16 bytes).
    ``on_message(from_id, payload)`` is called on the loop thread for every payload from
    a peer's live authenticated connection; ``on_read_done()`` (optional) after the
    messages of one socket read were delivered, so that the receiver can act once for all
    of them.  See the module docstring for the design.
    """

    def __init__(
        self,
        node_id: int,
        bind_addr: str,
        peers: Mapping[int, str],
        secret: bytes,
        *,
        on_message: Callable[[int, bytes], None],
        on_read_done: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        handshake_timeout: float = 2.0,
        max_unauthenticated: int = 64,
        max_frame: int = 16 << 20,
        connect_timeout: float = 1.0,
        retry_interval: float = 0.1,
        max_retry_interval: float = 1.0,
        max_queue_bytes: int = 64 << 20,
        backlog: int = 1024,
    ) -> None:
        if isinstance(node_id, bool) or not isinstance(node_id, int) or not 0 < node_id <= _MAX_ID:
            raise ConfigError(
                f"raft transport: node id must be an integer in 1..2^64-1, got {node_id!r}"
            )
        if not isinstance(secret, bytes | bytearray) or len(secret) < _MIN_SECRET:
            raise ConfigError(
                f"raft transport: the cluster secret must be at least {_MIN_SECRET} bytes"
            )
        if not callable(on_message):
            raise ConfigError("raft transport: on_message must be callable")
        for name, value in (
            ("handshake_timeout", handshake_timeout),
            ("connect_timeout", connect_timeout),
            ("retry_interval", retry_interval),
            ("max_retry_interval", max_retry_interval),
        ):
            if not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"raft transport: {name} must be > 0, got {value!r}")
        if max_retry_interval < retry_interval:
            raise ConfigError("raft transport: max_retry_interval must be >= retry_interval")
        if not isinstance(max_unauthenticated, int) or max_unauthenticated < 1:
            raise ConfigError("raft transport: max_unauthenticated must be >= 1")
        if not isinstance(max_frame, int) or not _AUTH_SEALED <= max_frame <= 0xFFFFFFFF:
            raise ConfigError(
                f"raft transport: max_frame must be in {_AUTH_SEALED}..{0xFFFFFFFF}, got {max_frame!r}"
            )
        if not isinstance(max_queue_bytes, int) or max_queue_bytes < 1:
            raise ConfigError("raft transport: max_queue_bytes must be >= 1")
        self.node_id = node_id
        self._bind = _parse_addr(bind_addr, "raft transport bind address", allow_port_zero=True)
        self._bind_text = bind_addr
        self._secret = bytes(secret)
        self._on_message = on_message
        self._on_read_done = on_read_done
        self._delivered = False  # a message was delivered since the last on_read_done
        self._loop = loop
        self._handshake_timeout = float(handshake_timeout)
        self._max_unauth = max_unauthenticated
        self._max_frame = max_frame
        self._max_payload = max_frame - _MIN_SEALED
        self._connect_timeout = float(connect_timeout)
        self._retry_interval = float(retry_interval)
        self._max_retry = float(max_retry_interval)
        self._max_queue_bytes = max_queue_bytes
        self._backlog = backlog
        self._peers: dict[int, _Peer] = {
            pid: _Peer(pid, host, port, addr, self._retry_interval)
            for pid, (host, port, addr) in self._parse_peers(peers).items()
        }
        self._lsock: socket.socket | None = None
        self._address: str | None = None
        self._reading = False
        self._resume: asyncio.TimerHandle | None = None
        self._unauth: dict[_Inbound, None] = {}  # insertion order = age
        self._accept_tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self._closed = False
        self._throttle = _Throttle(_LOG_INTERVAL)
        # listener counters
        self._accepted = 0
        self._evicted = 0
        self._refused = 0
        self._timeouts = 0
        self._accept_pauses = 0
        self._accept_errors = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> str | None:
        """The ``host:port`` the listener is bound to (after ``start()``)."""
        return self._address

    async def start(self) -> None:
        """Bind the listener and start accepting (ConfigError naming the address if not)."""
        if self._closed:
            raise StateError("raft transport: start() after close()")
        if self._started:
            raise StateError("raft transport: start() called twice")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        host, port = self._bind
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as e:
            raise ConfigError(
                f"raft transport: cannot listen on {self._bind_text}: {e.strerror or e}"
            ) from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(self._backlog)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ConfigError(
                f"raft transport: cannot listen on {self._bind_text}: {e.strerror or e}"
            ) from None
        self._lsock = sock
        self._address = _fmt_addr(sock.getsockname())
        self._started = True
        self._start_reading()
        log.info("raft transport: node %d listening on %s", self.node_id, self._address)

    async def close(self) -> None:
        """Stop listening, drop every connection, stop dialling.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._lsock is not None:
            self._lsock.close()
        tasks: list[asyncio.Task[Any]] = list(self._accept_tasks)
        for peer in self._peers.values():
            if peer.dial_task is not None:
                tasks.append(peer.dial_task)
            self._shut_peer(peer)
        for conn in list(self._unauth):
            conn.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def _loop_or_raise(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise StateError("raft transport: not started")
        return self._loop

    # -- peers ----------------------------------------------------------------------------

    def _parse_peers(self, peers: Mapping[int, str]) -> dict[int, tuple[str, int, str]]:
        parsed: dict[int, tuple[str, int, str]] = {}
        for pid, addr in peers.items():
            if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _MAX_ID:
                raise ConfigError(f"raft transport: peer id must be in 1..2^64-1, got {pid!r}")
            if pid == self.node_id:
                continue
            host, port = _parse_addr(addr, f"raft transport peer {pid}")
            parsed[pid] = (host, port, addr)
        return parsed

    def set_peers(self, peers: Mapping[int, str]) -> None:
        """Membership change: close the connections of removed peers, allow new ones.

        A peer whose address changed is dialled again at the new address.
        """
        parsed = self._parse_peers(peers)
        for pid in [p for p in self._peers if p not in parsed]:
            peer = self._peers.pop(pid)
            peer.removed = True
            self._shut_peer(peer)
            log.info("raft transport: peer %d removed", pid)
        for pid, (host, port, addr) in parsed.items():
            peer = self._peers.get(pid)
            if peer is None:
                self._peers[pid] = _Peer(pid, host, port, addr, self._retry_interval)
                log.info("raft transport: peer %d added at %s", pid, addr)
            elif (peer.host, peer.port) != (host, port):
                peer.host, peer.port, peer.addr = host, port, addr
                peer.backoff = self._retry_interval
                log.info("raft transport: peer %d moved to %s", pid, addr)
                for conn in (peer.out, peer.attempt):
                    if conn is not None:
                        conn.abort()  # connection_lost schedules the redial
                if peer.retry is not None:
                    peer.retry.cancel()
                    peer.retry = None
                    self._dial(peer)

    def _shut_peer(self, peer: _Peer) -> None:
        peer.in_gen += 1  # nothing more is delivered from its inbound connection
        if peer.retry is not None:
            peer.retry.cancel()
            peer.retry = None
        if peer.dial_task is not None:
            peer.dial_task.cancel()
        for conn in (peer.out, peer.attempt):
            if conn is not None:
                conn.abort()
        peer.out = peer.attempt = None
        if peer.inbound is not None:
            peer.inbound.abort()
            peer.inbound = None

    # -- sending (hot path) ------------------------------------------------------------

    def send(self, to: int, payload: bytes) -> bool:
        """Seal and write ``payload`` to peer ``to`` now; False if it was dropped.

        Dropped: unknown peer, not connected (yet: the first call dials), write buffer
        above ``max_queue_bytes``, payload above ``max_frame - 17`` bytes.  Loop thread.
        """
        peer = self._peers.get(to)
        if peer is None:
            return False
        out = peer.out
        if out is None or out.paused or len(payload) > self._max_payload:
            return self._drop(peer, len(payload))
        n = out.counter
        out.counter = n + 1
        sealed = out.seal(n.to_bytes(12, "little"), b"\x01" + payload, None)  # type: ignore[misc]
        try:
            out.write(_LEN.pack(len(sealed)) + sealed)  # type: ignore[misc]
        except (RuntimeError, OSError):  # the transport died under us: redial
            out.abort()
            return self._drop(peer, 0)
        peer.frames_out += 1
        peer.msgs_out += 1
        return True

    def send_many(self, to: int, payloads: list[bytes]) -> bool:
        """Send several payloads in as few frames as ``max_frame`` allows, one write.

        True if every payload was written; on False some or all were dropped.
        """
        if len(payloads) == 1:
            return self.send(to, payloads[0])
        peer = self._peers.get(to)
        if peer is None:
            return False
        if not payloads:
            return True
        out = peer.out
        if out is None or out.paused:
            return self._drop(peer, 0, len(payloads))
        seal = out.seal
        assert seal is not None and out.write is not None
        room = self._max_frame - TAG_LEN - 1  # body bytes of one batch frame
        chunks: list[bytes] = []
        parts: list[bytes] = [b"\x02"]
        used = 0
        dropped = 0
        counter = out.counter
        frames = 0

        def flush() -> None:
            nonlocal parts, used, counter, frames
            sealed = seal(counter.to_bytes(12, "little"), b"".join(parts), None)
            chunks.append(_LEN.pack(len(sealed)))
            chunks.append(sealed)
            counter += 1
            frames += 1
            parts = [b"\x02"]
            used = 0

        for p in payloads:
            need = 4 + len(p)
            if need > room:
                dropped += 1
                continue
            if used + need > room:
                flush()
            parts.append(_LEN.pack(len(p)))
            parts.append(p)
            used += need
        if used:
            flush()
        if chunks:
            out.counter = counter
            out.write(b"".join(chunks))
            peer.frames_out += frames
            peer.msgs_out += len(payloads) - dropped
        if dropped:
            self._drop(peer, self._max_frame, dropped)
            return False
        return True

    def _drop(self, peer: _Peer, size: int, n: int = 1) -> bool:
        peer.drops += n
        if size > self._max_payload:
            self._note(
                ("too-big", peer.id),
                logging.WARNING,
                "raft transport: dropped a payload of %d bytes for peer %d (max_frame %d)",
                size,
                peer.id,
                self._max_frame,
            )
        if not peer.wanted:
            self._want(peer)
        return False

    # -- dialling -------------------------------------------------------------------------

    def _want(self, peer: _Peer) -> None:
        if self._closed or not self._started or peer.removed:
            return
        peer.wanted = True
        if peer.out is None and peer.attempt is None and peer.retry is None:
            self._dial(peer)

    def _dial(self, peer: _Peer) -> None:
        if self._closed or peer.removed or peer.out is not None or peer.attempt is not None:
            return
        loop = self._loop_or_raise()
        if peer.retry is not None:
            peer.retry.cancel()
            peer.retry = None
        proto = _Outbound(self, peer)
        peer.attempt = proto
        peer.dial_task = loop.create_task(self._connect(peer, proto))

    async def _connect(self, peer: _Peer, proto: _Outbound) -> None:
        loop = self._loop_or_raise()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.create_connection(lambda: proto, peer.host, peer.port)
        except (OSError, TimeoutError) as e:
            if peer.attempt is proto:
                self._note(
                    ("dial-fail", peer.id),
                    logging.INFO,
                    "raft transport: cannot reach peer %d at %s: %s",
                    peer.id,
                    peer.addr,
                    e or "timed out",
                )
                self._attempt_over(peer, proto)
        finally:
            if peer.dial_task is asyncio.current_task():
                peer.dial_task = None

    def _attempt_over(self, peer: _Peer, proto: _Outbound) -> None:
        was_up = peer.out is proto
        if was_up:
            peer.out = None
        elif peer.attempt is proto:
            peer.attempt = None
        else:
            return
        proto.closed = True
        if self._closed or peer.removed:
            return
        now = time.monotonic()
        if was_up and now - peer.up_since >= self._max_retry:
            peer.backoff = self._retry_interval
        delay = peer.backoff * (0.75 + random.random() / 2)
        peer.backoff = min(peer.backoff * 2, self._max_retry)
        peer.retry = self._loop_or_raise().call_later(delay, self._retry_now, peer)

    def _retry_now(self, peer: _Peer) -> None:
        peer.retry = None
        self._dial(peer)

    def _outbound_ready(self, proto: _Outbound) -> None:
        peer = proto.peer
        if peer.attempt is not proto or self._closed or peer.removed:
            proto.abort()
            return
        peer.attempt = None
        peer.out = proto
        peer.up_since = time.monotonic()
        peer.connects += 1
        self._note(
            ("out-up", peer.id),
            logging.INFO,
            "raft transport: connected to peer %d at %s",
            peer.id,
            peer.addr,
        )

    def _outbound_lost(self, proto: _Outbound) -> None:
        peer = proto.peer
        if peer.out is proto:
            self._note(
                ("out-down", peer.id),
                logging.INFO,
                "raft transport: connection to peer %d at %s lost",
                peer.id,
                peer.addr,
            )
        self._attempt_over(peer, proto)

    async def wait_connected(self, peer: int, timeout: float | None = None) -> bool:
        """Dial ``peer`` if needed and wait until its outbound connection is up."""
        p = self._peers.get(peer)
        if p is None or self._closed:
            return False
        self._want(p)
        deadline = None if timeout is None else time.monotonic() + timeout
        while p.out is None:
            if self._closed or p.removed:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    # -- listening ------------------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading and self._lsock is not None and not self._closed:
            self._loop_or_raise().add_reader(self._lsock.fileno(), self._on_acceptable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._lsock is not None:
            self._loop_or_raise().remove_reader(self._lsock.fileno())
        self._reading = False

    def _on_acceptable(self) -> None:
        lsock = self._lsock
        if lsock is None or self._closed:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, remote = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _ACCEPT_PAUSE_ERRNOS:
                    self._pause_accepting(e)
                    return
                self._accept_errors += 1  # ECONNABORTED & co.: that connection is gone
                continue
            except Exception:  # never let the listener die
                log.exception("raft transport: accept() failed")
                self._accept_errors += 1
                continue
            try:
                self._accepted_one(sock, remote)
            except Exception:
                log.exception("raft transport: could not set up an accepted connection")
                sock.close()

    def _pause_accepting(self, e: OSError) -> None:
        self._accept_pauses += 1
        self._stop_reading()
        # Free a descriptor for the next try: the oldest connection without the secret.
        if self._unauth:
            next(iter(self._unauth)).abort()
            self._evicted += 1
        self._note(
            ("accept-pause",),
            logging.WARNING,
            "raft transport: accept() failed (%s); pausing %.0f ms, the listener stays bound",
            errno.errorcode.get(e.errno or 0, str(e)),
            _ACCEPT_PAUSE * 1000,
        )
        if self._resume is None:
            self._resume = self._loop_or_raise().call_later(_ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        self._start_reading()

    def _oldest_to_evict(self) -> _Inbound:
        """The unauthenticated connection a new one replaces: the oldest from an address
        that is no configured peer's host, else the oldest."""
        hosts = {p.host for p in self._peers.values()}
        for conn in self._unauth:
            remote = conn.remote
            if not (isinstance(remote, tuple) and remote and remote[0] in hosts):
                return conn
        return next(iter(self._unauth))

    def _accepted_one(self, sock: socket.socket, remote: Any) -> None:
        self._accepted += 1
        if len(self._unauth) >= self._max_unauth:
            self._evicted += 1
            self._oldest_to_evict().abort()
            self._note(
                ("cap",),
                logging.WARNING,
                "raft transport: %d unauthenticated connections (the cap); "
                "closed the oldest to admit %s",
                self._max_unauth,
                _fmt_addr(remote),
            )
        sock.setblocking(False)
        _tune(sock, keepalive=False)
        loop = self._loop_or_raise()
        conn = _Inbound(self, remote)
        self._unauth[conn] = None
        conn.timer = loop.call_later(self._handshake_timeout, conn._expired)
        task = loop.create_task(loop.connect_accepted_socket(lambda: conn, sock))
        self._accept_tasks.add(task)
        task.add_done_callback(lambda tk: self._accept_done(tk, conn, sock))

    def _accept_done(self, task: asyncio.Task[Any], conn: _Inbound, sock: socket.socket) -> None:
        self._accept_tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            conn.abort()
            with contextlib.suppress(OSError):
                sock.close()

    def _inbound_authenticated(self, conn: _Inbound) -> None:
        peer = self._peers.get(conn.from_id)
        if peer is None or self._closed:
            raise HandshakeError(f"node {conn.from_id} is no longer a peer")
        self._unauth.pop(conn, None)
        conn._cancel_timer()
        peer.in_gen += 1
        conn.gen = peer.in_gen
        conn.peer = peer
        conn.state = _OPEN
        old = peer.inbound
        peer.inbound = conn
        peer.inbound_connects += 1
        peer.last_heard = time.monotonic()
        if conn.tr is not None:
            _tune(conn.tr.get_extra_info("socket"), nodelay=False)
        if old is not None:
            peer.superseded += 1
            old.abort()
        self._note(
            ("in-up", peer.id),
            logging.INFO,
            "raft transport: peer %d connected from %s%s",
            peer.id,
            _fmt_addr(conn.remote),
            " (replacing its previous connection)" if old is not None else "",
        )
        # It is up (again): have our side of the pair up too, without waiting for a backoff.
        if peer.out is None and peer.attempt is None:
            peer.backoff = self._retry_interval
            peer.wanted = True
            self._dial(peer)

    # -- observability ----------------------------------------------------------------

    def _note(self, key: object, level: int, msg: str, *args: object) -> None:
        if not log.isEnabledFor(level):
            return
        suffix = self._throttle(key)
        if suffix is not None:
            log.log(level, msg + "%s", *args, suffix)

    def _read_done(self) -> None:
        if self._delivered:
            self._delivered = False
            cb = self._on_read_done
            if cb is not None:
                try:
                    cb()
                except Exception:
                    if self._throttle(("read_done",)) is not None:
                        log.exception("raft transport: on_read_done failed")

    def _callback_failed(self, from_id: int) -> None:
        if self._throttle(("callback",)) is not None:
            log.exception("raft transport: on_message failed for a payload from peer %d", from_id)

    def last_heard(self, peer: int) -> float | None:
        """``time.monotonic()`` of the last authenticated frame from ``peer`` (or None)."""
        p = self._peers.get(peer)
        return None if p is None else p.last_heard

    def stats(self) -> dict[int, dict[str, Any]]:
        """Per peer: connection state, seconds since last heard, counters."""
        now = time.monotonic()
        return {
            pid: {
                "address": p.addr,
                "connected": p.out is not None,
                "inbound": p.inbound is not None,
                "last_heard": None if p.last_heard is None else now - p.last_heard,
                "frames_in": p.frames_in,
                "frames_out": p.frames_out,
                "messages_in": p.msgs_in,
                "messages_out": p.msgs_out,
                "drops": p.drops,
                "connects": p.connects,
                "inbound_connects": p.inbound_connects,
                "superseded": p.superseded,
            }
            for pid, p in self._peers.items()
        }

    def listener_stats(self) -> dict[str, Any]:
        """The listener's counters (accepted, refused, evicted, accept pauses, ...)."""
        return {
            "address": self._address,
            "listening": self._lsock is not None and not self._closed,
            "unauthenticated": len(self._unauth),
            "accepted": self._accepted,
            "refused": self._refused,
            "handshake_timeouts": self._timeouts,
            "evicted": self._evicted,
            "accept_pauses": self._accept_pauses,
            "accept_errors": self._accept_errors,
        }
