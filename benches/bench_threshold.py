"""Threshold BLS12-381 costs per signature (pytest-benchmark): what BLS-Raft adds.

Run timed with ``python -m pytest benches/bench_threshold.py --benchmark-enable``; the
normal suite runs each once as a smoke test.  A 2-of-3 split, a 119-byte vote:

* ``share``: a member's signature share (H(m) and one G2 multiplication), what a follower
  computes on append;
* ``prepare``: what the leader does while the followers append (H(m), the group key's
  Miller loop);
* ``combine_prepared``: what is left once a share arrives (the follower's Lagrange term,
  the leader's own term, one Miller loop, the final exponentiation), verified;
* ``combine_prepared_t2_prescaled``: the same with the follower's share already multiplied
  by its Lagrange coefficient (what a 2-of-n cluster sends);
* ``combine_cold``: the same without the preparation (a retry with other sign bytes);
* ``precommit_pair_separately`` / ``precommit_pair_batched``: a precommit's vote and
  extension once both pre-scaled shares arrived: two verified combinations, or the two
  combined and verified with one pairing check (what the leader does);
* ``whole_sign`` / ``whole_verify``: the whole key, for comparison.
"""

from __future__ import annotations

import pytest

from nebula.crypto.keys import Bls12381Key
from nebula.crypto.threshold import split
from tests.support.vectors import h, load

_MSG = h(load("signatures_and_keys")["ed25519"]["signatures"][3]["message_hex"])


@pytest.fixture(scope="module")
def setup():
    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), 2, 3)
    return whole, shares, shares[0].public


def test_bench_share(benchmark, setup) -> None:
    whole, shares, pub = setup
    s = benchmark(shares[1].sign_share, _MSG)
    assert pub.verify_share(2, _MSG, s)


def test_bench_prepare(benchmark, setup) -> None:
    _whole, _shares, pub = setup
    benchmark(pub.prepare, _MSG)


def test_bench_combine_prepared(benchmark, setup) -> None:
    whole, shares, pub = setup
    got = {2: shares[1].sign_share(_MSG)}
    prep = pub.prepare(_MSG)
    own = (1, shares[0].secret)
    sig = benchmark(lambda: pub.combine(_MSG, got, own=own, prepared=prep))
    assert sig == whole.sign(_MSG)


def test_bench_combine_prepared_t2_prescaled(benchmark, setup) -> None:
    """t = 2 as the cluster runs it: the follower's share arrives pre-scaled."""
    whole, shares, pub = setup
    got = {2: shares[1].sign_share(_MSG, with_partner=1)}
    prep = pub.prepare(_MSG)
    own = (1, shares[0].secret)
    sig = benchmark(lambda: pub.combine(_MSG, got, own=own, prepared=prep, scaled=frozenset(got)))
    assert sig == whole.sign(_MSG)


def test_bench_combine_cold(benchmark, setup) -> None:
    whole, shares, pub = setup
    got = {2: shares[1].sign_share(_MSG)}
    own = (1, shares[0].secret)
    sig = benchmark(lambda: pub.combine(_MSG, got, own=own))
    assert sig == whole.sign(_MSG)


def test_bench_whole_sign(benchmark, setup) -> None:
    whole, _shares, _pub = setup
    assert whole.verify(_MSG, benchmark(whole.sign, _MSG))


def test_bench_whole_verify(benchmark, setup) -> None:
    whole, _shares, _pub = setup
    sig = whole.sign(_MSG)
    assert benchmark(whole.verify, _MSG, sig)


_EXT = b"vote extension sign bytes " * 4


def _pair(setup):
    whole, shares, pub = setup
    got = [{2: shares[1].sign_share(m, with_partner=1)} for m in (_MSG, _EXT)]
    return whole, pub, got, [frozenset(g) for g in got], (1, shares[0].secret)


def test_bench_precommit_pair_separately(benchmark, setup) -> None:
    whole, pub, got, scaled, own = _pair(setup)
    preps = [pub.prepare(_MSG), pub.prepare(_EXT)]

    def run() -> list[bytes | None]:
        return [
            pub.combine(m, g, own=own, prepared=p, scaled=sc)
            for m, g, p, sc in zip((_MSG, _EXT), got, preps, scaled, strict=True)
        ]

    assert benchmark(run) == [whole.sign(_MSG), whole.sign(_EXT)]


def test_bench_precommit_pair_batched(benchmark, setup) -> None:
    whole, pub, got, scaled, own = _pair(setup)
    prep = pub.prepare_batch([_MSG, _EXT])
    sigs = benchmark(
        lambda: pub.combine_many([_MSG, _EXT], got, own=own, prepared=prep, scaled=scaled)
    )
    assert sigs == [whole.sign(_MSG), whole.sign(_EXT)]


def test_bench_prepare_pair(benchmark, setup) -> None:
    """The batch's preparation (two H(m), two Miller loops, one G1 multiplication)."""
    _whole, _shares, pub = setup
    benchmark(pub.prepare_batch, [_MSG, _EXT])
