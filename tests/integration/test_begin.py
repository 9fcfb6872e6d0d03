"""``SigningService.begin``: a new decision started from a callback, on a real 3-member
Raft cluster (``RaftStore.begin_commit``), with the key signing on the loop or on the
native signing thread.

``begin`` takes only a new vote or proposal decision; everything else (a retry, a
conflict, another chain id, a follower, the chain's lock held) is left to ``handle``,
which answers it as before.  The answer comes from the store's callback, never from
``begin`` itself; a decision that times out answers the error and releases nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nebula import proto
from nebula.aio.conn import Dialer, _InlineServing
from nebula.aio.validator_side import PrivvalListener, SignerConnection
from nebula.backends.native import NativeBackend
from nebula.config import Endpoint
from nebula.crypto.keys import Ed25519Key
from nebula.errors import ProtocolError, ReplicationError
from nebula.service import SigningService
from nebula.state.raft import RaftStore
from nebula.types import (
    BlockID,
    PingRequest,
    Proposal,
    SignedMsgType,
    SignedVoteResponse,
    SignProposalRequest,
    SignVoteRequest,
    Timestamp,
    WireFamily,
)
from tests.integration.test_raft_store import leader_of, local_cluster, run, until
from tests.support.ports import free_ports
from tests.support.votes import BLOCK, vote

CHAIN = "begin-chain"
FAMILY = WireFamily.V1_0
KEY = Ed25519Key.from_seed(bytes(range(32)))


class Answers:
    """The ``answer`` callback of ``begin``: every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, BaseException | None]] = []

    def __call__(self, resp: Any, err: BaseException | None) -> None:
        self.calls.append((resp, err))

    async def one(self) -> tuple[Any, BaseException | None]:
        await until(lambda: len(self.calls) >= 1, 10, "an answer")
        await asyncio.sleep(0.05)
        assert len(self.calls) == 1, self.calls  # exactly once
        return self.calls[0]


def service_on(store: RaftStore, signer: str) -> SigningService:
    backend = NativeBackend(KEY)
    if signer == "worker":
        from nebula.crypto.signworker import SignWorker

        assert backend.use_worker(SignWorker())
    svc = SigningService(CHAIN, FAMILY, backend, store)
    assert svc.begins and not svc.inline
    return svc


def precommit(h: int, ext: bytes = b"ext") -> SignVoteRequest:
    v = vote(h, typ=SignedMsgType.PRECOMMIT)
    v.extension = ext
    return SignVoteRequest(v, CHAIN)


