"""Signing round trips over real sockets to real ``nebula start`` processes (pytest-benchmark).

The bench is the validator (:class:`~nebula.bench.client.BlockingListener`): Nebula
dials it, and each round sends the next request of a proposal/prevote/precommit cycle
on consecutive heights and waits for the answer.  Targets: a single node over TCP
(SecretConnection) and over a unix socket, and a 3-node Raft cluster (skipped only when
``nebula.state.raft`` cannot be imported).  The last answer is verified; ``nebula
bench`` verifies every one.

Run timed with ``python -m pytest benches/bench_roundtrip.py --benchmark-enable``; the
normal suite runs each once as a smoke test.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

from nebula.bench.client import BlockingListener, ValidatorConnection
from nebula.bench.local import LocalSigners
from nebula.bench.runner import Verifier
from nebula.bench.workload import Item, plan
from nebula.crypto.keys import address_of
from nebula.types import PubKeyRequest, WireFamily

CHAIN = "bench-chain"
FAMILY = WireFamily.V1_0
ROUNDS = 3000
WARMUP = 300


class Target:
    """Running signers, the accepted connection, and the requests still to send."""

    def __init__(self, nodes: int, transport: str) -> None:
        self.signers = LocalSigners(
            nodes, chain_id=CHAIN, version=FAMILY.value, transport=transport
        )
        self.listener = BlockingListener(self.signers.listen_address, FAMILY)
        self.conn: ValidatorConnection | None = None
        self.items: Iterator[Item] = iter(())
        self.verifier: Verifier | None = None

    def start(self) -> Target:
        self.listener.start()
        self.signers.start()
        try:
            self.conn = self.listener.accept(60)
        except TimeoutError:
            raise RuntimeError(f"no signer connected:\n{self.signers.log_tails()}") from None
        self.conn.set_timeout(5)
        pk = self.conn.request(PubKeyRequest(CHAIN))
        self.verifier = Verifier(CHAIN, FAMILY, pk.key_type, pk.pub_key)
        self.items = iter(
            plan(
                CHAIN,
                FAMILY,
                start_height=1,
                count=2 * (ROUNDS + WARMUP),
                validator_address=address_of(pk.key_type, pk.pub_key),
            )
        )
        return self

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        self.signers.stop()


def _target(nodes: int, transport: str) -> Iterator[Target]:
    t = Target(nodes, transport)
    try:
        yield t.start()
    finally:
        t.close()


@pytest.fixture(scope="module")
def single_tcp() -> Iterator[Target]:
    yield from _target(1, "tcp")


@pytest.fixture(scope="module")
def single_unix() -> Iterator[Target]:
    yield from _target(1, "unix")


@pytest.fixture(scope="module")
def cluster3() -> Iterator[Target]:
    if importlib.util.find_spec("nebula.state.raft") is None:
        pytest.skip("nebula.state.raft is not importable yet: no Raft cluster to bench")
    yield from _target(3, "tcp")


def _roundtrips(benchmark, target: Target) -> None:
    conn, verifier = target.conn, target.verifier
    assert conn is not None and verifier is not None
    sent: list[Item] = []

    def setup() -> tuple[tuple[bytes], dict[str, Any]]:
        item = next(target.items)
        sent[:] = [item]
        return (item.wire,), {}

    msg, _ = benchmark.pedantic(conn.roundtrip, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    n, err = verifier.check(sent[0], msg)
    assert err is None and n >= 1


def test_bench_roundtrip_single_node_tcp(benchmark, single_tcp: Target) -> None:
    """One node, persist = "local" (fsync per signature), SecretConnection over TCP."""
    _roundtrips(benchmark, single_tcp)


def test_bench_roundtrip_single_node_unix(benchmark, single_unix: Target) -> None:
    """One node, persist = "local", plain unix socket."""
    _roundtrips(benchmark, single_unix)


def test_bench_roundtrip_cluster3_tcp(benchmark, cluster3: Target) -> None:
    """A 3-node Raft cluster (durable journal on every member), leader over TCP."""
    _roundtrips(benchmark, cluster3)
