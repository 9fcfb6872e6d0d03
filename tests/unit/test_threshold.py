"""Threshold BLS12-381 (nebula.crypto.threshold): property tests against the whole key."""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nebula.crypto.keys import (
    BLS_COMETBFT_V1_0_0_DST,
    BLS_DEFAULT_DST,
    BLS_R,
    Bls12381Key,
    verify_signature,
)
from nebula.crypto.threshold import (
    KeyShare,
    lagrange_at_zero,
    load_share_file,
    split,
    write_share_file,
)
from nebula.errors import KeyFileError

_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(min_value=1, max_value=5).flatmap(
    lambda n: st.tuples(st.integers(min_value=1, max_value=n), st.just(n))
)
secrets_ = st.integers(min_value=1, max_value=BLS_R - 1)
messages = st.binary(min_size=0, max_size=200)
dsts = st.sampled_from([BLS_DEFAULT_DST, BLS_COMETBFT_V1_0_0_DST])


def _rng(seed: int):
    r = random.Random(seed)
    return lambda n: r.randrange(n)


@_SETTINGS
@given(sizes, secrets_, messages, dsts, st.integers(0, 2**32), st.data())
def test_any_t_of_n_shares_combine_to_the_whole_keys_signature(
    tn: tuple[int, int], secret: int, msg: bytes, dst: bytes, seed: int, data: st.DataObject
) -> None:
    t, n = tn
    whole = Bls12381Key(secret.to_bytes(32, "big"), dst=dst)
    shares = split(secret, t, n, dst=dst, randbelow=_rng(seed))
    pub = shares[0].public
    # The split of an existing key reproduces its public key (and address).
    assert pub.group_public_key == whole.public_key
    assert pub.address == whole.address
    assert all(s.check() for s in shares)
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=t, max_size=n, unique_by=id))
    sig = pub.combine(msg, {s.index: s.sign_share(msg) for s in subset})
    assert sig == whole.sign(msg)
    assert verify_signature("bls12381", whole.public_key, msg, sig, bls_dst=dst)


@_SETTINGS
@given(sizes.filter(lambda tn: tn[0] >= 2), secrets_, messages, st.integers(0, 2**32))
def test_t_minus_one_shares_do_not_make_a_valid_signature(
    tn: tuple[int, int], secret: int, msg: bytes, seed: int
) -> None:
    t, n = tn
    whole = Bls12381Key(secret.to_bytes(32, "big"))
    shares = split(secret, t, n, randbelow=_rng(seed))
    pub = shares[0].public
    some = {s.index: s.sign_share(msg) for s in shares[: t - 1]}
    assert pub.combine(msg, some) is None  # fewer than t: refused
    # Interpolating them anyway gives something that is not the signature.
    forged = pub.interpolate(some)
    assert forged != whole.sign(msg)
    assert forged is None or not pub.verify(msg, forged)


@_SETTINGS
@given(
    sizes.filter(lambda tn: 2 <= tn[0] < tn[1]),
    secrets_,
    messages,
    st.integers(0, 2**32),
    st.data(),
)
def test_a_corrupted_share_is_detected_and_excluded(
    tn: tuple[int, int], secret: int, msg: bytes, seed: int, data: st.DataObject
) -> None:
    # (t >= 2: with t = 1 every share is the whole key, so another member's is valid.)
    t, n = tn
    whole = Bls12381Key(secret.to_bytes(32, "big"))
    shares = split(secret, t, n, randbelow=_rng(seed))
    pub = shares[0].public
    sigs = {s.index: s.sign_share(msg) for s in shares}
    victim = data.draw(st.sampled_from(sorted(sigs)))
    how = data.draw(st.sampled_from(["other_message", "other_member", "garbage", "flipped"]))
    if how == "other_message":
        sigs[victim] = shares[victim - 1].sign_share(msg + b"!")
    elif how == "other_member":
        sigs[victim] = sigs[victim % n + 1]
    elif how == "garbage":
        sigs[victim] = os.urandom(96)
    else:
        b = bytearray(sigs[victim])
        b[50] ^= 1
        sigs[victim] = bytes(b)
    # The corrupted share comes first, so the first try (the first t) includes it.
    ordered = {victim: sigs[victim], **{i: s for i, s in sigs.items() if i != victim}}
    bad: list[int] = []
    sig = pub.combine(msg, ordered, on_bad=bad.append)
    assert sig == whole.sign(msg)
    assert bad == [victim]
    assert not pub.verify_share(victim, msg, sigs[victim])
    assert all(pub.verify_share(i, msg, s) for i, s in sigs.items() if i != victim)