@pytest.mark.parametrize("signer", ["loop", "worker"])
def test_begin_decides_like_handle_and_answers_from_the_stores_callback(
    tmp_path: Path, signer: str
) -> None:
    async def go() -> None:
        async with local_cluster(tmp_path, 3) as (stores, _):
            leader = await leader_of(stores)
            svc = service_on(leader, signer)

            # A new prevote: taken, answered later (not inside begin), lock held meanwhile.
            ans = Answers()
            req = SignVoteRequest(vote(5), CHAIN)
            assert svc.begin(req, ans)
            assert ans.calls == []
            assert svc.lock.locked()
            other = Answers()
            assert not svc.begin(SignVoteRequest(vote(6), CHAIN), other)  # one at a time
            resp, err = await ans.one()
            assert err is None and other.calls == []
            assert not svc.lock.locked()
            assert isinstance(resp, SignedVoteResponse) and resp.error is None
            sig = resp.vote.signature
            assert KEY.verify(proto.vote_sign_bytes(CHAIN, req.vote), sig)
            assert resp.vote.timestamp == req.vote.timestamp
            for s in stores:  # decided through the log: every member holds it
                await until(lambda s=s: s.last(CHAIN).hrs == (5, 0, 2), 10, "applied")
            assert leader.last(CHAIN).signature == sig

            # The identical request again is a retry: handle answers it with the same
            # signature, from the state machine.
            assert not svc.begin(req, Answers())
            again = await svc.handle(req)
            assert again.error is None and again.vote.signature == sig
            # Another block at that HRS: handle refuses it; nothing signed.
            conflict = SignVoteRequest(
                vote(5, block=BlockID(b"\x99" * 32, BLOCK.part_set_header)), CHAIN
            )
            assert not svc.begin(conflict, Answers())
            refused = await svc.handle(conflict)
            assert refused.error is not None and refused.vote.signature == b""

            # A non-nil precommit with its extension (v1.0): both signatures.
            ans = Answers()
            pc = precommit(5)
            assert svc.begin(pc, ans)
            resp, err = await ans.one()
            assert err is None and resp.error is None
            assert KEY.verify(proto.vote_sign_bytes(CHAIN, pc.vote), resp.vote.signature)
            assert KEY.verify(
                proto.vote_extension_sign_bytes(CHAIN, pc.vote), resp.vote.extension_signature
            )
            assert leader.last(CHAIN).hrs == (5, 0, 3)

            # A proposal at the next height.
            ans = Answers()
            p = Proposal(
                type=SignedMsgType.PROPOSAL,
                height=6,
                round=0,
                pol_round=-1,
                block_id=BLOCK,
                timestamp=Timestamp(1_700_000_006, 0),
            )
            preq = SignProposalRequest(p, CHAIN)
            assert svc.begin(preq, ans)
            resp, err = await ans.one()
            assert err is None and resp.error is None
            assert KEY.verify(proto.proposal_sign_bytes(CHAIN, p), resp.proposal.signature)

            # Not this chain, a regression, a ping: handle's (it refuses or answers them).
            assert not svc.begin(SignVoteRequest(vote(7), "other-chain"), Answers())
            assert not svc.begin(SignVoteRequest(vote(4), CHAIN), Answers())
            assert not svc.begin(PingRequest(), Answers())
            assert leader.last(CHAIN).hrs == (6, 0, 1)

            # A follower is not authoritative: handle refuses there (NotLeader).
            follower = next(s for s in stores if s is not leader)
            fsvc = service_on(follower, "loop")
            assert not fsvc.begin(SignVoteRequest(vote(8), CHAIN), Answers())
            assert not fsvc.lock.locked()
            if signer == "worker":
                svc.backend._worker.close()  # type: ignore[attr-defined]

    run(go())


