"""BLS-Raft in the deterministic simulation style: real raft-rs, real durable logs (MemFS),
real state machines and the real share hooks (:class:`nebula.state.threshold.ThresholdShares`)
in one process, over a seeded network that reorders and drops messages and partitions.

* The safety rule (t >= quorum), shown both ways on a 5-member cluster: a leader cut off
  with one follower gathers t = 2 shares for a decision that never commits while the
  majority signs a conflicting one - two valid signatures for one height/round/step -
  but with t = 3 the minority side never holds 3 shares.
* Seeded storms on 3 (2-of-3) and 5 (3-of-5) members: leader changes, partitions and
  conflicting proposals; every combined signature verifies against the group key and at
  most one message is ever released per (chain, height, round, step).
* A member whose share is wrong (not its own) is detected, named and excluded.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from nebula.crypto.keys import Bls12381Key
from nebula.crypto.threshold import KeyShare, split
from nebula.errors import ConfigError
from nebula.guard import Decision, SignRecord, Verdict
from nebula.raft import _core, commands
from nebula.raft.node import RaftNode
from nebula.raft.storage import RaftLog, SyncJob
from nebula.state.raft import SignStateMachine
from nebula.state.threshold import (
    Share,
    ThresholdShares,
    check_cluster,
    decode_shares,
    digest,
    encode_shares,
)
from tests.support.memfs import MemFS

CHAIN = b"tbls-sim"


def canon(h: int, r: int, s: int, label: bytes) -> bytes:
    """Canonical sign bytes of CHAIN at h/r/s for a block named ``label`` (followers
    share only over sign bytes bound to the decision's chain/height/round/step)."""
    import hashlib

    from nebula import proto
    from nebula.types import BlockID, PartSetHeader, Proposal, Timestamp, Vote

    bid = BlockID(hashlib.sha256(label).digest(), PartSetHeader(1, b"\x01" * 32))
    if s == 1:
        p = Proposal(height=h, round=r, pol_round=-1, block_id=bid, timestamp=Timestamp(1, 0))
        return proto.proposal_sign_bytes(CHAIN.decode(), p)
    return proto.vote_sign_bytes(CHAIN.decode(), Vote(s - 1, h, r, bid, Timestamp(1, 0)))


SEEDS = [int(s) for s in os.environ.get("NEBULA_SIM_SEEDS", "1,2,3,4,5,6").split(",")]


class Member:
    def __init__(self, net: TNet, i: int, share: KeyShare) -> None:
        self.id = i
        self.share = share
        self.sm = SignStateMachine()
        self.node: RaftNode
        self.ts = ThresholdShares(
            i,
            {CHAIN: share},
            lambda c: self.sm.states.get(c),
            lambda x: self.node.term_at(x),
        )

        def send(to: int, payload: bytes) -> bool:
            net.queue.append((i, to, payload))
            return True

        e = 5 + 2 * i
        self.node = RaftNode(
            i,
            RaftLog(f"/n{i}", fs=net.fs),
            self.sm,
            send,
            peers=list(net.ids),
            election_tick=e,
            min_election_tick=e,
            max_election_tick=e + 1,
            heartbeat_tick=1,
            on_send=self._on_send(net),
            on_receive=self.ts.on_receive,
            on_append=self.ts.on_append,
            # RaftStore(sync_off_loop=True): a leader's syncs run off the loop (here every
            # one of them, not only those of several entries).
            offload=net.offloader if net.offload else None,
            offload_min_entries=1,
        )

    def _on_send(self, net: TNet) -> Callable[[int, int, bytes], bytes]:
        def hook(to: int, mtype: int, payload: bytes) -> bytes:
            out = self.ts.on_send(to, mtype, payload)
            if out is not payload:  # shares left this member: record them (the auditor)
                for index, sh in decode_shares(_core.message_info(out)[9]):
                    net.shares_out.setdefault(sh.msg_digest, set()).add(self.id)
                    del index
            return out

        return hook


class TNet:
    """Members over a seeded network; ``cut`` partitions, ``deliver`` shuffles."""

    def __init__(
        self,
        n: int,
        t: int,
        seed: int,
        *,
        shares: list[KeyShare] | None = None,
        offload: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.offload = offload
        self.jobs: list[tuple[SyncJob, Callable[[], None]]] = []
        self.offloaded = 0
        self.whole = Bls12381Key((1 + self.rng.randrange(2**250)).to_bytes(32, "big"))
        self.ids = list(range(1, n + 1))
        self.fs = MemFS()
        self.queue: list[tuple[int, int, bytes]] = []
        self.groups: list[set[int]] | None = None
        self.shares_out: dict[bytes, set[int]] = {}  # message digest -> members that shared
        sh = shares or split(
            self.whole.secret_bytes(), t, n, randbelow=lambda k: self.rng.randrange(k)
        )
        self.pub = sh[0].public
        self.members = {i: Member(self, i, sh[i - 1]) for i in self.ids}
        self.released: dict[tuple[int, int, int], set[bytes]] = {}
        self.bad: list[int] = []

    def linked(self, a: int, b: int) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)

    def offloader(self, work: SyncJob, done: Callable[[], None]) -> None:
        """A sync off the loop: finished later, between deliveries (``deliver``)."""
        self.jobs.append((work, done))
        self.offloaded += 1

    def deliver(self, drop: float = 0.0, limit: int = 20_000) -> None:
        for _ in range(limit):
            if self.jobs and (not self.queue or self.rng.random() < 0.3):
                work, done = self.jobs.pop(self.rng.randrange(len(self.jobs)))
                work.run()
                done()
                continue
            if not self.queue:
                return
            k = self.rng.randrange(len(self.queue)) if self.rng.random() < 0.3 else 0
            frm, to, payload = self.queue.pop(k)
            if not self.linked(frm, to) or self.rng.random() < drop:
                continue
            m = self.members[to].node
            m.receive(frm, payload)
            m.process()
        raise AssertionError("messages never settled")

    def tick(self, n: int = 1, drop: float = 0.0) -> None:
        for _ in range(n):
            for m in self.members.values():
                m.node.tick()
                m.node.process()
            self.deliver(drop)

    def leader(self, among: set[int] | None = None) -> Member:
        for _ in range(300):
            for i, m in self.members.items():
                if m.node.authoritative and (among is None or i in among):
                    return m
            self.tick()
        raise AssertionError("no leader")

    def propose(self, m: Member, h: int, r: int, s: int, sb: bytes) -> list[Any]:
        """Propose a TSIGN; once applied on ``m``, combine like RaftStore does (the same
        ThresholdShares.combine) and record the release."""
        rec = SignRecord(h, r, s, sb)
        out: list[Any] = []

        def resolve(res: Any, err: BaseException | None) -> None:
            out.append((res, err))

        _term, index = m.node.propose(
            commands.encode_command(commands.OP_TSIGN, CHAIN, rec), resolve
        )
        m.ts.expect(index)  # as RaftStore does once the entry is on its way
        m.node.process()
        out.append(index)
        return out

    def finish(self, m: Member, pending: list[Any]) -> bytes | None:
        if len(pending) < 2:
            return None
        index, (res, err) = pending[0], pending[1]
        if err is not None or not isinstance(res, Decision) or res.verdict == Verdict.REFUSE:
            return None
        msg = res.record.sign_bytes
        sig, _n = m.ts.combine(index, m.share, msg, on_bad=self.bad.append)
        if sig is not None:
            assert self.pub.verify(msg, sig)
            assert sig == self.whole.sign(msg)
            self.released.setdefault(res.record.hrs, set()).add(msg)
        return sig


def _minority_scenario(t: int) -> tuple[int, int, bool]:
    """5 members; the leader and one follower are cut off from the other three.  Returns
    (shares of the minority's decision X, shares of the majority's Y, both combinable)."""
    net = TNet(5, t, seed=7)
    old = net.leader()
    friend = next(i for i in net.ids if i != old.id)
    net.groups = [{old.id, friend}, set(net.ids) - {old.id, friend}]
    x = canon(10, 0, 2, b"block X")
    p_old = net.propose(old, 10, 0, 2, x)
    net.tick(3)
    # The majority elects a leader and decides a conflicting Y at the same height/round/step.
    new = net.leader(among=set(net.ids) - {old.id, friend})
    y = canon(10, 0, 2, b"block Y")
    p_new = net.propose(new, 10, 0, 2, y)
    net.tick(3)
    sig_y = net.finish(new, p_new)
    assert sig_y is not None and net.released[(10, 0, 2)] == {y}
    # What the cut-off leader holds for X: its own share and its follower's.
    held_x = 1 + len(old.ts.candidates(p_old[0], digest(x), False))
    combinable = held_x >= t
    if combinable:
        # A compromised old leader could combine them: a valid second signature.
        # (the same combination the leader runs: ThresholdShares.combine)
        forged, _n = old.ts.combine(p_old[0], old.share, x)
        assert forged is not None and net.pub.verify(x, forged)
    # Nebula itself never releases X: it did not commit.
    assert len(p_old) == 1 or p_old[1][1] is not None or p_old[1][0].verdict == Verdict.REFUSE
    net.groups = None
    net.tick(20)
    assert net.finish(old, p_old) is None
    return held_x, len(net.shares_out.get(digest(y), ())) + 1, combinable


def test_the_safety_rule_t_below_quorum_lets_a_minority_sign_t_at_quorum_does_not() -> None:
    held, _, combinable = _minority_scenario(t=2)
    assert held == 2 and combinable  # t = 2 < quorum 3: two signatures at 10/0/2 possible
    held, y_shares, combinable = _minority_scenario(t=3)
    assert held == 2 and not combinable  # t = 3 = quorum: the minority never reaches t
    assert y_shares >= 3
    # And a cluster refuses t = 2 of 5.
    share = split(None, 2, 5)[0]
    with pytest.raises(ConfigError, match="below the Raft quorum 3"):
        check_cluster(share, 1, [1, 2, 3, 4, 5], "test")
    check_cluster(split(None, 3, 5)[0], 1, [1, 2, 3, 4, 5], "test")


@pytest.mark.parametrize("offload", [False, True], ids=["sync-inline", "sync-off-loop"])
@pytest.mark.parametrize("n,t", [(3, 2), (5, 3)])
@pytest.mark.parametrize("seed", SEEDS)
def test_storm_one_released_message_per_hrs_and_every_signature_verifies(
    n: int, t: int, seed: int, offload: bool
) -> None:
    net = TNet(n, t, seed, offload=offload)
    rng = net.rng
    open_: list[tuple[Member, list[Any]]] = []
    releases = 0
    for step in range(60):
        action = rng.random()
        if action < 0.15:
            a = set(rng.sample(net.ids, rng.randrange(1, n)))
            net.groups = [a, set(net.ids) - a]
        elif action < 0.3:
            net.groups = None
        lead = [m for m in net.members.values() if m.node.authoritative]
        if lead:
            m = rng.choice(lead)
            h = 1 + step // 3
            hrs = (h, rng.randrange(2), rng.choice((1, 2, 3)))
            # conflicting bytes at one HRS are likely: two variants per HRS
            sb = canon(*hrs, b"v%d" % rng.randrange(2))
            try:
                open_.append((m, net.propose(m, *hrs, sb)))
            except Exception:
                pass
        net.tick(rng.randrange(1, 4), drop=0.05)
        for m, p in list(open_):
            if len(p) > 1:
                open_.remove((m, p))
                if net.finish(m, p) is not None:
                    releases += 1
    net.groups = None
    net.tick(30)
    for m, p in open_:
        if net.finish(m, p) is not None:
            releases += 1
    assert releases > 0
    # What the store's tick does: the entries a member appended but will never acknowledge
    # (its own, as leader) are dropped below the applied index; nothing else is left.
    for m in net.members.values():
        m.ts.forget_below(m.node.applied - 64)
        assert m.ts.appended_count <= 64 + len(open_)
    for hrs, msgs in net.released.items():
        assert len(msgs) == 1, f"seed {seed}: two messages released at {hrs}: {msgs}"
    assert not net.bad
    assert (net.offloaded > 0) == offload


def test_a_member_with_a_wrong_share_is_named_and_excluded() -> None:
    whole = Bls12381Key.generate()
    good = split(whole.secret_bytes(), 3, 5)
    # Member 4 holds a share that is not its own (a corrupted file that skipped the
    # start-up check, a bug, a malicious member): its shares fail verification.
    wrong = KeyShare(4, (good[3].secret + 1) % (2**255), good[3].public)
    shares = [*good[:3], wrong, *good[4:]]
    net = TNet(5, 3, seed=11, shares=shares)
    net.whole = whole
    lead = net.leader()
    if lead.id == 4:  # (the leader's own share is never checked against the others')
        lead.node.transfer_leader(1)
        lead.node.process()
        net.tick(10)
        lead = net.leader()
    assert lead.id != 4
    # One good member is cut off: the leader hears member 4 and two good ones, so member
    # 4's share is among the first t tried in most rounds.
    cut = next(i for i in net.ids if i not in (lead.id, 4))
    net.groups = [set(net.ids) - {cut}, {cut}]
    released = 0
    for h in range(1, 8):
        p = net.propose(lead, h, 0, 2, canon(h, 0, 2, b"sb"))
        net.tick(3)
        if net.finish(lead, p) is not None:
            released += 1
    assert released == 7
    # Member 4's share was checked only when the combined signature failed, then dropped
    # and named; never a good member's.
    assert 4 in net.bad and set(net.bad) == {4}
    assert lead.ts.bad[4] == len(net.bad)


def test_shares_for_entries_the_leader_does_not_wait_on_are_dropped() -> None:
    """A member floods the leader with shares for made-up entry indices (255 per
    acknowledgement): they used to fill the pool until its eviction dropped the real
    entry's honest shares, and nothing was released (found in review).  Only entries the
    leader proposed are pooled, one share per member; the real one still combines."""
    net = TNet(3, 2, seed=3)
    lead = net.leader()
    evil = next(m for m in net.members.values() if m is not lead)
    seen: list[tuple[int, int, bytes]] = []

    class Recorded(list):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:
            seen.append(item)
            super().append(item)

    net.queue = Recorded(net.queue)
    honest = canon(5, 0, 2, b"honest")
    pending = net.propose(lead, 5, 0, 2, honest)
    net.tick(3)
    assert len(pending) > 1  # committed and applied
    index = pending[0]
    ack = next(
        pl
        for f, t, pl in seen
        if f == evil.id
        and t == lead.id
        and _core.message_info(pl)[0] == _core.MSG_APPEND_RESPONSE
        and not _core.message_info(pl)[7]
    )
    fake = Share(b"\0" * 32, b"\0" * 96)
    for k in range(17):
        items = [((1 << 40) + k * 255 + i, fake) for i in range(255)]
        lead.ts.on_receive(evil.id, _core.message_with_context(ack, encode_shares(items)))
    # a second, different share for the real entry from the same member is dropped too
    lead.ts.on_receive(evil.id, _core.message_with_context(ack, encode_shares([(index, fake)])))
    assert set(lead.ts.pool) == {index}
    sig = net.finish(lead, pending)
    assert sig is not None and net.released[(5, 0, 2)] == {honest}