def test_every_subset_of_a_3_of_5_split_and_no_smaller_one() -> None:
    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), 3, 5)
    pub = shares[0].public
    msg = b"vote sign bytes"
    sigs = {s.index: s.sign_share(msg) for s in shares}
    want = whole.sign(msg)
    for k in (3, 4, 5):
        for combo in itertools.combinations(sorted(sigs), k):
            assert pub.combine(msg, {i: sigs[i] for i in combo}) == want
    for combo in itertools.combinations(sorted(sigs), 2):
        assert pub.interpolate({i: sigs[i] for i in combo}) != want


def test_lagrange_coefficients_sum_to_one_and_refuse_bad_indices() -> None:
    for idx in ([1, 2], [1, 3], [2, 3, 5], [7]):
        assert sum(lagrange_at_zero(idx).values()) % BLS_R == 1
    with pytest.raises(ValueError):
        lagrange_at_zero([1, 1])
    with pytest.raises(ValueError):
        lagrange_at_zero([0, 1])


def test_split_refuses_bad_parameters() -> None:
    for t, n in ((0, 3), (4, 3), (1, 0), (2, 256)):
        with pytest.raises(KeyFileError):
            split(None, t, n)
    with pytest.raises(KeyFileError):
        split(0, 2, 3)
    with pytest.raises(KeyFileError):
        split(BLS_R, 2, 3)


def test_share_file_round_trip_and_tampering(tmp_path: Path) -> None:
    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), 2, 3)
    for s in shares:
        write_share_file(tmp_path / f"share-{s.index}.json", s)
        assert (os.stat(tmp_path / f"share-{s.index}.json").st_mode & 0o777) == 0o600
    got = load_share_file(tmp_path / "share-2.json")
    assert isinstance(got, KeyShare) and got.index == 2 and got.secret == shares[1].secret
    assert got.public.group_public_key == whole.public_key
    assert "secret" not in repr(got) and str(got.secret) not in repr(got)
    with pytest.raises(KeyFileError, match="already exists"):
        write_share_file(tmp_path / "share-2.json", shares[1])

    doc = json.loads((tmp_path / "share-2.json").read_text())

    def bad(**changes: object) -> str:
        p = tmp_path / "bad.json"
        p.unlink(missing_ok=True)
        p.write_text(json.dumps({**doc, **changes}))
        p.chmod(0o600)
        with pytest.raises(KeyFileError) as e:
            load_share_file(p)
        assert str(p) in str(e.value)
        return str(e.value)

    # Another member's secret under this index: Feldman check fails.
    other_secret = base64.b64encode(shares[0].secret_bytes()).decode()
    assert "does not match the commitments" in bad(secret_share=other_secret)
    assert "group_public_key" in bad(
        group_public_key=base64.b64encode(Bls12381Key.generate().public_key).decode()
    )
    assert "commitments" in bad(commitments=doc["commitments"][:1])
    assert "index" in bad(index=4)
    assert "type" in bad(type="something")
    assert "threshold" in bad(threshold=4)
    (tmp_path / "share-3.json").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_share_file(tmp_path / "share-3.json")


