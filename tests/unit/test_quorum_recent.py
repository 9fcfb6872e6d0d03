"""``RaftStore._quorum_recent`` (part of ``is_authoritative``, asked on every request)
keeps the time until which the majority it last found stays recent; its answers must be
exactly those of counting the voters heard within the window again at every call."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

import nebula.state.raft as raft_mod
from nebula.state.raft import RaftStore

WINDOW = 0.5


def recount(voters: list[int], me: int, heard: dict[int, float], now: float) -> bool:
    alive = sum(1 for v in voters if v == me or heard.get(v, -1e9) > now - WINDOW)
    return bool(voters) and alive * 2 > len(voters)


@pytest.mark.parametrize("seed", range(40))
def test_the_kept_deadline_answers_as_counting_again(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    clock = [100.0]
    monkeypatch.setattr(raft_mod.time, "monotonic", lambda: clock[0])
    heard: dict[int, float] = {}
    members = rng.choice([[1, 2, 3], [1, 2, 3, 4, 5], [1], [2, 3, 4]])  # me = 1 (or not)
    store = RaftStore.__new__(RaftStore)
    store.node_id = 1
    store._quorum_window = WINDOW
    store._quorum_until = 0.0
    store._node = SimpleNamespace(voters=list(members))
    store._transport = SimpleNamespace(last_heard=lambda p: heard.get(p))
    answers = set()
    for _ in range(400):
        r = rng.random()
        if r < 0.45:
            clock[0] += rng.choice([0.001, 0.01, 0.1, 0.3, 0.6])
        elif r < 0.9:
            heard[rng.choice([2, 3, 4, 5])] = clock[0]  # a frame from a peer, now
        else:
            # A membership change (the heard times stay); _on_membership forgets the
            # deadline (test_a_membership_change_counts_again).
            members = rng.choice([[1, 2, 3], [1, 2, 3, 4, 5], [1, 2], [2, 3, 4]])
            store._node.voters = list(members)
            store._quorum_until = 0.0
        got = store._quorum_recent()
        assert got == recount(members, 1, heard, clock[0]), (seed, clock[0], members, heard)
        answers.add(got)
    if members != [1]:
        assert answers == {True, False}  # both answers were reached


def test_a_membership_change_counts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [10.0]
    monkeypatch.setattr(raft_mod.time, "monotonic", lambda: clock[0])
    heard = {2: 10.0}
    store = RaftStore.__new__(RaftStore)
    store.node_id = 1
    store._quorum_window = WINDOW
    store._quorum_until = 0.0
    store._node = SimpleNamespace(voters=[1, 2, 3])
    store._transport = SimpleNamespace(last_heard=lambda p: heard.get(p), set_peers=lambda p: None)
    store._addrs = {}
    store._config_peers = frozenset()
    store._sm = SimpleNamespace(members={})
    assert store._quorum_recent()  # 1 and 2 of three
    # Five voters now: 1 and 2 are not a majority, though 2 is still recent.
    store._node.voters = [1, 2, 3, 4, 5]
    store._on_membership(0, 4, b"", [1, 2, 3, 4, 5])
    assert not store._quorum_recent()
