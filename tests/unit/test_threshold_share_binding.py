"""A follower's threshold share covers only the sign bytes of the decision it checked
(found in review, rev-guard).

The guard decides on a record's (height, round, step) and stores whatever sign bytes the
record carries; a follower shares over ``rec.sign_bytes`` and ``rec.ext_sign_bytes``.
Nothing tied those bytes to the height/round/step (or the chain) the guard looked at, and
the extension sign bytes were not looked at at all: one compromised member acting as
leader could have t-1 honest followers share over a conflicting vote for a height/round/
step the validator already signed - a whole-key signature, i.e. a double sign, although
no member but one was compromised (the premise of threshold signing).
"""

from __future__ import annotations

from nebula import proto
from nebula.crypto.threshold import split
from nebula.guard import SignRecord
from nebula.raft import commands
from nebula.state.threshold import ThresholdShares
from nebula.types import BlockID, PartSetHeader, SignedMsgType, Timestamp, Vote

CHAIN = b"tbls-chain"
X = BlockID(b"\x0a" * 32, PartSetHeader(1, b"\x0b" * 32))
Y = BlockID(b"\x0c" * 32, PartSetHeader(1, b"\x0d" * 32))


def precommit(h: int, r: int, block: BlockID, ext: bytes = b"") -> Vote:
    return Vote(SignedMsgType.PRECOMMIT, h, r, block, Timestamp(1_700_000_000, 0), extension=ext)


def follower(applied: SignRecord) -> ThresholdShares:
    shares = split(None, 2, 3)
    return ThresholdShares(2, {CHAIN: shares[1]}, lambda c: applied, lambda i: 1)


def share(ts: ThresholdShares, rec: SignRecord):  # type: ignore[no-untyped-def]
    return ts._share_for(commands.encode_command(commands.OP_TSIGN, CHAIN, rec), 1)


# The validator already signed a precommit for X at 5/0.
SIGNED = SignRecord(5, 0, 3, proto.vote_sign_bytes(CHAIN.decode(), precommit(5, 0, X)), b"s")


def test_an_honest_record_gets_a_share() -> None:
    v = precommit(6, 0, Y, b"ext")
    rec = SignRecord(
        6,
        0,
        3,
        proto.vote_sign_bytes(CHAIN.decode(), v),
        ext_sign_bytes=proto.vote_extension_sign_bytes(CHAIN.decode(), v),
    )
    assert share(follower(SIGNED), rec) is not None


def test_no_share_for_sign_bytes_of_another_height_round_step() -> None:
    conflicting = proto.vote_sign_bytes(CHAIN.decode(), precommit(5, 0, Y))
    # Claims 6/0/2 (above the mark: the guard says ACCEPT), carries a precommit for 5/0.
    rec = SignRecord(6, 0, 2, conflicting)
    assert share(follower(SIGNED), rec) is None


def test_no_share_for_sign_bytes_of_another_chain() -> None:
    other = proto.vote_sign_bytes("other-chain", precommit(6, 0, Y))
    assert share(follower(SIGNED), SignRecord(6, 0, 3, other)) is None


def test_no_extension_share_over_a_conflicting_vote() -> None:
    v = precommit(6, 0, Y)
    honest = proto.vote_sign_bytes(CHAIN.decode(), v)
    conflicting = proto.vote_sign_bytes(CHAIN.decode(), precommit(5, 0, Y))
    rec = SignRecord(6, 0, 3, honest, ext_sign_bytes=conflicting)
    assert share(follower(SIGNED), rec) is None


def test_bound_to_accepts_every_honest_kind() -> None:
    from nebula.guard import bound_to

    c = CHAIN.decode()
    for typ, step in ((SignedMsgType.PREVOTE, 2), (SignedMsgType.PRECOMMIT, 3)):
        for block in (X, BlockID()):
            v = Vote(typ, 7, 2, block, Timestamp(1, 2))
            assert bound_to(c, 7, 2, step, proto.vote_sign_bytes(c, v)) is None
    from nebula.types import Proposal

    p = Proposal(height=7, round=2, pol_round=-1, block_id=X, timestamp=Timestamp(1, 2))
    assert bound_to(c, 7, 2, 1, proto.proposal_sign_bytes(c, p)) is None
    assert bound_to(c, 7, 2, 2, proto.proposal_sign_bytes(c, p)) is not None
    v = precommit(1, 0, X)  # height 1, round 0: zero fields are omitted
    assert (
        bound_to(
            c,
            1,
            0,
            3,
            proto.vote_sign_bytes(c, v),
            proto.vote_extension_sign_bytes(c, v),
        )
        is None
    )


def test_a_member_that_sent_a_bad_share_is_combined_last() -> None:
    """A member whose share failed once is tried after the others: with a good share at
    hand its next bad share is not picked, so no share-by-share check (a pairing per
    member) follows (noticed last session: it used to be tried first every time)."""
    from nebula.state.threshold import Share, digest

    shares = split(None, 2, 3)
    leader = ThresholdShares(1, {CHAIN: shares[0]}, lambda c: None, lambda i: 1)
    msg = proto.vote_sign_bytes(CHAIN.decode(), precommit(7, 0, X))
    good = Share(digest(msg), shares[2].sign_share(msg))
    forged = Share(digest(msg), shares[2].sign_share(b"something else"))
    blamed: list[int] = []
    for index in (10, 11):
        leader.expect(index)
        leader.pool[index][2] = forged  # member 2's share arrives first, and is bad
        leader.pool[index][3] = good
        sig, have = leader.combine(index, shares[0], msg, on_bad=blamed.append)
        assert sig is not None and shares[0].public.verify(msg, sig)
        leader.release(index)
    assert blamed == [2]  # found once; afterwards member 3's share goes first
    assert leader.bad == {2: 1}
