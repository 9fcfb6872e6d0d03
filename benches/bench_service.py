"""The whole signing path in memory (pytest-benchmark).

decode the request -> ``SigningService.handle`` (native Ed25519 backend) -> encode the
response, for fresh consecutive heights, with:

* ``local``: the real :class:`~nebula.state.local.LocalStore` (two mirrored
  ``pwrite`` + ``fdatasync`` per signature), and
* ``memory``: a store that runs the same check-and-set (:func:`nebula.guard.apply`) but
  writes nothing, to isolate the cost of durability.

``handle`` is driven without an event loop: with these stores and a synchronous backend
it never suspends, exactly as in the daemon's serve loop.  (The protobuf kernels alone, compiled against
pure, are in ``bench_proto.py``.)

Run timed with ``python -m pytest benches/bench_service.py --benchmark-enable``; the
normal suite runs each once as a smoke test.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from nebula import proto
from nebula.backends.native import NativeBackend
from nebula.bench.workload import Item, plan
from nebula.crypto import keys
from nebula.guard import Decision, SignRecord, apply
from nebula.service import SigningService
from nebula.state.base import SignLater, SignStore, SingleNodeStore
from nebula.state.local import LocalStore
from nebula.types import SignedProposalResponse, SignedVoteResponse, WireFamily

CHAIN = "bench-chain"
FAMILY = WireFamily.V1_0
ROUNDS = 2000
WARMUP = 200


class MemoryStore(SingleNodeStore):
    """The local store's decision without the file: guard.apply on a dict."""

    def __init__(self) -> None:
        self._states: dict[str, SignRecord] = {}

    def last(self, chain_id: str) -> SignRecord | None:
        return self._states.get(chain_id)

    def all(self) -> dict[str, SignRecord]:
        return dict(self._states)

    async def raise_to(self, chain_id: str, record: SignRecord) -> bool:
        cur = self._states.get(chain_id)
        if cur is not None and record.hrs <= cur.hrs:
            return False
        self._states[chain_id] = record
        return True

    async def commit(
        self, chain_id: str, record: SignRecord, sign_later: SignLater | None = None
    ) -> Decision:
        assert sign_later is None  # (the daemon gives a signing thread to Raft stores only)
        new, decision = apply(self._states.get(chain_id), record)
        if new is not None:
            self._states[chain_id] = new
        return decision


def _drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that completes without suspending; fail loudly if it suspends."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the signing path suspended: it needs an event loop")


def _items(key: keys.SigningKey, kinds: tuple[str, ...]) -> Iterator[Item]:
    pool = plan(
        CHAIN,
        FAMILY,
        start_height=1,
        count=3 * (ROUNDS + WARMUP + 10),
        validator_address=key.address,
    )
    return iter([it for it in pool if it.kind in kinds])


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path) -> SignStore:
    if request.param == "local":
        return LocalStore(tmp_path / "state.json")
    return MemoryStore()


def _service_bench(benchmark, store: SignStore, kinds: tuple[str, ...]) -> None:
    key = keys.generate("ed25519")
    service = SigningService(CHAIN, FAMILY, NativeBackend(key), store)
    items = _items(key, kinds)
    decode, encode = proto.decode_request, proto.encode_response

    def one(msg: bytes) -> bytes:
        return encode(_drive(service.handle(decode(msg, FAMILY))), FAMILY)

    last: list[Item] = []

    def setup() -> tuple[tuple[bytes], dict[str, Any]]:
        item = next(items)
        last[:] = [item]
        return (item.wire[proto.decode_uvarint(item.wire)[1] :],), {}

    out = benchmark.pedantic(one, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    item = last[0]
    resp = proto.decode_response(out, FAMILY)
    assert resp.error is None
    if isinstance(resp, SignedProposalResponse):
        assert key.verify(item.sign_bytes, resp.proposal.signature)
    else:
        assert isinstance(resp, SignedVoteResponse)
        assert key.verify(item.sign_bytes, resp.vote.signature)
        if item.ext_sign_bytes:
            assert key.verify(item.ext_sign_bytes, resp.vote.extension_signature)
    assert store.last(CHAIN) is not None and store.last(CHAIN).height == item.height


def test_bench_service_prevote(benchmark, store: SignStore) -> None:
    """SignVoteRequest (prevote) -> SignedVoteResponse: one signature."""
    _service_bench(benchmark, store, ("prevote",))


def test_bench_service_precommit_with_extension(benchmark, store: SignStore) -> None:
    """A non-nil precommit with a 64-byte extension (v1.0): two signatures."""
    _service_bench(benchmark, store, ("precommit",))


def test_bench_service_proposal(benchmark, store: SignStore) -> None:
    _service_bench(benchmark, store, ("proposal",))


def test_bench_local_store_commit(benchmark, tmp_path) -> None:
    """The durable write alone: LocalStore.commit_sync of a fresh height."""
    store = LocalStore(tmp_path / "state.json")
    key = keys.generate("ed25519")
    sb = b"\x01" * 120
    sig = key.sign(sb)
    heights = iter(range(1, 10 * ROUNDS))

    def setup() -> tuple[tuple[SignRecord], dict[str, Any]]:
        return (SignRecord(next(heights), 0, 2, sb, sig),), {}

    d = benchmark.pedantic(
        lambda rec: store.commit_sync(CHAIN, rec), setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP
    )
    assert d.ok
