"""Dialing validators: the thin asyncio pump around the sans-I/O core.

One :class:`Dialer` per configured validator address.  It connects (TCP with
SecretConnection, or a plain Unix socket), answers requests one at a time through
the shared :class:`~nebula.service.SigningService`, and on any error closes the
connection and dials again with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

from nebula import proto
from nebula.aio.lookup import Lookup
from nebula.aio.session import READ_CHUNK, PlainSession, secret_handshake
from nebula.config import Endpoint
from nebula.crypto.secretconn import Identity
from nebula.errors import ConfigError, NebulaError, ProtocolError
from nebula.metrics import Metrics
from nebula.service import SigningService
from nebula.types import WireFamily

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger("nebula.conn")


class Dialer:
    def __init__(
        self,
        endpoint: Endpoint,
        service: SigningService,
        family: WireFamily,
        *,
        identity_seed: bytes,
        handshake_timeout: float = 3.0,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
        idle_timeout: float = 15.0,
        on_event: Callable[[str, Endpoint], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._lookup = Lookup(endpoint.host or "", endpoint.port or 0)
        self.service = service
        self.family = family
        self.identity_seed = identity_seed
        # The Ed25519 identity key pair, derived once instead of on every (re)connect.
        try:
            self.identity = Identity(identity_seed)
        except ValueError as e:
            raise ConfigError(f"SecretConnection identity for {endpoint}: {e}") from None
        self.handshake_timeout = handshake_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.idle_timeout = idle_timeout
        self.on_event = on_event
        self.metrics = metrics
        self.connected = False
        self.connects = 0
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        # Checked before every (re)connect: a cancellation can be lost when it races
        # with a completing read (asyncio.wait_for in Python 3.11), the flag cannot.
        self._running = False
        # nebula_requests_total's child per request class (labels() costs ~2 µs a call).
        self._request_counters: dict[type, Counter] = {}

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"dial {self.endpoint}"
            )

    async def stop(self) -> None:
        """Close the connection at once and stop dialing."""
        self._running = False
        task, self._task = self._task, None
        self._abort()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _abort(self) -> None:
        if self.connected and self.metrics is not None:
            self.metrics.connections.dec()
        w = self._writer
        if w is not None:
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writer = None
        self.connected = False

    def _event(self, name: str) -> None:
        if self.on_event is not None:
            self.on_event(name, self.endpoint)

    def answered(self, cls: type, t_in: float, t_dec: float, t_done: float, t_out: float) -> None:
        """The metrics of one answered request of class ``cls`` (both request loops):
        nebula_requests_total and the receive_decode, encode_send and total phases."""
        metrics = self.metrics
        assert metrics is not None
        counter = self._request_counters.get(cls)
        if counter is None:
            counter = self._request_counters[cls] = metrics.requests.labels(
                self.service.chain_id, cls.__name__
            )
        counter.inc()
        metrics.phase("receive_decode", t_dec - t_in)
        metrics.phase("encode_send", t_out - t_done)
        metrics.phase("total", t_out - t_in)

    # ---- the dial loop ---------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.backoff_min
        t_served = 0.0
        while self._running:
            served = False
            try:
                reader, writer = await self._connect()
                self._writer = writer
                try:
                    session = await asyncio.wait_for(
                        self._handshake(reader, writer), self.handshake_timeout
                    )
                except TimeoutError:
                    raise ProtocolError(
                        f"handshake with {self.endpoint} timed out after {self.handshake_timeout}s"
                    ) from None
                if not self._running:
                    return
                self.connected = True
                self.connects += 1
                if self.metrics is not None:
                    self.metrics.connections.inc()
                    self.metrics.reconnects.labels(str(self.endpoint)).inc()
                self._event("connected")
                log.info(
                    "connected to validator %s (chain %s)",
                    self.endpoint,
                    self.service.chain_id,
                    extra={"chain_id": self.service.chain_id},
                )
                served = True
                t_served = asyncio.get_running_loop().time()
                service = self.service
                if (service.inline or service.begins) and _stream_buffer(reader) is not None:
                    await self._serve_inline(reader, writer, session)
                else:
                    await self._serve(reader, writer, session)
            except asyncio.CancelledError:
                self._abort()
                raise
            except (OSError, TimeoutError) as e:
                if served:  # an established connection reset: a drop like any other
                    log.warning(
                        "connection to %s (chain %s) dropped: %s",
                        self.endpoint,
                        self.service.chain_id,
                        e,
                        extra={"chain_id": self.service.chain_id},
                    )
                else:
                    log.debug("cannot reach validator %s: %s", self.endpoint, e)
            except NebulaError as e:
                log.warning(
                    "connection to %s (chain %s) dropped: %s",
                    self.endpoint,
                    self.service.chain_id,
                    e,
                    extra={"chain_id": self.service.chain_id},
                )
            except Exception:
                log.exception(
                    "unexpected error on connection to %s (chain %s)",
                    self.endpoint,
                    self.service.chain_id,
                )
            if self.connected:
                self._event("disconnected")
            self._abort()
            if not self._running:
                return
            if served and asyncio.get_running_loop().time() - t_served >= self.backoff_max:
                # A connection that lasted (a validator that restarted): redial at once.
                # One that ended as soon as it was made (a peer that completes the
                # handshake and drops it) keeps backing off: no redial storm, and no two
                # log lines each, twenty times a second.
                delay = self.backoff_min
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.backoff_max)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ep = self.endpoint
        if ep.scheme == "unix":
            return await asyncio.wait_for(
                asyncio.open_unix_connection(ep.path, limit=READ_CHUNK), self.handshake_timeout
            )

        async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            # A validator's host name is looked up once at a time (nebula.aio.lookup).
            host = await self._lookup.address()
            return await asyncio.open_connection(host, ep.port, limit=READ_CHUNK)

        reader, writer = await asyncio.wait_for(dial(), self.handshake_timeout)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if self.endpoint.scheme == "unix":
            return PlainSession()
        return await secret_handshake(reader, writer, self.identity, str(self.endpoint))

    async def _serve(self, reader, writer, session) -> None:
        framer = proto.DelimitedReader(proto.MAX_REQUEST_SIZE)
        service = self.service
        family = self.family
        decode = proto.decode_request
        encode = proto.encode_response
        delimit = proto.encode_delimited
        metrics = self.metrics
        perf = time.perf_counter
        # The idle deadline: a timer that fires once per idle_timeout and re-arms for
        # the time left since the last read (an asyncio.timeout around every read cost a
        # timer handle per request); a silent validator's connection is aborted.
        idle = self.idle_timeout
        loop = asyncio.get_running_loop()
        silent = reading = False
        t_wait = 0.0
        watchdog: asyncio.TimerHandle | None = None

        def watch() -> None:
            nonlocal silent, watchdog
            # Only a read counts: a request the service is still deciding (a slow
            # backend has its own deadline) does not make the validator silent.
            left = idle - (perf() - t_wait) if reading else idle
            if left > 0:
                watchdog = loop.call_later(left, watch)
                return
            silent = True
            writer.transport.abort()

        pending = framer.feed(session.feed(b""))
        t_in = perf()
        watchdog = loop.call_later(idle, watch)
        transport = writer.transport
        try:
            while True:
                for k, msg in enumerate(pending):
                    if k and not k % _MAX_PER_PASS:
                        # Requests pipelined in one read: other connections' callbacks
                        # run between every _MAX_PER_PASS of them (a request decided
                        # without waiting never yields to the loop).
                        await asyncio.sleep(0)
                    req = decode(msg, family)
                    t_dec = perf()
                    resp = await service.handle(req)
                    t_done = perf()
                    writer.write(session.seal(delimit(encode(resp, family))))
                    if metrics is not None:
                        self.answered(type(req), t_in, t_dec, t_done, perf())
                    if transport.get_write_buffer_size() > _MAX_UNSENT:
                        # A validator that does not read its answers: stop reading its
                        # requests until they drain; the idle deadline counts meanwhile.
                        t_wait = perf()
                        reading = True
                        try:
                            await writer.drain()
                        except OSError:
                            if not silent:
                                raise
                        reading = False
                        if silent:
                            raise ProtocolError(
                                f"{self.endpoint} read no answer for {idle}s; reconnecting"
                            )
                    t_in = perf()
                if not self._running:
                    return
                t_wait = perf()
                reading = True
                try:
                    data = await reader.read(READ_CHUNK)
                except OSError:
                    if not silent:
                        raise
                    data = b""
                reading = False
                if not data:
                    if silent:
                        raise ProtocolError(f"{self.endpoint} silent for {idle}s; reconnecting")
                    raise ProtocolError(f"{self.endpoint} closed the connection")
                t_in = perf()
                pending = framer.feed(session.feed(data))
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _serve_inline(self, reader, writer, session) -> None:
        """:meth:`_serve` for a service that decides without waiting (``service.inline``:
        a native key and the local store): the transport is handed to an
        :class:`_InlineServing` protocol, which decodes, decides and answers each request
        inside ``data_received`` - no stream buffer, future or task wake-up per request.
        Returns when the dialer stops; raises why the connection ended otherwise."""
        transport = writer.transport
        serving = _InlineServing(self, transport, session)
        # What the stream read past the handshake: the validator's first request(s).
        buffered = _stream_buffer(reader)
        assert buffered is not None  # checked by the caller
        leftover = bytes(buffered)
        buffered.clear()
        transport.set_protocol(serving)
        if not transport.is_reading():
            transport.resume_reading()
        serving.start(leftover)
        if reader.exception() is not None or reader.at_eof() or transport.is_closing():
            serving.eof_received()  # the stream saw the connection end before the switch
        try:
            await serving.ended
        finally:
            serving.stop()


def _stream_buffer(reader: asyncio.StreamReader) -> bytearray | None:
    """The bytes a StreamReader has read and not handed out yet: its ``_buffer``.

    asyncio has no public way to take them over; the attribute has been there since
    Python 3.4.  None if a Python without it runs Nebula: the connection then keeps the
    streams loop (slower, same answers) instead of losing the buffered requests."""
    buf = getattr(reader, "_buffer", None)
    return buf if isinstance(buf, bytearray) else None


def load_or_make_identity(path: str | os.PathLike[str] | None) -> bytes:
    """The SecretConnection identity seed: from a key file, or fresh for this run."""
    if path is None:
        return os.urandom(32)
    from nebula.crypto.keys import load_key_file

    return load_key_file(path, "ed25519").secret_bytes()


# ---- the inline request loop ---------------------------------------------------------------

# Requests a validator may queue while one is being answered before reading pauses (a
# validator sends one request at a time and waits for its answer).
_MAX_BACKLOG = 64

# Requests answered one after the other without letting the event loop run other
# callbacks (a validator pipelining thousands of requests in one read must not hold
# the loop, shared with every other chain, for the time they all take).
_MAX_PER_PASS = 64

# Answers written and not yet taken by the validator's socket above which the streams
# loop stops answering (and reading) until they drain: a peer that sends requests and
# never reads must not grow our write buffer without bound (a 3-byte ping's answer is a
# 1044-byte SecretConnection frame).  The inline loop uses the transport's own
# pause_writing / resume_writing (its high-water mark).
_MAX_UNSENT = 1 << 16


@types.coroutine
def _delegate(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Run ``coro``, which already yielded ``yielded`` (what it waits for), to its end
    inside the task that awaits this: ``yield from`` for a coroutine started by hand."""
    while True:
        try:
            value = yield yielded
        except GeneratorExit:  # closed unfinished (as ``yield from`` does: close it too)
            coro.close()
            raise
        except BaseException as e:  # a cancellation of the task: into the coroutine
            try:
                yielded = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(value)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    return await _delegate(coro, yielded)


