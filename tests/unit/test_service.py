"""The signing path in memory: native key, fsync'ed local store, every wire family."""

from __future__ import annotations

import asyncio

import pytest

from nebula import proto
from nebula.backends.native import NativeBackend
from nebula.crypto.keys import Ed25519Key, generate
from nebula.guard import SignRecord
from nebula.service import SigningService
from nebula.state.local import LocalStore
from nebula.types import (
    BlockID,
    PartSetHeader,
    PingRequest,
    PingResponse,
    Proposal,
    PubKeyRequest,
    SignBytesRequest,
    SignedMsgType,
    SignProposalRequest,
    SignVoteRequest,
    Timestamp,
    Vote,
    WireFamily,
)

CHAIN = "svc-chain"
BLOCK = BlockID(b"\xaa" * 32, PartSetHeader(1, b"\xbb" * 32))
OTHER = BlockID(b"\xcc" * 32, PartSetHeader(1, b"\xdd" * 32))


@pytest.fixture
def key() -> Ed25519Key:
    return Ed25519Key.from_seed(bytes(range(32)))


def make(tmp_path, key, family=WireFamily.V0_38) -> SigningService:
    return SigningService(CHAIN, family, NativeBackend(key), LocalStore(tmp_path / "s.json"))


def vote(h=1, r=0, typ=SignedMsgType.PREVOTE, block=BLOCK, ts=(1_700_000_000, 1), ext=b""):
    return Vote(
        type=typ,
        height=h,
        round=r,
        block_id=block,
        timestamp=Timestamp(*ts),
        validator_address=b"\x01" * 20,
        validator_index=0,
        extension=ext,
    )


def run(svc, req):
    return asyncio.run(svc.handle(req))


