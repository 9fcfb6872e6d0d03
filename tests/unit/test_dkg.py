"""The dealerless key generation (nebula.crypto.dkg): in memory, every check that can fail."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import random
from pathlib import Path

import pytest
from nacl.public import PublicKey, SealedBox
from pyblst import BlstP1Element

from nebula.cli import main as cli
from nebula.crypto import dkg
from nebula.crypto.keys import _G1, BLS_R, Bls12381Key, verify_signature
from nebula.crypto.threshold import (
    KeyShare,
    load_share_file,
    share_file_json,
    split,
    write_share_file,
)
from nebula.errors import DealRefused, KeyFileError

MSG = b"a precommit's sign bytes"


@dataclasses.dataclass
class Run:
    members: list[dkg.MemberSecret]
    ceremony: dkg.Ceremony
    deals: list[dkg.Deal]
    coeffs: dict[int, list[int]]  # what each dealer drew (known here through randbelow)


def _ceremony(t: int, n: int, seed: int = 1) -> Run:
    members = [dkg.new_member(i) for i in range(1, n + 1)]
    cer = dkg.Ceremony.of(t, [m.public for m in reversed(members)])  # any order
    coeffs: dict[int, list[int]] = {}
    deals = []
    for m in members:
        r = random.Random(seed * 1000 + m.index)
        drawn: list[int] = []

        def randbelow(k: int, r: random.Random = r, drawn: list[int] = drawn) -> int:
            v = r.randrange(k)
            drawn.append(1 + v)  # make_deal draws 1 + randbelow(r - 1)
            return v

        deals.append(dkg.make_deal(cer, m, randbelow=randbelow))
        coeffs[m.index] = drawn
    return Run(members, cer, deals, coeffs)


def _resign(run: Run, deal: dkg.Deal, **changes) -> dkg.Deal:
    """``deal`` changed and signed again by its dealer (a dealer that cheats)."""
    d = dataclasses.replace(deal, **changes)
    sig = run.members[deal.dealer - 1].sign(d.signed_bytes())
    return dataclasses.replace(d, signature=sig)


def _seal(run: Run, dealer: int, to: int, value: int, ceremony: bytes | None = None) -> bytes:
    plain = (
        (ceremony or run.ceremony.id)
        + dealer.to_bytes(2, "big")
        + to.to_bytes(2, "big")
        + value.to_bytes(32, "big")
    )
    return SealedBox(PublicKey(run.ceremony.member(to).encryption_key)).encrypt(plain)


def _refused(run: Run, member: int, deals: list[dkg.Deal]) -> DealRefused:
    with pytest.raises(DealRefused) as e:
        dkg.finish(run.ceremony, run.members[member - 1], deals)
    return e.value


# ---- the ceremony ------------------------------------------------------------------------


@pytest.mark.parametrize("t,n", [(2, 3), (3, 5)])
def test_a_ceremony_makes_one_valid_t_of_n_key_that_no_member_holds(t: int, n: int) -> None:
    run = _ceremony(t, n)
    results = [dkg.finish(run.ceremony, m, run.deals) for m in run.members]
    shares = [r.share for r in results]
    assert [s.index for s in shares] == list(range(1, n + 1))
    assert all(s.check() for s in shares)  # Feldman, against the group commitments
    # Every member derives the same group key, commitments and transcript hash.
    assert len({r.public.commitments for r in results}) == 1
    assert len({r.transcript for r in results}) == 1
    assert results[0].transcript == dkg.transcript_hash(run.ceremony, reversed(run.deals))
    pub = results[0].public
    assert (pub.threshold, pub.shares) == (t, n)
    # The group key is the sum of the dealers' constant-term commitments ...
    acc = None
    for d in run.deals:
        pt = BlstP1Element.uncompress(d.commitments[0])
        acc = pt if acc is None else acc + pt
    assert acc is not None and acc.compress() == pub.commitments[0]
    # ... i.e. the key of the sum of their constant terms, which no member ever computed.
    group_secret = sum(c[0] for c in run.coeffs.values()) % BLS_R
    whole = Bls12381Key(group_secret.to_bytes(32, "big"))
    assert whole.public_key == pub.group_public_key
    assert whole.address == pub.address
    want = whole.sign(MSG)
    sigs = {s.index: s.sign_share(MSG) for s in shares}
    for combo in itertools.combinations(range(1, n + 1), t):
        sig = pub.combine(MSG, {i: sigs[i] for i in combo})
        assert sig == want  # any t shares: the one signature the group key gives
        assert verify_signature("bls12381", pub.group_public_key, MSG, sig)
        assert pub.interpolate({i: sigs[i] for i in combo}) == want
    for combo in itertools.combinations(range(1, n + 1), t - 1):
        some = {i: sigs[i] for i in combo}
        assert pub.combine(MSG, some) is None
        forged = pub.interpolate(some)
        assert forged is None or not pub.verify(MSG, forged)
    # What one member holds is not the key: its share alone does not sign, its share is
    # not the group secret, its own polynomial's constant term is not either, and the
    # group secret is not in any file it has (its secret file, the public deals).
    for m, s in zip(run.members, shares, strict=True):
        assert s.secret != group_secret
        assert run.coeffs[m.index][0] != group_secret
        assert not pub.verify(MSG, s.sign_share(MSG))
        alone = KeyShare(s.index, s.secret, pub)
        assert pub.combine(MSG, {s.index: alone.sign_share(MSG)}) is None
        files = json.dumps(m.to_json()) + "".join(json.dumps(d.to_json()) for d in run.deals)
        blobs = [files.encode()] + [d.signed_bytes() for d in run.deals]
        for secret in [group_secret] + [c for cs in run.coeffs.values() for c in cs]:
            raw = secret.to_bytes(32, "big")
            for blob in blobs:
                assert raw not in blob and base64.b64encode(raw) not in blob
                assert hex(secret)[2:] not in blob.decode("latin-1")


def test_the_share_file_is_the_one_keys_split_writes(tmp_path: Path) -> None:
    run = _ceremony(2, 3)
    result = dkg.finish(run.ceremony, run.members[1], run.deals)
    p = tmp_path / "share-2.json"
    write_share_file(p, result.share)
    assert p.stat().st_mode & 0o777 == 0o600
    back = load_share_file(p)
    assert back.index == 2 and back.secret == result.share.secret
    assert back.public.commitments == result.public.commitments
    dealt = split(None, 2, 3)[1]
    assert share_file_json(result.share).keys() == share_file_json(dealt).keys()


@pytest.mark.parametrize("t,n", [(1, 1), (1, 3), (0, 2), (3, 2)])
def test_t_below_2_or_above_n_is_refused(t: int, n: int) -> None:
    # t = 1 is refused by design: a 1-of-n share IS the whole key (f is a constant), so
    # a 1-of-1 or 1-of-n "dealerless" key would put the whole key on every member.
    members = [dkg.new_member(i) for i in range(1, n + 1)]
    with pytest.raises(KeyFileError, match=r"need 2 <= t <= n"):
        dkg.Ceremony.of(t, [m.public for m in members])


def test_files_round_trip_and_a_forged_member_file_is_refused() -> None:
    run = _ceremony(2, 3)
    for d in run.deals:
        assert dkg.Deal.from_json(json.loads(json.dumps(d.to_json())), "x") == d
    m = run.members[0]
    assert dkg.MemberPublic.from_json(m.public.to_json(), "x") == m.public
    back = dkg.MemberSecret.from_json(m.to_json(), "x")
    assert back.public == m.public
    assert "encryption_secret" not in repr(m) and m.encryption_secret.hex() not in repr(m)
    doc = m.public.to_json()
    doc["encryption_key"] = base64.b64encode(run.members[1].public.encryption_key).decode()
    with pytest.raises(KeyFileError, match=r"member-1\.pub\.json: member 1: .*signature"):
        dkg.MemberPublic.from_json(doc, "member-1.pub.json")


def test_a_member_list_that_is_incomplete_duplicated_or_substituted_is_refused() -> None:
    run = _ceremony(2, 3)
    pubs = [m.public for m in run.members]
    with pytest.raises(KeyFileError, match=r"none for member \[2\]"):
        dkg.Ceremony.of(2, [pubs[0], pubs[2]])
    with pytest.raises(KeyFileError, match=r"two files for member \[1\]"):
        dkg.Ceremony.of(2, [pubs[0], pubs[0], pubs[1]])
    # The operator swaps member 3's identity for one it made: member 3 refuses the list
    # (and every other member's ceremony id differs from member 3's).
    fake = dkg.new_member(3)
    swapped = dkg.Ceremony.of(2, [pubs[0], pubs[1], fake.public])
    assert swapped.id != run.ceremony.id
    with pytest.raises(KeyFileError, match="not this member's ceremony identity"):
        dkg.make_deal(swapped, run.members[2])
    with pytest.raises(KeyFileError, match="not this member's ceremony identity"):
        dkg.finish(swapped, run.members[2], run.deals)


# ---- every bad deal is refused, naming its dealer -----------------------------------------


def test_a_ciphertext_changed_in_transit_fails_the_dealers_signature() -> None:
    run = _ceremony(2, 3)
    d = run.deals[1]
    cts = list(d.ciphertexts)
    cts[0] = bytes([cts[0][0] ^ 1]) + cts[0][1:]
    bad = dataclasses.replace(d, ciphertexts=tuple(cts))
    e = _refused(run, 1, [run.deals[0], bad, run.deals[2]])
    assert e.dealers == (2,)
    assert "dealer 2" in str(e) and "signature does not verify" in str(e)


def test_a_dealer_that_seals_garbage_is_named() -> None:
    run = _ceremony(2, 3)
    d = run.deals[2]
    cts = list(d.ciphertexts)
    cts[0] = os.urandom(len(cts[0]))
    bad = _resign(run, d, ciphertexts=tuple(cts))
    e = _refused(run, 1, [run.deals[0], run.deals[1], bad])
    assert e.dealers == (3,)
    assert "dealer 3" in str(e) and "does not open with member 1's key" in str(e)
    # Member 2's value from that deal is fine: only member 1 can tell.
    dkg.finish(run.ceremony, run.members[1], [run.deals[0], run.deals[1], bad])


def test_a_dealer_that_seals_a_value_off_its_polynomial_is_named() -> None:
    run = _ceremony(3, 5)
    d = run.deals[3]  # dealer 4
    cts = list(d.ciphertexts)
    cts[1] = _seal(run, 4, 2, 12345)
    bad = _resign(run, d, ciphertexts=tuple(cts))
    e = _refused(run, 2, [*run.deals[:3], bad, run.deals[4]])
    assert e.dealers == (4,) and "Feldman" in str(e) and "dealer 4" in str(e)
    # A value at or above r (equal mod r to the right one) is refused too.
    f42 = sum(c * 2**k for k, c in enumerate(run.coeffs[4])) % BLS_R
    cts[1] = SealedBox(PublicKey(run.ceremony.member(2).encryption_key)).encrypt(
        run.ceremony.id + b"\x00\x04\x00\x02" + (f42 + BLS_R).to_bytes(32, "big")
    )
    bad = _resign(run, d, ciphertexts=tuple(cts))
    e = _refused(run, 2, [*run.deals[:3], bad, run.deals[4]])
    assert "not a scalar below r" in str(e)
    # The right value sealed again passes.
    cts[1] = _seal(run, 4, 2, f42)
    ok = _resign(run, d, ciphertexts=tuple(cts))
    dkg.finish(run.ceremony, run.members[1], [*run.deals[:3], ok, run.deals[4]])


def test_a_tampered_commitment_is_refused_signed_or_not() -> None:
    run = _ceremony(2, 3)
    d = run.deals[0]
    other = _G1.scalar_mul(7).compress()
    for k in (0, 1):
        comms = list(d.commitments)
        comms[k] = other
        unsigned = dataclasses.replace(d, commitments=tuple(comms))
        e = _refused(run, 2, [unsigned, *run.deals[1:]])
        assert e.dealers == (1,) and "signature does not verify" in str(e)
        resigned = _resign(run, d, commitments=tuple(comms))
        e = _refused(run, 2, [resigned, *run.deals[1:]])
        assert e.dealers == (1,) and "Feldman" in str(e)
    comms = list(d.commitments)
    comms[1] = bytes([0xC0]) + bytes(47)  # infinity: a polynomial of lower degree
    e = _refused(run, 2, [_resign(run, d, commitments=tuple(comms)), *run.deals[1:]])
    assert "point at infinity" in str(e)
    comms[1] = b"\x80" + b"\xff" * 47  # not a point
    e = _refused(run, 2, [_resign(run, d, commitments=tuple(comms)), *run.deals[1:]])
    assert e.dealers == (1,) and "not a valid G1 point" in str(e)


def test_a_deal_signed_by_another_member_is_refused() -> None:
    run = _ceremony(2, 3)
    d = run.deals[1]
    forged = dataclasses.replace(d, signature=run.members[2].sign(d.signed_bytes()))
    e = _refused(run, 1, [run.deals[0], forged, run.deals[2]])
    assert e.dealers == (2,) and "member 2's ceremony key" in str(e)
    # Member 3 claiming to be dealer 2 (its own deal relabelled and signed by itself).
    claimed = dataclasses.replace(run.deals[2], dealer=2)
    claimed = dataclasses.replace(claimed, signature=run.members[2].sign(claimed.signed_bytes()))
    e = _refused(run, 1, [run.deals[0], claimed, run.deals[2]])
    assert e.dealers == (2,)


def test_a_missing_deal_is_refused_naming_the_dealer_also_ones_own() -> None:
    run = _ceremony(3, 5)
    e = _refused(run, 1, [d for d in run.deals if d.dealer != 4])
    assert e.dealers == (4,) and "no deal from dealer 4" in str(e)
    e = _refused(run, 1, run.deals[1:])
    assert e.dealers == (1,) and "this member's own deal" in str(e)
    e = _refused(run, 1, [])
    assert e.dealers == (1, 2, 3, 4, 5)


def test_a_duplicated_dealer_is_refused() -> None:
    run = _ceremony(2, 3)
    e = _refused(run, 3, [*run.deals, run.deals[1]])
    assert e.dealers == (2,) and "the same deal given twice" in str(e)
    again = dkg.make_deal(run.ceremony, run.members[1])  # dealer 2 dealt twice
    e = _refused(run, 3, [*run.deals, again])
    assert e.dealers == (2,) and "two different deals" in str(e)


def test_a_deal_from_another_ceremony_is_refused() -> None:
    run = _ceremony(2, 3)
    # The same dealer, same t and n, other member keys (an earlier ceremony): replayed.
    old_members = [run.members[0], dkg.new_member(2), dkg.new_member(3)]
    old = dkg.Ceremony.of(2, [m.public for m in old_members])
    replayed = dkg.make_deal(old, run.members[0])
    e = _refused(run, 2, [replayed, *run.deals[1:]])
    assert e.dealers == (1,) and "another ceremony" in str(e)
    # A dealer that copies another dealer's sealed values and signs them as its own:
    # the values name their real dealer.
    copied = _resign(
        run,
        run.deals[2],
        commitments=run.deals[0].commitments,
        ciphertexts=run.deals[0].ciphertexts,
    )
    e = _refused(run, 2, [*run.deals[:2], copied])
    assert e.dealers == (3,) and "not a value from dealer 3 to member 2" in str(e)


def test_a_deal_for_another_threshold_is_refused() -> None:
    run = _ceremony(2, 5)
    other_t = dkg.Ceremony.of(3, [m.public for m in run.members])
    assert other_t.id != run.ceremony.id  # t is part of the ceremony id
    mismatched = dkg.make_deal(other_t, run.members[2])
    e = _refused(run, 1, [*run.deals[:2], mismatched, *run.deals[3:]])
    assert e.dealers == (3,) and "3-of-5 key" in str(e) and "2-of-5" in str(e)
    # The same deal relabelled as 2-of-5 (and signed again): its ceremony id gives it away.
    relabelled = _resign(run, mismatched, threshold=2, commitments=mismatched.commitments[:2])
    e = _refused(run, 1, [*run.deals[:2], relabelled, *run.deals[3:]])
    assert e.dealers == (3,) and "another ceremony" in str(e)


@pytest.mark.parametrize(("t", "n"), [(3, 3), (3, 4), (4, 5), (5, 5)])
def test_a_ceremony_whose_honest_checks_cannot_pin_a_deal_is_refused(t: int, n: int) -> None:
    """With t-1 colluding dealers, n-t+1 honest members each check one evaluation of a
    deal: below t checks, a dealer that deals last can pick a constant term that cancels
    the others' and learn the group secret (found in review, 3-of-3).  n >= 2t-1 is
    required; 2-of-3 and 3-of-5 (the cluster sizes) pass."""
    members = [dkg.new_member(i).public for i in range(1, n + 1)]
    with pytest.raises(KeyFileError, match=rf"a {t}-of-{n} key generation is refused"):
        dkg.Ceremony.of(t, members)
    dkg.Ceremony.of((n + 1) // 2, members)


def test_several_bad_deals_are_all_named_at_once() -> None:
    run = _ceremony(3, 5)
    bad2 = dataclasses.replace(run.deals[1], signature=bytes(64))
    e = _refused(run, 1, [run.deals[0], bad2, run.deals[2], run.deals[4]])
    assert e.dealers == (2, 4)
    assert "dealer 2" in str(e) and "no deal from dealer 4" in str(e)


def test_malformed_deal_files_name_the_file() -> None:
    run = _ceremony(2, 3)
    doc = run.deals[0].to_json()
    for key, value, match in (
        ("ceremony", "zz", "bad ceremony id"),
        ("commitments", "x", "commitments must be a list"),
        ("ciphertexts", ["!!"], "not valid base64"),
        ("threshold", True, "threshold must be an integer"),
        ("type", "nebula/Other", "not a DKG deal file"),
    ):
        with pytest.raises(KeyFileError, match=match) as e:
            dkg.Deal.from_json({**doc, key: value}, "deal-1.json")
        assert str(e.value).startswith("deal-1.json")
    with pytest.raises(DealRefused, match="expected 3 sealed values"):
        dkg.Deal.from_json({**doc, "ciphertexts": doc["ciphertexts"][:2]}, "deal-1.json")


# ---- the command line, in process: nothing is written when a deal is refused ----------------


def test_finish_refusing_a_deal_writes_nothing(tmp_path: Path, capsys) -> None:
    dirs = [tmp_path / f"m{i}" for i in (1, 2, 3)]
    for i, d in enumerate(dirs, 1):
        assert cli.main(["keys", "dkg", "init", "-i", str(i), "--dir", str(d)]) == 0
    pubs = [str(d / f"member-{i}.pub.json") for i, d in enumerate(dirs, 1)]
    assert all(
        os.stat(d / f"member-{i}.secret.json").st_mode & 0o777 == 0o600
        for i, d in enumerate(dirs, 1)
    )
    for i, d in enumerate(dirs, 1):
        rc = cli.main(
            ["keys", "dkg", "deal", "-i", str(i), "-t", "2", "--members", *pubs, "--dir", str(d)]
        )
        assert rc == 0
    deals = [str(d / f"deal-{i}.json") for i, d in enumerate(dirs, 1)]
    doc = json.loads(Path(deals[2]).read_text())
    doc["commitments"][1] = doc["commitments"][0]
    tampered = tmp_path / "deal-3.json"
    tampered.write_text(json.dumps(doc))
    capsys.readouterr()
    args = [
        "keys",
        "dkg",
        "finish",
        "-i",
        "1",
        "-t",
        "2",
        "--members",
        *pubs,
        "--dir",
        str(dirs[0]),
    ]
    assert cli.main([*args, "--deals", deals[0], deals[1], str(tampered)]) == 2
    err = capsys.readouterr().err
    assert "dealer 3" in err and "Nothing was written" in err
    assert not (dirs[0] / "share-1.json").exists()
    assert sorted(p.name for p in dirs[0].iterdir()) == [
        "deal-1.json", "member-1.pub.json", "member-1.secret.json"
    ]  # fmt: skip
    # t below the Raft quorum is refused unless asked for (as `keys split` does).
    below = [a if a != "2" else "1" for a in args]  # -t 1
    assert cli.main([*below, "--deals", *deals]) == 2
    assert "below the Raft quorum" in capsys.readouterr().err
    assert cli.main([*args, "--deals", *deals]) == 0
    out = capsys.readouterr().out
    assert "transcript :" in out
    assert load_share_file(dirs[0] / "share-1.json").index == 1