class _Begun:
    """``_InlineServing.waiting`` while a request started by ``SigningService.begin``
    waits for its answer."""

    __slots__ = ("req", "t_dec")

    def __init__(self, req: Any, t_dec: float) -> None:
        self.req = req
        self.t_dec = t_dec


class _InlineServing(asyncio.Protocol):
    """The request loop of one connection after its handshake, for an inline service or
    one that begins decisions from callbacks.

    ``data_received`` opens the frames and decodes each request.  A service that
    ``begins`` (the Raft store) starts a new vote or proposal decision with
    ``service.begin``: the store's callback that ends the decision writes the answer -
    no task, future or stream wake-up per request.  Any other request starts the
    service's ``handle`` coroutine by hand: for an inline service it completes there
    (the common case: the decision is durable and the signature made before it returns)
    and the answer is written at once.  A request that waits after all (another chain's
    decision shares this loop pass's write, a second connection holds the chain's lock,
    a Raft decision) continues in a task.  Requests behind a waiting one wait in order.
    The coroutine never needs a current task before it first waits: neither service
    uses ``asyncio.timeout`` (``SigningService.inline``, ``SignStore.begins_commits``).
    Any error ends the connection (``ended`` raises it), as in :meth:`Dialer._serve`.
    """

    def __init__(self, dialer: Dialer, transport: asyncio.Transport, session: Any) -> None:
        self.dialer = dialer
        self.transport = transport
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.framer = proto.DelimitedReader(proto.MAX_REQUEST_SIZE)
        self.ended: asyncio.Future[None] = self.loop.create_future()
        # A request continuing in a task, or one the service began (its answer is due).
        self.waiting: asyncio.Task[Any] | _Begun | None = None
        self.backlog: list[bytes] = []  # requests behind it (plaintext, in order)
        self.paused = False
        # The transport's write buffer is above its high-water mark (the validator does
        # not read its answers): no request is answered, nor read, until it drains.
        self.write_paused = False
        self.eof = False  # the validator's side shut down its writing half
        # _serve is going through the requests read together: an answer given inside
        # the store's begin_commit leaves what comes after them to _serve's caller.
        self.serving = False
        self.last_read = self.t_in = time.perf_counter()
        self.watchdog: asyncio.TimerHandle | None = None

    def start(self, leftover: bytes) -> None:
        self.watchdog = self.loop.call_later(self.dialer.idle_timeout, self._watch)
        self._feed(leftover)

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        task, self.waiting = self.waiting, None
        if isinstance(task, asyncio.Task):
            task.cancel()
        # A begun decision goes on in the store; its answer is dropped (_begun_answer).

    def _end(self, exc: BaseException | None) -> None:
        """End the connection: ``ended`` raises ``exc`` (None: the dialer stopped)."""
        if not self.ended.done():
            if exc is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(exc)
        self.transport.abort()

    def _watch(self) -> None:
        # Only a read counts: a request still being decided does not make the validator
        # silent (a waiting backend has its own deadline).
        idle = self.dialer.idle_timeout
        left = idle if self.waiting is not None else idle - (time.perf_counter() - self.last_read)
        if left > 0:
            self.watchdog = self.loop.call_later(left, self._watch)
            return
        self.watchdog = None
        self._end(ProtocolError(f"{self.dialer.endpoint} silent for {idle}s; reconnecting"))

    # -- protocol callbacks

    def data_received(self, data: bytes) -> None:
        if not self.ended.done():
            self.last_read = self.t_in = time.perf_counter()
            self._feed(data)

    def eof_received(self) -> bool:
        # As the streams loop: every request already received is answered first (the
        # validator's side may only have shut down its writing half).
        self.eof = True
        if self.waiting is None and not self.write_paused:
            self._end(self._closed())
        return True  # the transport stays open for the answers still due

    def _closed(self) -> ProtocolError:
        return ProtocolError(f"{self.dialer.endpoint} closed the connection")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc or self._closed())

    def pause_writing(self) -> None:
        # The validator does not take its answers: stop reading its requests (the idle
        # deadline then ends a connection whose validator reads nothing at all).
        self.write_paused = True
        if not self.paused and not self.ended.done():
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.waiting is None and not self.ended.done():
            # The requests held back, then reading resumed: on the next loop pass, not
            # inside the transport's write callback.
            marker = self.waiting = _Begun(None, 0.0)
            self.loop.call_soon(self._resume, marker)

    # -- requests

    def _feed(self, data: bytes) -> None:
        try:
            self._serve(self.framer.feed(self.session.feed(data)))
        except Exception as e:
            self._end(e)
            return
        self._after()

    def _serve(self, msgs: list[bytes]) -> None:
        if self.waiting is not None or self.write_paused:
            self._queue(msgs)
            return
        self.serving = True
        try:
            self._serve_each(msgs)
        finally:
            self.serving = False

    def _serve_each(self, msgs: list[bytes]) -> None:
        dialer = self.dialer
        service = dialer.service
        handle = service.handle
        begin = service.begin if service.begins else None
        family = dialer.family
        for k, msg in enumerate(msgs):
            if not dialer._running:
                self._end(None)
                return
            if k and (self.write_paused or k >= _MAX_PER_PASS):
                # The answers are not being read (resume_writing serves the rest), or
                # enough for one loop pass: the rest go on in the next one, after the
                # other connections' callbacks.
                self._queue(msgs[k:])
                if not self.write_paused:
                    marker = self.waiting = _Begun(None, 0.0)
                    self.loop.call_soon(self._resume, marker)
                return
            req = proto.decode_request(msg, family)
            t_dec = time.perf_counter()
            if begin is not None:
                self.waiting = _Begun(req, t_dec)
                if begin(req, self._begun_answer):
                    if self.waiting is not None:
                        # Its answer comes from the store's callback; the others queue.
                        self._queue(msgs[k + 1 :])
                        return
                    if self.ended.done():
                        return
                    continue  # answered already (a store may call back at once)
                self.waiting = None
            coro = handle(req)
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                self._answer(req, stop.value, t_dec)
                continue
            except BaseException:
                coro.close()
                raise
            # It waits: the rest of this request runs in a task, the others queue.
            self._queue(msgs[k + 1 :])
            task = self.waiting = self.loop.create_task(_finish(coro, yielded))
            task.add_done_callback(lambda t, req=req, t_dec=t_dec: self._done(t, req, t_dec))
            return

    def _queue(self, msgs: list[bytes]) -> None:
        self.backlog.extend(msgs)
        if len(self.backlog) > _MAX_BACKLOG and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _done(self, task: asyncio.Task[Any], req: Any, t_dec: float) -> None:
        if task is not self.waiting or self.ended.done():
            return  # the connection ended meanwhile
        self.waiting = None
        try:
            self._answer(req, task.result(), t_dec)  # raises what the service raised
        except BaseException as e:
            self._end(e)
            return
        self._next()

    def _begun_answer(self, resp: Any, err: BaseException | None) -> None:
        """``answer`` of the request ``service.begin`` started: called by the store's
        callback that ended its decision (inside the Raft apply loop, for one)."""
        begun = self.waiting
        if not isinstance(begun, _Begun) or self.ended.done():
            return  # the connection ended meanwhile: nothing is written
        self.waiting = None
        try:
            if err is not None:
                raise err  # what handle() would have raised
            self._answer(begun.req, resp, begun.t_dec)
        except BaseException as e:
            self._end(e)
            return
        if self.backlog:
            # Requests the validator sent ahead start on the next loop pass, outside
            # the store's callback.
            self.waiting = _Begun(None, 0.0)
            self.loop.call_soon(self._resume, self.waiting)
        elif not self.serving:
            # Answered inside begin_commit (serving): the requests read with this one
            # are still to be served, and _serve's caller looks at the end of stream.
            self._after()

    def _resume(self, marker: _Begun) -> None:
        if self.waiting is marker and not self.ended.done():
            self.waiting = None
            self._next()

    def _next(self) -> None:
        """After an answer: the requests queued behind it, then an end of stream seen
        meanwhile, or reading resumed."""
        try:
            backlog, self.backlog = self.backlog, []
            self.t_in = time.perf_counter()
            self._serve(backlog)
        except BaseException as e:
            self._end(e)
            return
        self._after()

    def _after(self) -> None:
        # (Answers held back by a full write buffer: resume_writing comes back here.)
        if self.waiting is None and not self.write_paused and not self.ended.done():
            if self.eof:
                self._end(self._closed())
            elif self.paused:
                self.paused = False
                self.transport.resume_reading()

    def _answer(self, req: Any, resp: Any, t_dec: float) -> None:
        dialer = self.dialer
        family = dialer.family
        t_done = time.perf_counter()
        self.transport.write(
            self.session.seal(proto.encode_delimited(proto.encode_response(resp, family)))
        )
        if dialer.metrics is not None:
            dialer.answered(type(req), self.t_in, t_dec, t_done, time.perf_counter())
        self.t_in = time.perf_counter()
