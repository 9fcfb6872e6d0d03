"""A randomized run of both request paths of a Raft leader (``SigningService.begin`` and
``handle``) on a real 3-member cluster, under faults: every (chain, height, round) that
gets a signature gets exactly one, over one canonical message, and it is the one the
state machine holds.

Three chains share one native signing thread; two clients per chain race each other
with timestamps that vary (the "only the timestamp differs" rule) and, one request in
ten, another block (a conflict the guard must refuse).  Meanwhile proxies between the
members add delays around a 0.08 s commit timeout (decisions time out and may commit
later: they must release nothing) and leadership moves (NotLeader, and a new leader that
answers retries from the applied state).  Written in review of the callback answer path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from pathlib import Path
from typing import Any

import pytest

from nebula import proto
from nebula.backends.native import NativeBackend
from nebula.crypto.keys import Ed25519Key
from nebula.crypto.signworker import SignWorker
from nebula.errors import NebulaError
from nebula.service import SigningService
from nebula.state.raft import RaftStore
from nebula.types import BlockID, SignedVoteResponse, SignVoteRequest, Timestamp, WireFamily
from tests.integration.test_raft_store import leader_of, local_cluster, run
from tests.support.votes import BLOCK, vote

KEYS = {c: Ed25519Key.from_seed(bytes([i + 1]) * 32) for i, c in enumerate(["ca", "cb", "cc"])}
HEIGHTS = 30


@pytest.mark.parametrize("seed", range(1, 7))
def test_both_request_paths_release_only_the_state_machines_signature(
    tmp_path: Path, seed: int
) -> None:
    rnd = random.Random(seed)

    async def go() -> None:
        async with local_cluster(tmp_path, proxied=True, common={"commit_timeout": 0.08}) as (
            stores,
            proxies,
        ):
            await leader_of(stores)
            worker = SignWorker()
            services: dict[int, dict[str, SigningService]] = {}

            def service(store: RaftStore, chain: str) -> SigningService:
                per = services.setdefault(store.node_id, {})
                if chain not in per:
                    backend = NativeBackend(KEYS[chain])
                    assert backend.use_worker(worker)
                    per[chain] = SigningService(chain, WireFamily.V0_38, backend, store)
                return per[chain]

            # (chain, height, round) -> the signatures / canonical messages released
            sigs: dict[tuple[str, int, int], set[bytes]] = collections.defaultdict(set)
            msgs: dict[tuple[str, int, int], set[bytes]] = collections.defaultdict(set)
            stats: collections.Counter[str] = collections.Counter()

            async def client(chain: str, cid: int) -> None:
                for h in range(1, HEIGHTS):
                    for _attempt in range(6):
                        store = next((s for s in stores if s.is_authoritative()), None)
                        svc = service(store or rnd.choice(stores), chain)
                        v = vote(h)
                        v.timestamp = Timestamp(1_700_000_000 + h, rnd.randrange(3) * 1000)
                        if rnd.random() < 0.1:
                            v.block_id = BlockID(bytes([cid]) * 32, BLOCK.part_set_header)
                        req = SignVoteRequest(v, chain)
                        fut: asyncio.Future[tuple[Any, Any]] = (
                            asyncio.get_running_loop().create_future()
                        )

                        def answer(resp: Any, err: Any, fut: asyncio.Future = fut) -> None:
                            if not fut.done():
                                fut.set_result((resp, err))

                        if svc.begin(req, answer):
                            stats["begun"] += 1
                            resp, err = await fut
                        else:
                            try:
                                resp, err = await svc.handle(req), None
                            except NebulaError as e:
                                resp, err = None, e
                        if err is not None:
                            stats[type(err).__name__] += 1
                            await asyncio.sleep(rnd.random() * 0.02)
                            continue
                        assert isinstance(resp, SignedVoteResponse)
                        if resp.error is None:
                            key = (chain, h, 0)
                            sigs[key].add(resp.vote.signature)
                            msgs[key].add(proto.vote_sign_bytes(chain, resp.vote))
                            assert KEYS[chain].verify(
                                proto.vote_sign_bytes(chain, resp.vote), resp.vote.signature
                            )
                            stats["signed"] += 1
                        else:
                            stats["refused"] += 1
                        break

            async def faults() -> None:
                for i in range(40):
                    await asyncio.sleep(rnd.random() * 0.05)
                    if i % 10 == 5:
                        leader = next((s for s in stores if s.is_authoritative()), None)
                        if leader is not None:
                            with contextlib.suppress(NebulaError, TimeoutError):
                                await leader.transfer_leadership(timeout=1.0)
                    for px in proxies.values():
                        if rnd.random() < 0.5:
                            px.delay(rnd.choice([0, 0, 40, 80, 150]))
                for px in proxies.values():
                    px.heal()

            try:
                await asyncio.gather(faults(), *(client(c, i) for c in KEYS for i in (1, 2)))
            finally:
                worker.close()
            assert stats["signed"] > 0 and stats["begun"] > 0, stats
            for key, released in sigs.items():
                assert len(released) == 1, (key, released)
                assert len(msgs[key]) == 1, (key, msgs[key])
            # What the state machine holds for each chain's last decision is what left.
            leader = await leader_of(stores)
            for chain in KEYS:
                last = leader.last(chain)
                if last is not None and (chain, last.height, last.round) in sigs:
                    assert sigs[(chain, last.height, last.round)] == {last.signature}

    run(go(), timeout=120)
