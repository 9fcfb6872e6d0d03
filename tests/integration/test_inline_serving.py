"""The inline request loop of a validator connection (``nebula.aio.conn._InlineServing``).

A service that decides without waiting (a native key and the local store) is answered
inside the socket callback: no task per request.  A request that waits after all
continues in a task and the requests behind it keep their order; a flood pauses reading;
stopping the dialer while a request waits releases nothing.  A real Dialer against the
Python validator side, over TCP (SecretConnection) and a Unix socket, on uvloop.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from nebula import proto
from nebula.aio.conn import Dialer, _finish, _InlineServing
from nebula.aio.validator_side import PrivvalListener, SignerConnection
from nebula.backends.native import NativeBackend
from nebula.config import Endpoint
from nebula.crypto.keys import Ed25519Key
from nebula.errors import BackendError, ProtocolError
from nebula.guard import Decision, SignRecord
from nebula.service import SigningService
from nebula.state.base import SignLater
from nebula.state.local import LocalStore
from nebula.types import (
    PingRequest,
    Resolver,
    SignVoteRequest,
    WireFamily,
)
from tests.support.ports import free_ports
from tests.support.votes import vote

CHAIN = "inline-chain"
FAMILY = WireFamily.V0_38
KEY = Ed25519Key.from_seed(bytes(range(32)))


def signed_request(h: int) -> bytes:
    return proto.encode_delimited(proto.encode_request(SignVoteRequest(vote(h), CHAIN), FAMILY))


class GatedStore(LocalStore):
    """The local store, except that a commit at a gated height waits for its gate."""

    def __init__(self, path: Path, gated: set[int]) -> None:
        super().__init__(path)
        self.gated = gated
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def commit(
        self, chain_id: str, record: SignRecord, sign_later: SignLater | None = None
    ) -> Decision:
        if record.height in self.gated:
            self.waiting.set()
            await self.gate.wait()
        return await super().commit(chain_id, record, sign_later)


def _run(body: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(body(), 30))


def _address(tmp_path: Path, transport: str) -> tuple[str, Endpoint]:
    if transport == "unix":
        path = str(tmp_path / "pv.sock")
        return f"unix://{path}", Endpoint("unix", path=path)
    (port,) = free_ports(1)
    return f"tcp://127.0.0.1:{port}", Endpoint("tcp", host="127.0.0.1", port=port)


async def _connected(
    tmp_path: Path, transport: str, store: LocalStore, backend: NativeBackend | None = None
) -> tuple[PrivvalListener, Dialer, SignerConnection]:
    addr, endpoint = _address(tmp_path, transport)
    listener = PrivvalListener(addr, FAMILY)
    await listener.start()
    service = SigningService(CHAIN, FAMILY, backend or NativeBackend(KEY), store)
    assert service.inline
    dialer = Dialer(endpoint, service, FAMILY, identity_seed=bytes(32))
    dialer.start()
    return listener, dialer, await listener.accept()


async def _responses(conn: SignerConnection, n: int) -> list[Any]:
    return [proto.decode_response(await conn._read_message(), FAMILY) for _ in range(n)]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_an_inline_service_is_answered_without_a_task_per_request(
    tmp_path: Path, transport: str
) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        created: list[Any] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task:
            created.append(coro)
            return asyncio.Task(coro, loop=loop, **kw)

        listener, dialer, conn = await _connected(
            tmp_path, transport, LocalStore(tmp_path / "s.json")
        )
        try:
            await conn.request(PingRequest())
            assert isinstance(dialer._writer.transport.get_protocol(), _InlineServing)
            loop.set_task_factory(factory)
            for h in range(1, 21):
                resp = await conn.request(SignVoteRequest(vote(h), CHAIN))
                assert resp.error is None
                assert KEY.verify(proto.vote_sign_bytes(CHAIN, resp.vote), resp.vote.signature)
            loop.set_task_factory(None)
            # Every request was answered in the socket callback: no task of the signer's
            # (the validator side's request() runs in tasks of its own).
            assert [c for c in created if c.cr_code.co_filename.endswith("conn.py")] == []
            assert dialer.service.store.last(CHAIN).height == 20
        finally:
            loop.set_task_factory(None)
            await dialer.stop()
            await listener.close()

    _run(body)


def test_without_the_stream_buffer_the_connection_keeps_the_streams_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python whose StreamReader has no ``_buffer`` (the inline loop takes it over):
    the connection is served by the streams loop, every request answered."""
    import nebula.aio.conn as conn_mod

    monkeypatch.setattr(conn_mod, "_stream_buffer", lambda reader: None)

    async def body() -> None:
        listener, dialer, conn = await _connected(tmp_path, "tcp", LocalStore(tmp_path / "s"))
        try:
            for h in range(1, 6):
                resp = await conn.request(SignVoteRequest(vote(h), CHAIN))
                assert resp.error is None
                assert KEY.verify(proto.vote_sign_bytes(CHAIN, resp.vote), resp.vote.signature)
            assert not isinstance(dialer._writer.transport.get_protocol(), _InlineServing)
            assert dialer.service.store.last(CHAIN).height == 5
        finally:
            await dialer.stop()
            await listener.close()

    _run(body)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_waiting_request_continues_in_a_task_and_the_ones_behind_it_keep_their_order(
    tmp_path: Path, transport: str
) -> None:
    async def body() -> None:
        store = GatedStore(tmp_path / "s.json", gated={2})
        listener, dialer, conn = await _connected(tmp_path, transport, store)
        try:
            # Heights 1..5 in one write: 1 is answered inline, 2 waits, 3..5 queue.
            await conn.send_raw(b"".join(signed_request(h) for h in range(1, 6)))
            first = await _responses(conn, 1)
            assert first[0].vote.height == 1
            await asyncio.wait_for(store.waiting.wait(), 5)
            with pytest.raises(TimeoutError):  # nothing overtakes the waiting request
                await asyncio.wait_for(conn._read_message(), 0.3)
            store.gate.set()
            rest = await _responses(conn, 4)
            assert [r.vote.height for r in rest] == [2, 3, 4, 5]
            for r in first + rest:
                assert r.error is None
                assert KEY.verify(proto.vote_sign_bytes(CHAIN, r.vote), r.vote.signature)
            # The connection goes on inline after the waiting request.
            resp = await conn.request(SignVoteRequest(vote(6), CHAIN))
            assert resp.error is None and store.last(CHAIN).height == 6
        finally:
            await dialer.stop()
            await listener.close()

    _run(body)