def test_keys_split_cli_from_an_existing_key_and_fresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nebula.cli.main import main
    from nebula.crypto.keys import write_priv_validator_key_json

    whole = Bls12381Key.generate()
    pv = tmp_path / "priv_validator_key.json"
    write_priv_validator_key_json(pv, whole)
    out = tmp_path / "shares"
    assert main(["keys", "split", "-t", "2", "-n", "3", "--from", str(pv), "-o", str(out)]) == 0
    assert "CometBFT sees no change" in capsys.readouterr().out
    loaded = [load_share_file(out / f"share-{i}.json") for i in (1, 2, 3)]
    assert [s.index for s in loaded] == [1, 2, 3]
    assert all(s.public.group_public_key == whole.public_key for s in loaded)
    msg = b"m"
    assert loaded[0].public.combine(
        msg, {s.index: s.sign_share(msg) for s in loaded[1:]}
    ) == whole.sign(msg)
    # No file holds the whole key.
    for i in (1, 2, 3):
        text = (out / f"share-{i}.json").read_text()
        assert base64.b64encode(whole.secret_bytes()).decode() not in text
    # Existing files are not overwritten; below the quorum is refused.
    assert main(["keys", "split", "-t", "2", "-n", "3", "--from", str(pv), "-o", str(out)]) == 2
    assert main(["keys", "split", "-t", "1", "-n", "3", "-o", str(tmp_path / "x")]) == 2
    assert "below the Raft quorum" in capsys.readouterr().err
    assert main(["keys", "split", "-t", "3", "-n", "5", "-o", str(tmp_path / "f"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["threshold"] == 3 and len(info["files"]) == 5


@_SETTINGS
@given(sizes.filter(lambda tn: tn[0] >= 2), secrets_, messages, st.integers(0, 2**32), st.data())
def test_a_member_combines_its_own_secret_with_t_minus_1_received_shares(
    tn: tuple[int, int], secret: int, msg: bytes, seed: int, data: st.DataObject
) -> None:
    """What a leader does: its own term H(m) * (lambda * s_i) computed directly, the
    others' shares received; a bad received share is named and skipped."""
    t, n = tn
    whole = Bls12381Key(secret.to_bytes(32, "big"))
    shares = split(secret, t, n, randbelow=_rng(seed))
    pub = shares[0].public
    me = data.draw(st.sampled_from(shares))
    others = [s for s in shares if s is not me]
    got = {s.index: s.sign_share(msg) for s in others}
    bad: list[int] = []
    assert pub.combine(msg, got, own=(me.index, me.secret), on_bad=bad.append) == whole.sign(msg)
    assert bad == []
    # The same with the work done before the shares arrive (H(m), the group key's
    # pairing half), whichever received share comes first.
    prep = pub.prepare(msg)
    for j in got:
        one = dict([(j, got[j])] + [(i, s) for i, s in got.items() if i != j])
        assert pub.combine(msg, one, own=(me.index, me.secret), prepared=prep) == whole.sign(msg)
    few = dict(list(got.items())[: t - 2])
    assert pub.combine(msg, few, own=(me.index, me.secret)) is None
    if len(others) >= t:  # one spare share: corrupt the first, the rest still suffice
        first = next(iter(got))
        got[first] = others[-1].sign_share(msg + b"x")
        assert pub.combine(msg, got, own=(me.index, me.secret), on_bad=bad.append) == whole.sign(
            msg
        )
        assert bad == [first]


def test_t2_pre_scaled_shares_combine_and_a_bad_one_is_found() -> None:
    """t = 2: a follower knows the signing set ({leader, itself}) and sends its share
    already multiplied by its Lagrange coefficient; the leader adds it to its own term."""
    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), 2, 3)
    pub = shares[0].public
    msg = b"precommit sign bytes"
    for me in shares:
        own = (me.index, me.secret)
        others = [s for s in shares if s is not me]
        got = {s.index: s.sign_share(msg, with_partner=me.index) for s in others}
        scaled = frozenset(got)
        for j in got:  # whichever arrives first
            one = {j: got[j]}
            assert pub.combine(msg, one, own=own, scaled=scaled) == whole.sign(msg)
            # a pre-scaled share is not a plain share: taken as one it fails
            assert pub.combine(msg, one, own=own) is None
        j, k = sorted(got)
        bad: list[int] = []
        broken = {j: others[0].sign_share(msg + b"!", with_partner=me.index), k: got[k]}
        assert pub.combine(msg, broken, own=own, scaled=scaled, on_bad=bad.append) == (
            whole.sign(msg)
        )
        assert bad == [j]
    with pytest.raises(ValueError):
        split(None, 3, 5)[0].sign_share(msg, with_partner=2)
    with pytest.raises(ValueError):
        shares[0].sign_share(msg, with_partner=shares[0].index)


def test_lagrange_coefficients_interpolate_and_are_not_shared_state() -> None:
    """sum lambda_i * f(i) = f(0) for every signing set of a 3-of-5 polynomial (the
    coefficients are cached per set: a caller changing its dict changes nothing)."""
    rng = random.Random(7)
    coeffs = [rng.randrange(1, BLS_R) for _ in range(3)]

    def f(x: int) -> int:
        return sum(c * pow(x, k, BLS_R) for k, c in enumerate(coeffs)) % BLS_R

    for subset in itertools.combinations(range(1, 6), 3):
        lam = lagrange_at_zero(subset)
        assert sum(lam[i] * f(i) for i in subset) % BLS_R == coeffs[0]
        lam[subset[0]] = 0
        assert lagrange_at_zero(list(subset))[subset[0]] != 0


def test_a_vote_and_its_extension_verified_with_one_pairing_check() -> None:
    """A precommit's two signatures are combined and verified as one batch (random
    weights the share senders never see); a bad share in either is found and excluded
    by the per-message fallback."""
    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), 2, 3)
    pub = shares[0].public
    vote, ext = b"precommit sign bytes", b"vote extension sign bytes"
    want = [whole.sign(vote), whole.sign(ext)]
    me, f2, f3 = shares
    own = (me.index, me.secret)

    def scaled_from(*fs: KeyShare, msg: bytes) -> dict[int, bytes]:
        return {f.index: f.sign_share(msg, with_partner=me.index) for f in fs}

    prep = pub.prepare_batch([vote, ext])
    assert prep.weights[0] == 1 and len(prep.weights) == 2 and 0 < prep.weights[1] < 2**64
    assert pub.prepare_batch([vote, ext]).weights[1] != prep.weights[1]  # drawn each time
    got = [scaled_from(f2, msg=vote), scaled_from(f2, msg=ext)]
    sc = [frozenset(g) for g in got]
    assert pub.combine_many([vote, ext], got, own=own, prepared=prep, scaled=sc) == want
    # plain shares, no preparation, t received (no own term)
    plain = [{f.index: f.sign_share(m) for f in (f2, f3)} for m in (vote, ext)]
    assert pub.combine_many([vote, ext], plain) == want
    # one message is the single combine
    assert pub.combine_many([vote], [plain[0]]) == want[:1]

    # the extension share is bad: the batch fails, the fallback names the member
    bad: list[int] = []
    broken = [got[0], {f2.index: f2.sign_share(ext + b"!", with_partner=me.index)}]
    assert (
        pub.combine_many([vote, ext], broken, own=own, prepared=prep, scaled=sc, on_bad=bad.append)
        is None
    )
    assert bad == [f2.index]
    # with the other follower's good shares too, both signatures still come out
    bad.clear()
    both = [
        {f2.index: got[0][f2.index], f3.index: f3.sign_share(vote, with_partner=me.index)},
        {f2.index: broken[1][f2.index], f3.index: f3.sign_share(ext, with_partner=me.index)},
    ]
    sc2 = [frozenset(g) for g in both]
    assert (
        pub.combine_many([vote, ext], both, own=own, prepared=prep, scaled=sc2, on_bad=bad.append)
        == want
    )
    assert bad == [f2.index]


