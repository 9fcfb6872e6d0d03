"""A fault-injecting TCP proxy for tests: ``127.0.0.1:listen -> 127.0.0.1:target``.

It runs its own asyncio loop in a background thread, so synchronous tests can use it::

    px = Proxy(listen_port, target_port).start()
    px.cut()        # close every connection and refuse (reset) new ones
    px.blackhole()  # accept, forward nothing, silently swallow what arrives
    px.delay(50)    # forward everything 50 ms late (order preserved)
    px.heal()       # forward again (connections that were blackholed are closed)
    px.stop()

Switching modes is synchronous: when ``cut()`` returns, no byte crosses any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from typing import Any, Self

PASS = "pass"
DROP = "drop"
BLACKHOLE = "blackhole"


class _Conn:
    def __init__(self, cw: asyncio.StreamWriter) -> None:
        self.client = cw
        self.upstream: asyncio.StreamWriter | None = None
        self.tainted = False
        self.tasks: list[asyncio.Task] = []

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()
        for t in self.tasks:
            t.cancel()


class ThreadedServer:
    """An asyncio TCP server on a loop of its own in a daemon thread (the proxies'
    shared machinery).  Subclasses provide ``_accept(reader, writer)`` and keep their
    connections, each with ``abort()``, in ``self._conns``."""

    thread_name = "server"

    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.host = host
        self._conns: Any = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.accepted = 0

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._run, name=f"{self.thread_name}-{self.listen_port}", daemon=True
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
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)
        self._loop = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        """Close with a reset (RST), as a refused connection looks to the dialer."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    def _call(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        if self._loop is None:
            raise RuntimeError("proxy not started")

        async def run() -> None:
            fn(*args)

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, self.listen_port, reuse_address=True)
            )
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

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.abort()
        self._conns.clear()


class Proxy(ThreadedServer):
    thread_name = "proxy"

    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        super().__init__(listen_port, target_port, host)
        self._mode = PASS
        self._delay = 0.0
        self._conns: set[_Conn] = set()

    # -- public API (any thread) -------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    def cut(self) -> None:
        self._call(self._set_mode, DROP, None)

    def blackhole(self) -> None:
        self._call(self._set_mode, BLACKHOLE, None)

    def heal(self) -> None:
        self._call(self._set_mode, PASS, 0.0)

    def delay(self, ms: float) -> None:
        self._call(self._set_mode, PASS, ms / 1000.0)

    # -- loop side ---------------------------------------------------------------------

    def _set_mode(self, mode: str, delay: float | None) -> None:
        self._mode = mode
        if delay is not None:
            self._delay = delay
        if mode == DROP:
            for c in list(self._conns):
                c.abort()
            self._conns.clear()
        elif mode == BLACKHOLE:
            for c in self._conns:
                c.tainted = True
        elif mode == PASS:
            for c in [c for c in self._conns if c.tainted]:
                c.abort()
                self._conns.discard(c)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == DROP:
            self._reset(writer)
            return
        conn = _Conn(writer)
        self._conns.add(conn)
        if self._mode == BLACKHOLE:
            conn.tainted = True
        else:
            try:
                ur, uw = await asyncio.open_connection(self.host, self.target_port)
            except OSError:
                self._conns.discard(conn)
                self._reset(writer)
                return
            if conn not in self._conns:  # cut while connecting
                uw.transport.abort()
                return
            conn.upstream = uw
            conn.tasks.append(asyncio.ensure_future(self._pump(conn, ur, writer)))
        conn.tasks.append(asyncio.ensure_future(self._pump(conn, reader, conn.upstream)))

    async def _pump(
        self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, dst)) if dst is not None else None
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if conn.tainted or self._mode != PASS or dst is None:
                    conn.tainted = True
                    continue  # swallowed
                queue.put_nowait((time.monotonic() + self._delay, data))
            await queue.join()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if sender is not None:
                sender.cancel()
            if not conn.tainted:
                conn.abort()
                self._conns.discard(conn)

    @staticmethod
    async def _send(queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                dst.write(data)
                await dst.drain()
            except OSError:
                return
            finally:
                queue.task_done()