def test_a_begun_decision_that_times_out_answers_the_error_and_releases_nothing(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with local_cluster(tmp_path, proxied=True, common={"commit_timeout": 0.15}) as (
            stores,
            proxies,
        ):
            leader = await leader_of(stores)
            svc = service_on(leader, "loop")
            ans = Answers()
            assert svc.begin(SignVoteRequest(vote(1), CHAIN), ans)
            resp, err = await ans.one()
            assert err is None and resp.error is None
            for px in proxies.values():
                px.delay(250)
            ans = Answers()
            req = SignVoteRequest(vote(2), CHAIN)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert svc.begin(req, ans)
            resp, err = await ans.one()
            # What handle() raises: the connection is dropped, the node retries.
            assert resp is None and isinstance(err, ReplicationError)
            assert "outcome unknown" in str(err)
            assert loop.time() - t0 >= 0.14
            assert not svc.lock.locked()
            # The entry commits later; only a retry of the same vote gets its signature.
            await until(lambda: leader.last(CHAIN).hrs == (2, 0, 2), 5, "late commit")
            for px in proxies.values():
                px.heal()
            leader = await leader_of(stores)
            svc2 = service_on(leader, "loop")
            again = await svc2.handle(req)
            assert again.error is None
            assert again.vote.signature == leader.last(CHAIN).signature

    run(go())


def test_an_answer_that_raises_does_not_stop_the_raft_apply_loop(tmp_path: Path) -> None:
    """The answer runs inside the store's callback (for a decision, the apply of its
    entry): its failure is logged, and the cluster goes on deciding."""

    async def go() -> None:
        async with local_cluster(tmp_path, 3) as (stores, _):
            leader = await leader_of(stores)
            svc = service_on(leader, "loop")
            boom: list[int] = []

            def bad(resp: Any, err: BaseException | None) -> None:
                boom.append(1)
                raise RuntimeError("the connection's answer failed")

            assert svc.begin(SignVoteRequest(vote(1), CHAIN), bad)
            await until(lambda: boom == [1], 10, "the failing answer")
            assert not svc.lock.locked()
            ans = Answers()
            assert svc.begin(SignVoteRequest(vote(2), CHAIN), ans)
            resp, err = await ans.one()
            assert err is None and resp.error is None
            for s in stores:
                await until(lambda s=s: s.last(CHAIN).hrs == (2, 0, 2), 10, "applied")

    run(go())


# ---- over a validator connection ----------------------------------------------------------


async def _connected(svc: SigningService) -> tuple[PrivvalListener, Dialer, SignerConnection]:
    (port,) = free_ports(1)
    listener = PrivvalListener(f"tcp://127.0.0.1:{port}", FAMILY)
    await listener.start()
    dialer = Dialer(
        Endpoint("tcp", host="127.0.0.1", port=port), svc, FAMILY, identity_seed=bytes(32)
    )
    dialer.start()
    return listener, dialer, await listener.accept()


@pytest.mark.parametrize("signer", ["loop", "worker"])
def test_a_raft_service_answers_from_the_stores_callback_without_a_task_per_request(
    tmp_path: Path, signer: str
) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        created: list[Any] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task:
            created.append(coro)
            return asyncio.Task(coro, loop=loop, **kw)

        async with local_cluster(tmp_path, 3) as (stores, _):
            leader = await leader_of(stores)
            svc = service_on(leader, signer)
            listener, dialer, conn = await _connected(svc)
            try:
                await conn.request(PingRequest())
                assert isinstance(dialer._writer.transport.get_protocol(), _InlineServing)
                loop.set_task_factory(factory)
                for h in range(1, 11):
                    for req in (SignVoteRequest(vote(h), CHAIN), precommit(h)):
                        resp = await conn.request(req)
                        assert resp.error is None
                        assert KEY.verify(
                            proto.vote_sign_bytes(CHAIN, req.vote), resp.vote.signature
                        )
                # A retry goes to handle(), run by hand: answered from the state machine
                # without waiting, so without a task either.
                resp = await conn.request(precommit(10))
                assert resp.error is None
                loop.set_task_factory(None)
                mine = [c for c in created if c.cr_code.co_filename.endswith("conn.py")]
                assert mine == []
                assert leader.last(CHAIN).hrs == (10, 0, 3)
            finally:
                loop.set_task_factory(None)
                await dialer.stop()
                await listener.close()
                if signer == "worker":
                    svc.backend._worker.close()  # type: ignore[attr-defined]

    run(go())


def test_stopping_the_dialer_while_a_begun_decision_waits_writes_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        async with local_cluster(tmp_path, proxied=True, common={"commit_timeout": 0.5}) as (
            stores,
            proxies,
        ):
            leader = await leader_of(stores)
            svc = service_on(leader, "loop")
            listener, dialer, conn = await _connected(svc)
            try:
                assert (await conn.request(SignVoteRequest(vote(1), CHAIN))).error is None
                for px in proxies.values():
                    px.delay(250)
                await conn.send_raw(
                    proto.encode_delimited(
                        proto.encode_request(SignVoteRequest(vote(2), CHAIN), FAMILY)
                    )
                )
                await until(svc.lock.locked, 5, "the decision begun")
                await dialer.stop()
                with pytest.raises(ProtocolError):  # closed, and no answer ever came
                    await asyncio.wait_for(conn._read_message(), 2)
                # The decision ends in the store (here: it commits late) and frees the lock.
                await until(lambda: not svc.lock.locked(), 5, "the lock released")
            finally:
                for px in proxies.values():
                    px.heal()
                await listener.close()

    run(go())