def test_an_end_of_stream_behind_a_waiting_request_waits_for_its_answer(tmp_path: Path) -> None:
    """A validator that sends and then shuts down its writing half still gets every
    answer due (as with the streams loop); then the signer closes."""

    async def body() -> None:
        store = GatedStore(tmp_path / "s.json", gated={1})
        listener, dialer, conn = await _connected(tmp_path, "tcp", store)
        try:
            await conn.send_raw(signed_request(1) + signed_request(2))
            conn.writer.write_eof()
            await asyncio.wait_for(store.waiting.wait(), 5)
            await asyncio.sleep(0.1)  # the end of stream has reached the signer
            store.gate.set()
            got = await _responses(conn, 2)
            assert [r.vote.height for r in got] == [1, 2]
            assert all(r.error is None for r in got)
            with pytest.raises(ProtocolError):  # then the signer closes
                await asyncio.wait_for(conn._read_message(), 5)
        finally:
            await dialer.stop()
            await listener.close()

    _run(body)


def test_a_flood_behind_a_waiting_request_pauses_reading_and_is_answered_in_order(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        store = GatedStore(tmp_path / "s.json", gated={1})
        listener, dialer, conn = await _connected(tmp_path, "tcp", store)
        try:
            n = 150
            await conn.send_raw(b"".join(signed_request(h) for h in range(1, n + 1)))
            await asyncio.wait_for(store.waiting.wait(), 5)
            transport = dialer._writer.transport
            serving = transport.get_protocol()
            for _ in range(100):  # every request has arrived, and reading stopped
                if serving.paused:
                    break
                await asyncio.sleep(0.02)
            assert serving.paused and not transport.is_reading()
            store.gate.set()
            got = await _responses(conn, n)
            assert [r.vote.height for r in got] == list(range(1, n + 1))
            assert all(r.error is None for r in got)
            assert not serving.paused and transport.is_reading()
        finally:
            await dialer.stop()
            await listener.close()

    _run(body)


def test_stopping_the_dialer_while_a_request_waits_releases_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        store = GatedStore(tmp_path / "s.json", gated={1})
        listener, dialer, conn = await _connected(tmp_path, "tcp", store)
        try:
            await conn.send_raw(signed_request(1))
            await asyncio.wait_for(store.waiting.wait(), 5)
            await dialer.stop()
            store.gate.set()
            await asyncio.sleep(0.1)
            with pytest.raises(ProtocolError):  # closed, and no answer ever came
                await asyncio.wait_for(conn._read_message(), 1)
            assert store.last(CHAIN) is None  # the waiting commit was cancelled
        finally:
            await listener.close()

    _run(body)


@pytest.mark.parametrize("eof", [False, True], ids=["open", "closed-before-switch"])
def test_requests_the_stream_read_before_the_switch_are_answered(tmp_path: Path, eof: bool) -> None:
    """Bytes already in the stream's buffer when the inline loop takes over (a unix
    validator may send its first request before the signer's loop starts) are served; an
    end of stream the stream already saw ends the loop once they are answered (not at the
    idle timeout)."""

    async def body() -> None:
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        reader.feed_data(signed_request(1) + signed_request(2))
        if eof:
            reader.feed_eof()
        service = SigningService(CHAIN, FAMILY, NativeBackend(KEY), LocalStore(tmp_path / "s"))
        dialer = Dialer(Endpoint("unix", path="x"), service, FAMILY, identity_seed=bytes(32))
        dialer._running = True
        from nebula.aio.session import PlainSession

        serve = asyncio.ensure_future(dialer._serve_inline(reader, writer, PlainSession()))
        peer_r, peer_w = await asyncio.open_connection(sock=b)
        framer = proto.DelimitedReader(10240)
        got: list[bytes] = []
        while len(got) < 2:
            data = await asyncio.wait_for(peer_r.read(65536), 5)
            assert data, f"the signer closed after {len(got)} answers"
            got += framer.feed(data)
        # Both answered (the second one waits for the first one's write to share the
        # loop pass's flush), even when the end of stream came before the switch.
        heights = [proto.decode_response(m, FAMILY).vote.height for m in got]
        assert heights == [1, 2]
        if not eof:
            peer_w.close()  # the validator hangs up: the loop ends with why
        with pytest.raises(Exception, match="closed the connection"):
            await asyncio.wait_for(serve, 5)
        peer_w.close()

    _run(body)


def test_a_coroutine_started_by_hand_finishes_in_a_task_like_yield_from() -> None:
    """``_finish``: the task gets the coroutine's result, a cancellation of the task is
    thrown into the coroutine, and closing it unfinished closes the coroutine."""

    async def inner(fut: asyncio.Future[int], log: list[str]) -> int:
        try:
            return 2 * await fut
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append("finally")

    async def body() -> None:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        fut: asyncio.Future[int] = loop.create_future()
        coro = inner(fut, log)
        task = loop.create_task(_finish(coro, coro.send(None)))
        await asyncio.sleep(0)
        fut.set_result(21)
        assert await task == 42 and log == ["finally"]

        fut = loop.create_future()
        coro = inner(fut, log)
        task = loop.create_task(_finish(coro, coro.send(None)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["finally", "cancelled", "finally"]

        fut = loop.create_future()
        coro = inner(fut, log)
        gen = _finish(coro, coro.send(None))
        gen.send(None)
        gen.close()
        assert log[-1] == "finally" and coro.cr_frame is None  # closed, not leaked

    _run(body)


class CallsBack(LocalStore):
    """The local store offering ``begin_commit`` (as the Raft store does): ``commit_sync``
    decides, durable before it returns; the answer is given inside ``begin_commit``
    (``at_once``, which the contract allows a store to do) or on the next loop pass."""

    begins_commits = True

    def __init__(self, path: Path, at_once: bool) -> None:
        super().__init__(path)
        self.at_once = at_once
        self.begun = 0

    def begin_commit(
        self,
        chain_id: str,
        record: SignRecord,
        sign_later: SignLater | None,
        answer: Resolver,
    ) -> bool:
        decision = self.commit_sync(chain_id, record)
        self.begun += 1
        if self.at_once:
            answer(decision, None)
        else:
            asyncio.get_running_loop().call_soon(answer, decision, None)
        return True


@pytest.mark.parametrize("at_once", [True, False], ids=["answered-inside", "answered-later"])
def test_begun_decisions_pipelined_in_one_write_are_answered_in_order(
    tmp_path: Path, at_once: bool
) -> None:
    """Requests read together while a begun decision waits queue behind it and start, in
    order, once it is answered (on the next loop pass, outside the store's callback); a
    store that answers inside ``begin_commit`` is served too."""

    async def body() -> None:
        store = CallsBack(tmp_path / "s.json", at_once)
        listener, dialer, conn = await _connected(tmp_path, "tcp", store)
        try:
            assert dialer.service.begins
            await conn.send_raw(b"".join(signed_request(h) for h in range(1, 6)))
            got = await _responses(conn, 5)
            assert [r.vote.height for r in got] == [1, 2, 3, 4, 5]
            for r in got:
                assert r.error is None
                assert KEY.verify(proto.vote_sign_bytes(CHAIN, r.vote), r.vote.signature)
            resp = await conn.request(SignVoteRequest(vote(6), CHAIN))
            assert resp.error is None
            assert store.begun == 6 and store.last(CHAIN).height == 6
        finally:
            await dialer.stop()
            await listener.close()

    _run(body)


class FirstLater(CallsBack):
    """Answers the first begun decision on a later loop pass and every other one inside
    ``begin_commit`` (the contract allows both)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, at_once=True)

    def begin_commit(
        self, chain_id: str, record: SignRecord, sign_later: SignLater | None, answer: Any
    ) -> bool:
        decision = self.commit_sync(chain_id, record)
        self.begun += 1
        if self.begun == 1:
            asyncio.get_running_loop().call_later(0.2, answer, decision, None)
        else:
            answer(decision, None)
        return True


def test_requests_queued_before_the_end_of_stream_are_all_answered(tmp_path: Path) -> None:
    """Four requests in one write, then the validator shuts down its writing half: the
    first waits for its answer, the other three queue behind it.  Once it is answered the
    queue is served; the second is answered inside ``begin_commit``, which must not end
    the connection (the end of stream was seen) before the third and fourth are served
    (found in review: ``_begun_answer`` ended it from inside ``_serve``)."""

    async def body() -> None:
        store = FirstLater(tmp_path / "s.json")
        listener, dialer, conn = await _connected(tmp_path, "tcp", store)
        try:
            assert dialer.service.begins
            await conn.send_raw(b"".join(signed_request(h) for h in range(1, 5)))
            conn.writer.write_eof()
            got = await _responses(conn, 4)
            assert [r.vote.height for r in got] == [1, 2, 3, 4]
            assert all(r.error is None for r in got)
            assert store.begun == 4
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ProtocolError)):
                await conn._read_message()  # then the connection ends
        finally:
            await dialer.stop()
            await listener.close()

    _run(body)


class FailingKey(NativeBackend):
    """A key that signs without waiting, except that it fails (a token pulled out)."""

    def sign_sync(self, msg: bytes) -> bytes:
        raise BackendError("the key is gone")


def test_a_key_that_fails_on_a_begun_request_is_answered_with_an_error(tmp_path: Path) -> None:
    """A backend error while a request is begun is answered as :meth:`handle` answers it
    (a RemoteSignerError; nothing signed, nothing stored), and the connection stays up
    (found in review: it used to end the connection)."""

    async def body() -> None:
        store = CallsBack(tmp_path / "s.json", at_once=False)
        listener, dialer, conn = await _connected(tmp_path, "tcp", store, FailingKey(KEY))
        try:
            assert dialer.service.begins
            for h in (1, 2):
                resp = await conn.request(SignVoteRequest(vote(h), CHAIN))
                assert resp.error is not None and "the key is gone" in resp.error.description
                assert not resp.vote.signature
            assert dialer.connects == 1 and store.begun == 0 and store.last(CHAIN) is None
        finally:
            await dialer.stop()
            await listener.close()

    _run(body)