def test_errors_that_cancel_in_an_unweighted_sum_are_caught() -> None:
    """A member sends a vote share off by +D and an extension share off by -D: their sum
    is right, so an unweighted batch check would pass two invalid signatures.  The
    random weights catch it."""
    from pyblst import BlstP2Element

    whole = Bls12381Key.generate()
    shares = split(whole.secret_bytes(), 2, 3)
    pub = shares[0].public
    vote, ext = b"vote", b"extension"
    me, f2, _f3 = shares
    own = (me.index, me.secret)
    d = pub.hash(b"the error")
    v = BlstP2Element.uncompress(f2.sign_share(vote, with_partner=me.index)) + d
    e = BlstP2Element.uncompress(f2.sign_share(ext, with_partner=me.index)) + d.scalar_mul(
        BLS_R - 1
    )
    sent = [{f2.index: v.compress()}, {f2.index: e.compress()}]
    sc = [frozenset({f2.index})] * 2
    bad: list[int] = []
    for _ in range(3):
        got = pub.combine_many([vote, ext], sent, own=own, scaled=sc, on_bad=bad.append)
        assert got is None
    assert bad == [f2.index] * 6  # both of its shares, each call


def test_keys_show_on_a_threshold_member_shows_the_group_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nebula.cli.main import main
    from nebula.devnet.cluster import write_cluster
    from nebula.devnet.threshold import give_shares

    whole = Bls12381Key.generate()
    dirs = write_cluster(tmp_path, nodes=3, chain_id="c", version="v1_0", key=whole, connections=[])
    give_shares(dirs, whole, 2)
    assert main(["keys", "show", "-c", str(dirs[1].config_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["address"] == whole.address.hex().upper()
    assert base64.b64decode(info["pub_key"]["value"]) == whole.public_key
    assert main(["keys", "show", "-c", str(dirs[1].config_path)]) == 0
    assert "share    : 2 of a 2-of-3 split" in capsys.readouterr().out
    # Node 2's config with node 1's share: refused, as at start.
    (dirs[1].home / "share.json").write_bytes((dirs[0].home / "share.json").read_bytes())
    assert main(["keys", "show", "-c", str(dirs[1].config_path)]) == 2
    assert "holds share 1, but this is node 2" in capsys.readouterr().err