def test_ping_and_pubkey(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    assert isinstance(run(svc, PingRequest()), PingResponse)
    r = run(svc, PubKeyRequest(CHAIN))
    assert r.error is None and r.pub_key == key.public_key and r.key_type == "ed25519"
    bad = run(svc, PubKeyRequest("other-chain"))
    assert bad.error is not None and bad.pub_key == b""


def test_vote_is_signed_and_verifies(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    v = vote()
    r = run(svc, SignVoteRequest(v, CHAIN))
    assert r.error is None
    assert key.verify(proto.vote_sign_bytes(CHAIN, v), r.vote.signature)
    assert r.vote.extension_signature == b""


def test_identical_retry_gets_the_stored_signature(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    first = run(svc, SignVoteRequest(vote(), CHAIN))
    again = run(svc, SignVoteRequest(vote(), CHAIN))
    assert again.error is None and again.vote.signature == first.vote.signature


@pytest.mark.parametrize("retry_ts", [(1_700_000_000, 1), (1_700_000_005, 9)])
def test_an_imported_signature_of_another_key_is_never_handed_back(tmp_path, key, retry_ts) -> None:
    """A retry is answered with the stored signature. An imported state (CometBFT's
    priv_validator_state.json after a key change, or a damaged file) may hold one that
    is not this key's over these bytes: the retry is refused, nothing is handed back,
    and the mark stays (found in review: it was returned as it was)."""
    sb = proto.vote_sign_bytes(CHAIN, vote())
    other = Ed25519Key.from_seed(b"\x07" * 32)
    for bad_sig in (other.sign(sb), b"\x00" * 64):
        store = LocalStore(tmp_path / f"s{bad_sig[0]}.json")
        store.force_import(CHAIN, SignRecord(1, 0, 2, sb, bad_sig))
        svc = SigningService(CHAIN, WireFamily.V0_38, NativeBackend(key), store)
        r = run(svc, SignVoteRequest(vote(ts=retry_ts), CHAIN))
        assert r.error is not None and r.vote.signature == b""
        assert "does not verify" in r.error.description
        assert store.last(CHAIN).signature == bad_sig  # the mark is kept as it was
        # A later step is signed as usual.
        later = run(svc, SignVoteRequest(vote(typ=SignedMsgType.PRECOMMIT), CHAIN))
        assert later.error is None
    # This key's own signature, imported, is handed back (once checked).
    store = LocalStore(tmp_path / "good.json")
    store.force_import(CHAIN, SignRecord(1, 0, 2, sb, key.sign(sb)))
    svc = SigningService(CHAIN, WireFamily.V0_38, NativeBackend(key), store)
    for _ in range(2):
        r = run(svc, SignVoteRequest(vote(ts=retry_ts), CHAIN))
        assert r.error is None and r.vote.signature == key.sign(sb)


@pytest.mark.parametrize(
    ("key_type", "dst"),
    [("ed25519", None), ("secp256k1", None), ("bls12381", None), ("bls12381", b"OTHER_DST_")],
)
def test_a_retry_gets_its_own_stored_signature_for_every_key_type(tmp_path, key_type, dst) -> None:
    """The stored signature's check accepts what this key made (its own BLS DST too)."""
    k = generate(key_type) if dst is None else generate(key_type, bls_dst=dst)
    svc = SigningService(CHAIN, WireFamily.V1_0, NativeBackend(k), LocalStore(tmp_path / "s"))
    first = run(svc, SignVoteRequest(vote(), CHAIN))
    for ts in ((1_700_000_000, 1), (1_700_000_009, 3)):
        again = run(svc, SignVoteRequest(vote(ts=ts), CHAIN))
        assert again.error is None and again.vote.signature == first.vote.signature


def test_timestamp_only_difference_returns_stored_timestamp(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    first = run(svc, SignVoteRequest(vote(ts=(1_700_000_000, 1)), CHAIN))
    again = run(svc, SignVoteRequest(vote(ts=(1_700_000_005, 9)), CHAIN))
    assert again.error is None
    assert again.vote.signature == first.vote.signature
    assert again.vote.timestamp == Timestamp(1_700_000_000, 1)
    # The returned (stored) timestamp is what the signature covers.
    assert key.verify(proto.vote_sign_bytes(CHAIN, again.vote), again.vote.signature)


def test_conflicting_vote_is_refused_with_nothing_signed(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    run(svc, SignVoteRequest(vote(block=BLOCK), CHAIN))
    r = run(svc, SignVoteRequest(vote(block=OTHER), CHAIN))
    assert r.error is not None and r.error.code == 2
    assert "conflicting data" in r.error.description
    assert r.vote.signature == b""


def test_regression_and_wrong_chain_refused(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    run(svc, SignVoteRequest(vote(h=5), CHAIN))
    r = run(svc, SignVoteRequest(vote(h=4), CHAIN))
    assert r.error is not None and "height regression" in r.error.description
    r = run(svc, SignVoteRequest(vote(h=9), "evil-chain"))
    assert r.error is not None and r.vote.signature == b""
    assert svc.store.last(CHAIN).height == 5


def test_a_foreign_chain_id_is_quoted_in_the_log_and_counted_under_this_chain(
    tmp_path, key, caplog
) -> None:
    """The chain id a request names is the validator's input: a forged log line or a
    new metric series per id must not come of it (found in review)."""
    seen = []
    svc = make(tmp_path, key)
    svc.on_refused = lambda chain, reason, hrs, text: seen.append((chain, reason))
    forged = "evil\nrefused chain=svc-chain hrs=1/0/1 reason=double_sign" + "x" * 5000
    with caplog.at_level("WARNING", logger="nebula.signer"):
        r = run(svc, SignVoteRequest(vote(h=9), forged))
    assert r.error is not None and r.vote.signature == b""
    (rec,) = [x for x in caplog.records if getattr(x, "event", None) == "refused"]
    line = rec.getMessage()
    assert "\n" not in line and line.startswith("refused chain=svc-chain ")
    assert rec.chain_id == CHAIN and rec.requested_chain_id == forged[:64]
    assert seen == [(CHAIN, "chain_id_mismatch")]


def test_invalid_heights_and_types_refused(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    for v in (vote(h=0), vote(r=-1), vote(typ=SignedMsgType.PROPOSAL), vote(typ=7)):
        r = run(svc, SignVoteRequest(v, CHAIN))
        assert r.error is not None and r.vote.signature == b""
    assert svc.store.last(CHAIN) is None


@pytest.mark.parametrize(
    ("family", "skip", "expect_ext"),
    [
        (WireFamily.V0_34, False, False),
        (WireFamily.V0_38, False, True),
        (WireFamily.V1_0, False, True),
        (WireFamily.V1_0, True, False),
    ],
)
def test_vote_extension_rules(tmp_path, key, family, skip, expect_ext) -> None:
    svc = make(tmp_path, key, family)
    v = vote(typ=SignedMsgType.PRECOMMIT, ext=b"hello" if family is not WireFamily.V0_34 else b"")
    r = run(svc, SignVoteRequest(v, CHAIN, skip_extension_signing=skip))
    assert r.error is None
    assert key.verify(proto.vote_sign_bytes(CHAIN, v), r.vote.signature)
    if expect_ext:
        assert key.verify(proto.vote_extension_sign_bytes(CHAIN, v), r.vote.extension_signature)
    else:
        assert r.vote.extension_signature == b""
    assert r.vote.extension == b""  # never echoed (10 KiB response limit)


def test_nil_precommit_gets_no_extension_signature_and_rejects_extension(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    r = run(svc, SignVoteRequest(vote(typ=SignedMsgType.PRECOMMIT, block=BlockID()), CHAIN))
    assert r.error is None and r.vote.extension_signature == b""
    r = run(svc, SignVoteRequest(vote(h=2, ext=b"x"), CHAIN))
    assert r.error is not None and "unexpected vote extension" in r.error.description


def test_proposal_signed_and_pol_round_checked(tmp_path, key) -> None:
    svc = make(tmp_path, key)
    p = Proposal(
        height=3, round=1, pol_round=0, block_id=BLOCK, timestamp=Timestamp(1_700_000_000, 0)
    )
    r = run(svc, SignProposalRequest(p, CHAIN))
    assert r.error is None
    assert key.verify(proto.proposal_sign_bytes(CHAIN, p), r.proposal.signature)
    bad = Proposal(height=4, round=1, pol_round=1, block_id=BLOCK)
    r = run(svc, SignProposalRequest(bad, CHAIN))
    assert r.error is not None and r.proposal.signature == b""


def test_sign_bytes_request_is_refused(tmp_path, key) -> None:
    svc = make(tmp_path, key, WireFamily.V1_0)
    r = run(svc, SignBytesRequest(proto.vote_sign_bytes(CHAIN, vote())))
    assert r.error is not None and r.signature == b""


class _NoLeaderStore(LocalStore):
    def is_authoritative(self) -> bool:
        return False


def test_cannot_decide_now_raises_instead_of_answering(tmp_path, key) -> None:
    """NotLeader / replication trouble must not become a RemoteSignerError: CometBFT never
    retries those, and a single validator would then wait forever for its own prevote."""
    from nebula.errors import NotLeader, Unavailable

    svc = SigningService(
        CHAIN, WireFamily.V0_38, NativeBackend(key), _NoLeaderStore(tmp_path / "s.json")
    )
    with pytest.raises(NotLeader) as ei:
        run(svc, SignVoteRequest(vote(), CHAIN))
    assert isinstance(ei.value, Unavailable)
    with pytest.raises(Unavailable):
        run(
            svc,
            SignProposalRequest(Proposal(height=1, round=0, pol_round=-1, block_id=BLOCK), CHAIN),
        )
    assert svc.store.last(CHAIN) is None


def test_a_flood_of_refusals_is_counted_but_logged_at_a_bounded_rate(tmp_path, key, caplog) -> None:
    """A validator connection sending thousands of bad requests a second must not fill
    the disk with one log line each (found in review): 10 lines a second per chain, then
    one line with the count of the rest; the callback (and the metric) see every one."""

    def event(name: str) -> list:
        return [x for x in caplog.records if getattr(x, "event", None) == name]

    seen = []
    svc = make(tmp_path, key)
    svc.on_refused = lambda chain, reason, hrs, text: seen.append(reason)
    with caplog.at_level("WARNING", logger="nebula.signer"):
        for _ in range(500):
            r = run(svc, SignVoteRequest(vote(h=9), "evil-chain"))
            assert r.error is not None
        # (500 refusals take well under a second here; a slower run may open a new
        # second, and then logs one more line and a count of the rest.)
        lines, counted = event("refused"), event("refusals_not_logged")
        unlogged = sum(int(x.getMessage().split()[1]) for x in counted)
        assert len(lines) <= SigningService.REFUSAL_LINES_PER_SECOND * (1 + len(counted))
        svc._log_window -= 1.0  # the next second: the count of the rest, then lines again
        run(svc, SignVoteRequest(vote(h=9), "evil-chain"))
    summary = event("refusals_not_logged")[-1]
    assert summary.chain_id == CHAIN and "more refusals within a second" in summary.getMessage()
    unlogged += int(summary.getMessage().split()[1])
    assert len(event("refused")) + unlogged == 501  # every refusal: a line or in a count
    assert len(seen) == 501


@pytest.mark.parametrize("dst", [None, b"OTHER_DST_"])
def test_threshold_an_imported_signature_of_another_key_is_never_handed_back(tmp_path, dst) -> None:
    """Threshold mode answers a retry from the stored record too (a signature this
    leader combined - or one imported: initial_state_path / `nebula state import` work on
    a threshold chain).  An imported signature that is not the group key's is refused like
    a whole key's; the group key's own (under the share's DST) is handed back (found in
    review: the threshold retry path returned the imported signature unchecked)."""
    from nebula.backends.threshold import ThresholdBackend
    from nebula.crypto.keys import BLS_DEFAULT_DST, Bls12381Key
    from nebula.crypto.threshold import split

    secret = (7).to_bytes(32, "big")
    d = dst or BLS_DEFAULT_DST
    share = split(secret, 2, 3, dst=d)[0]
    group = Bls12381Key(secret, dst=d)
    assert group.public_key == share.public.group_public_key
    sb = proto.vote_sign_bytes(CHAIN, vote())
    other = generate("bls12381", bls_dst=d)
    for i, bad_sig in enumerate((other.sign(sb), b"\x00" * 96)):
        store = LocalStore(tmp_path / f"t{i}.json")
        store.force_import(CHAIN, SignRecord(1, 0, 2, sb, bad_sig))
        svc = SigningService(CHAIN, WireFamily.V1_0, ThresholdBackend(share), store)
        r = run(svc, SignVoteRequest(vote(), CHAIN))
        assert r.error is not None and r.vote.signature == b""
        assert "does not verify" in r.error.description
        assert store.last(CHAIN).signature == bad_sig
    store = LocalStore(tmp_path / "good.json")
    store.force_import(CHAIN, SignRecord(1, 0, 2, sb, group.sign(sb)))
    svc = SigningService(CHAIN, WireFamily.V1_0, ThresholdBackend(share), store)
    for ts in ((1_700_000_000, 1), (1_700_000_004, 2)):
        r = run(svc, SignVoteRequest(vote(ts=ts), CHAIN))
        assert r.error is None and r.vote.signature == group.sign(sb)


def test_an_imported_extension_signature_of_another_key_is_not_handed_back(tmp_path, key) -> None:
    """An imported state may carry an extension signature (ext_signature/ext_signbytes
    are read on import).  On a retry it is handed back only if it is this key's over
    those bytes; otherwise the extension is signed afresh, as FilePV always does (they
    are not slashable) (found in review: it was returned unchecked)."""
    v = vote(typ=SignedMsgType.PRECOMMIT, ext=b"hello")
    sb = proto.vote_sign_bytes(CHAIN, v)
    esb = proto.vote_extension_sign_bytes(CHAIN, v)
    other = Ed25519Key.from_seed(b"\x07" * 32)
    store = LocalStore(tmp_path / "s.json")
    store.force_import(CHAIN, SignRecord(1, 0, 3, sb, key.sign(sb), esb, other.sign(esb)))
    svc = SigningService(CHAIN, WireFamily.V0_38, NativeBackend(key), store)
    r = run(svc, SignVoteRequest(v, CHAIN))
    assert r.error is None and r.vote.signature == key.sign(sb)
    assert key.verify(esb, r.vote.extension_signature)


def test_threshold_an_imported_extension_signature_of_another_key_is_not_handed_back(
    tmp_path,
) -> None:
    """The same on a threshold chain: a stored extension signature that is not the group
    key's does not answer a retry; the retry goes to the store (its shares are combined
    afresh), never back with the imported one."""
    from nebula.backends.threshold import ThresholdBackend
    from nebula.crypto.keys import Bls12381Key
    from nebula.crypto.threshold import split
    from nebula.errors import StateError

    secret = (7).to_bytes(32, "big")
    share = split(secret, 2, 3)[0]
    group = Bls12381Key(secret)
    v = vote(typ=SignedMsgType.PRECOMMIT, ext=b"hello")
    sb = proto.vote_sign_bytes(CHAIN, v)
    esb = proto.vote_extension_sign_bytes(CHAIN, v)
    other = generate("bls12381")
    store = LocalStore(tmp_path / "t.json")
    store.force_import(CHAIN, SignRecord(1, 0, 3, sb, group.sign(sb), esb, other.sign(esb)))
    went: list[SignRecord] = []

    async def commit(chain_id, record, sign_later=None):  # the Raft store combines here
        went.append(record)
        raise StateError("to the store")

    store.commit = commit  # type: ignore[method-assign]
    svc = SigningService(CHAIN, WireFamily.V1_0, ThresholdBackend(share), store)
    r = run(svc, SignVoteRequest(v, CHAIN))
    assert r.vote.extension_signature != other.sign(esb)
    assert len(went) == 1 and went[0].ext_sign_bytes == esb
