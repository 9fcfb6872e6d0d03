"""Threshold BLS12-381 (t of n, min-pk): Shamir shares with Feldman commitments.

The whole key ``s`` is the constant term of a random polynomial of degree ``t - 1`` over
the scalar field, ``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` (mod r).  Member ``i``
(1 <= i <= n; in a Nebula cluster: the member's Raft node id) holds ``s_i = f(i)``.  The
Feldman commitments ``C_j = a_j * G1`` (``C_0 = s * G1``: the group public key, the very
key CometBFT knows) are public, so

* each member checks its own share: ``s_i * G1 == sum_j C_j * i^j`` (:meth:`KeyShare.check`);
* anyone computes each member's public share ``PK_i = sum_j C_j * i^j`` and verifies a
  member's signature share ``sigma_i = s_i * H(m)`` against it (one pairing check).

Any ``t`` shares combine by Lagrange interpolation at 0 in G2:
``sigma = sum_i lambda_i * sigma_i`` with ``lambda_i = prod_{j != i} j / (j - i)`` (mod r),
which equals ``s * H(m)``: exactly the signature the whole key gives (BLS is
deterministic), so CometBFT verifies it against the group public key and cannot tell
the difference.  ``t - 1`` shares say nothing about ``s`` (Shamir), so they cannot
produce a valid signature.

Combining verifies the result once against the group public key
(:meth:`ThresholdPublic.combine`); only when that fails is each share checked against its
member's public share, the bad ones are named and dropped, and the rest are combined
again (if ``t`` good ones remain).

The share key file (JSON, mode 0600) holds only the member's share and the public data::

    {"type": "nebula/Bls12381ThresholdShare", "version": 1, "threshold": t, "shares": n,
     "index": i, "group_public_key": <base64 96-byte uncompressed G1>, "address": <hex>,
     "commitments": [<base64 48-byte compressed G1>, ... t of them],
     "secret_share": <base64 32-byte big-endian scalar>}

Two ways to make the shares, the same file either way: :func:`split` is dealer-based: it
runs on one machine that holds the whole key for a moment (an existing
``priv_validator_key.json``, or a fresh key) and writes one file per member.
:mod:`nebula.crypto.dkg` is dealerless (Pedersen's DKG with Feldman commitments, in file
rounds): each member deals a random polynomial of its own and the key is the sum, so no
machine ever holds the whole key (a fresh key only: an existing key cannot be shared
that way).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyblst import BlstP1Element, BlstP2Element, final_verify, miller_loop

from nebula.crypto.keys import (
    _G1,
    BLS_DEFAULT_DST,
    BLS_R,
    _strict_b64,
    g1_compressed,
    g1_uncompressed,
    read_private_file,
    write_private_file,
)
from nebula.errors import KeyFileError

__all__ = [
    "SHARE_FILE_TYPE",
    "KeyShare",
    "ThresholdPublic",
    "lagrange_at_zero",
    "load_share_file",
    "split",
    "write_share_file",
]

SHARE_FILE_TYPE = "nebula/Bls12381ThresholdShare"
_FILE_VERSION = 1
MAX_SHARES = 255


def _inv(a: int) -> int:
    """The inverse of ``a`` mod r (ValueError for a multiple of r).  Python's modular
    inverse (extended Euclid, 0.3 us); Fermat's ``a ** (r - 2)`` took 17-80 us."""
    return pow(a % BLS_R, -1, BLS_R)


def lagrange_at_zero(indices: Iterable[int]) -> dict[int, int]:
    """The Lagrange coefficients at x = 0 for distinct positive ``indices`` (mod r)."""
    return dict(_lagrange_at_zero(tuple(indices)))


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(idx: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    # A signing set repeats on every signature (t = 2: {leader, follower}): cached.
    if len(set(idx)) != len(idx) or any(i <= 0 for i in idx):
        raise ValueError(f"share indices must be distinct and positive: {list(idx)}")
    out = []
    for i in idx:
        num, den = 1, 1
        for j in idx:
            if j != i:
                num = num * j % BLS_R
                den = den * (j - i) % BLS_R
        out.append((i, num * _inv(den) % BLS_R))
    return tuple(out)


def _g1_from(data: bytes, what: str) -> BlstP1Element:
    if len(data) == 96:
        data = g1_compressed(data)
    if len(data) != 48:
        raise KeyFileError(f"{what}: a G1 point is 48 or 96 bytes, got {len(data)}")
    try:
        return BlstP1Element.uncompress(bytes(data))  # on the curve, in the subgroup
    except ValueError as e:
        raise KeyFileError(f"{what}: not a valid G1 point: {e}") from None


def _g2_from(sig: bytes) -> BlstP2Element | None:
    if len(sig) != 96:
        return None
    try:
        return BlstP2Element.uncompress(bytes(sig))  # on the curve, in the subgroup
    except ValueError:
        return None


@dataclass(frozen=True, eq=False)
class ThresholdPublic:
    """The public data of a t-of-n split: threshold, size and the Feldman commitments."""

    threshold: int
    shares: int
    #: the t commitments, 48-byte compressed G1 points; commitments[0] is the group key
    commitments: tuple[bytes, ...]
    dst: bytes = BLS_DEFAULT_DST
    #: with :attr:`public_key`: what :func:`nebula.crypto.keys.pubkey_json` reads
    key_type: ClassVar[str] = "bls12381"
    _points: tuple[BlstP1Element, ...] = field(init=False, repr=False)
    _pub_shares: dict[int, BlstP1Element] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        t, n = self.threshold, self.shares
        if not 1 <= t <= n <= MAX_SHARES:
            raise KeyFileError(f"threshold {t} of {n} shares: need 1 <= t <= n <= {MAX_SHARES}")
        if len(self.commitments) != t:
            raise KeyFileError(f"{t}-of-{n}: expected {t} commitments, got {len(self.commitments)}")
        pts = tuple(_g1_from(c, f"commitment {j}") for j, c in enumerate(self.commitments))
        if self.commitments[0][0] & 0x40:
            raise KeyFileError("the group public key cannot be the point at infinity")
        object.__setattr__(self, "_points", pts)
        object.__setattr__(self, "_pub_shares", {})

    # -- keys ----------------------------------------------------------------------------

    @property
    def group_public_key(self) -> bytes:
        """The group key as CometBFT knows it: 96-byte uncompressed G1."""
        return g1_uncompressed(self.commitments[0])

    @property
    def public_key(self) -> bytes:
        """The group key (:attr:`group_public_key`)."""
        return self.group_public_key

    @property
    def address(self) -> bytes:
        return hashlib.sha256(self.group_public_key).digest()[:20]

    def public_share(self, index: int) -> BlstP1Element:
        """Member ``index``'s public share ``sum_j C_j * index^j``."""
        got = self._pub_shares.get(index)
        if got is None:
            if not 1 <= index <= self.shares:
                raise KeyFileError(f"share index {index} outside 1..{self.shares}")
            acc = self._points[0]
            power = 1
            for pt in self._points[1:]:
                power = power * index % BLS_R
                acc = acc + pt.scalar_mul(power)
            self._pub_shares[index] = got = acc
        return got

    # -- signatures ----------------------------------------------------------------------

    def hash(self, msg: bytes) -> BlstP2Element:
        return BlstP2Element.hash_to_group(msg, self.dst)

    def verify(self, msg: bytes, sig: bytes, *, h: BlstP2Element | None = None) -> bool:
        """Is ``sig`` the group key's signature over ``msg``?"""
        return self._verify(self._points[0], msg, sig, h)

    def verify_share(
        self, index: int, msg: bytes, share: bytes, *, h: BlstP2Element | None = None
    ) -> bool:
        """Is ``share`` member ``index``'s signature share over ``msg``?"""
        try:
            pk = self.public_share(index)
        except KeyFileError:
            return False
        return self._verify(pk, msg, share, h)

    def _verify(self, pk: BlstP1Element, msg: bytes, sig: bytes, h: BlstP2Element | None) -> bool:
        s = _g2_from(sig)
        if s is None:
            return False
        if h is None:
            h = self.hash(msg)
        return bool(final_verify(miller_loop(pk, h), miller_loop(_G1, s)))

    def interpolate(self, shares: Mapping[int, bytes]) -> bytes | None:
        """Lagrange-combine exactly the given shares (no verification); None if one of
        them is not a G2 point or the indices are out of range."""
        if not shares or any(not 1 <= i <= self.shares for i in shares):
            return None
        lam = lagrange_at_zero(shares)
        acc: BlstP2Element | None = None
        for i, sig in shares.items():
            pt = _g2_from(sig)
            if pt is None:
                return None
            term = pt.scalar_mul(lam[i])
            acc = term if acc is None else acc + term
        assert acc is not None
        return acc.compress()

    def prepare(self, msg: bytes) -> Prepared:
        """The work a combining member can do before any share arrives: H(msg) and the
        group key's half of the verification pairing, e(PK, H(msg))'s Miller loop."""
        return self.prepare_batch([msg])

    def prepare_batch(self, msgs: Sequence[bytes]) -> Prepared:
        """:meth:`prepare` for several messages whose combined signatures are verified
        with **one** pairing check (:meth:`combine_many`): H(m_i), secret random 64-bit
        weights w_i (w_0 = 1) and the product of the Miller loops e(w_i * PK, H(m_i)).

        The check is e(sum w_i * S_i, G1) == prod e(PK, H(m_i))^w_i.  If some S_i is wrong
        by a nonzero D_i, it passes only if sum w_i * D_i = 0, which for weights the share
        senders never see holds with probability at most 2^-64."""
        hs = tuple(self.hash(m) for m in msgs)
        weights = (1, *(secrets.randbelow((1 << 64) - 1) + 1 for _ in hs[1:]))
        pk = self._points[0]
        ml = miller_loop(pk, hs[0])
        for h, w in zip(hs[1:], weights[1:], strict=True):
            ml = ml * miller_loop(pk.scalar_mul(w), h)
        return Prepared(hs, weights, ml)

    def combine(
        self,
        msg: bytes,
        shares: Mapping[int, bytes],
        *,
        h: BlstP2Element | None = None,
        own: tuple[int, int] | None = None,
        on_bad: Callable[[int], None] | None = None,
        prepared: Prepared | None = None,
        scaled: frozenset[int] = frozenset(),
    ) -> bytes | None:
        """The group signature over ``msg`` from any ``t`` valid shares, verified against
        the group key; None if there are not ``t`` valid ones.

        ``shares``: index -> 96-byte compressed G2 share; ``own``: (index, secret) of the
        combining member, whose term is computed directly as ``H(m) * (lambda * s)`` (one
        scalar multiplication instead of a share plus its interpolation); ``h``: H(msg)
        if already computed.  The first ``t`` are combined and the result verified once;
        only if that fails is every received share checked (``on_bad(index)`` for each
        bad one) and the valid ones combined.  ``scaled``: received shares already
        multiplied by their Lagrange coefficient for the set {own, i} (t = 2 only: a
        member that knows the set, see :meth:`KeyShare.sign_share`)."""
        if prepared is None and h is not None:
            prepared = Prepared((h,), (1,), miller_loop(self._points[0], h))
        got = self.combine_many(
            [msg], [shares], own=own, on_bad=on_bad, prepared=prepared, scaled=[scaled]
        )
        return None if got is None else got[0]

    def combine_many(
        self,
        msgs: Sequence[bytes],
        shares: Sequence[Mapping[int, bytes]],
        *,
        own: tuple[int, int] | None = None,
        on_bad: Callable[[int], None] | None = None,
        prepared: Prepared | None = None,
        scaled: Sequence[frozenset[int]] | None = None,
    ) -> list[bytes] | None:
        """:meth:`combine` for several messages at once (a precommit's vote and its
        extension): ``shares[i]`` and ``scaled[i]`` belong to ``msgs[i]``; ``prepared``
        from :meth:`prepare_batch` over the same messages.  The first ``t`` shares of every
        message are combined and **all** the results verified with one pairing check
        (one Miller loop and one final exponentiation instead of one each); only if that
        fails is each message combined and verified on its own, every received share
        checked.  The signatures in order, or None unless every message has one."""
        if scaled is None:
            scaled = [frozenset()] * len(msgs)
        if not (len(msgs) == len(shares) == len(scaled)) or not msgs:
            raise ValueError("one share map and one scaled set per message")
        if prepared is None:
            prepared = self.prepare_batch(msgs)
        if len(prepared.hs) != len(msgs):
            raise ValueError("prepared for a different number of messages")
        combos = [
            _Combination(self, h, sh, own, sc)
            for h, sh, sc in zip(prepared.hs, shares, scaled, strict=True)
        ]
        if any(c.short for c in combos):
            return None
        accs = [c.first() for c in combos]
        if all(a is not None for a in accs):
            lhs: BlstP2Element | None = None
            for acc, w in zip(accs, prepared.weights, strict=True):
                assert acc is not None
                term = acc if w == 1 else acc.scalar_mul(w)
                lhs = term if lhs is None else lhs + term
            if final_verify(prepared.ml, miller_loop(_G1, lhs)):
                return [a.compress() for a in accs if a is not None]
        out = [c.checked(on_bad) for c in combos]  # every bad share reported
        if any(sig is None for sig in out):
            return None
        return [sig for sig in out if sig is not None]

    @staticmethod
    def _verify_point(pk: BlstP1Element, h: BlstP2Element, sig: BlstP2Element) -> bool:
        return bool(final_verify(miller_loop(pk, h), miller_loop(_G1, sig)))

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "shares": self.shares,
            "group_public_key": base64.b64encode(self.group_public_key).decode(),
            "address": self.address.hex().upper(),
            "commitments": [base64.b64encode(c).decode() for c in self.commitments],
        }


@dataclass(frozen=True, slots=True)
class Prepared:
    """See :meth:`ThresholdPublic.prepare` and :meth:`ThresholdPublic.prepare_batch`."""

    hs: tuple[BlstP2Element, ...]  # H(m_i)
    weights: tuple[int, ...]  # the batch's secret weights, weights[0] = 1
    ml: Any  # prod miller_loop(weights[i] * group key, hs[i])

    @property
    def h(self) -> BlstP2Element:
        """H(m) of the first (or only) message."""
        return self.hs[0]


class _Combination:
    """One message's combination inside :meth:`ThresholdPublic.combine_many`."""

    def __init__(
        self,
        pub: ThresholdPublic,
        h: BlstP2Element,
        shares: Mapping[int, bytes],
        own: tuple[int, int] | None,
        scaled: frozenset[int],
    ) -> None:
        t = pub.threshold
        if scaled and (t != 2 or own is None):
            raise ValueError("pre-scaled shares are for t = 2 with the combiner's own share")
        self.pub, self.h, self.shares, self.own, self.scaled = pub, h, shares, own, scaled
        self.need = t - (1 if own is not None else 0)
        self.received = [i for i in shares if own is None or i != own[0]]
        self.short = len(self.received) < self.need
        self._pts: dict[int, BlstP2Element | None] = {}

    def _point(self, i: int) -> BlstP2Element | None:
        if i not in self._pts:
            self._pts[i] = _g2_from(self.shares[i])
        return self._pts[i]

    def _attempt(self, others: list[int]) -> BlstP2Element | None:
        pub, own = self.pub, self.own
        idx = ([own[0]] if own is not None else []) + others
        if len(idx) != pub.threshold or any(not 1 <= i <= pub.shares for i in idx):
            return None
        lam = lagrange_at_zero(idx)
        acc = None if own is None else self.h.scalar_mul(lam[own[0]] * own[1] % BLS_R)
        for i in others:
            pt = self._point(i)
            if pt is None:
                return None
            term = pt if i in self.scaled else pt.scalar_mul(lam[i])
            acc = term if acc is None else acc + term
        return acc

    def first(self) -> BlstP2Element | None:
        """The first ``t`` shares combined, unverified."""
        return self._attempt(self.received[: self.need])

    def _share_key(self, i: int) -> BlstP1Element:
        if i not in self.scaled:
            return self.pub.public_share(i)
        assert self.own is not None
        return self.pub.public_share(i).scalar_mul(lagrange_at_zero([self.own[0], i])[i])

    def checked(self, on_bad: Callable[[int], None] | None) -> bytes | None:
        """Every received share verified on its own (``on_bad`` for each bad one), the
        valid ones combined and the result verified; None without ``t`` valid ones."""
        pub, h = self.pub, self.h
        good = []
        for i in self.received:
            pt = self._point(i)
            if pt is not None and pub._verify_point(self._share_key(i), h, pt):
                good.append(i)
            elif on_bad is not None:
                on_bad(i)
        if len(good) < self.need:
            return None
        acc = self._attempt(good[: self.need])
        if acc is None or not pub._verify_point(pub._points[0], h, acc):
            return None  # cannot happen with valid shares and a valid own share
        return acc.compress()


@dataclass(frozen=True, eq=False)
class KeyShare:
    """One member's share ``s_i = f(i)`` and the public data it belongs to."""

    index: int
    secret: int
    public: ThresholdPublic

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.public.shares:
            raise KeyFileError(f"share index {self.index} outside 1..{self.public.shares}")
        if not 0 < self.secret < BLS_R:
            raise KeyFileError("a secret share must be a nonzero scalar below r")

    def __repr__(self) -> str:  # never the secret
        return (
            f"<KeyShare {self.index} of {self.public.threshold}-of-{self.public.shares} "
            f"address={self.public.address.hex().upper()}>"
        )

    def check(self) -> bool:
        """Feldman: does the share match the commitments (``s_i * G1 == PK_i``)?"""
        return _G1.scalar_mul(self.secret) == self.public.public_share(self.index)

    def sign_share(
        self, msg: bytes, *, h: BlstP2Element | None = None, with_partner: int | None = None
    ) -> bytes:
        """This member's signature share over ``msg`` (96-byte compressed G2); with
        ``with_partner`` (t = 2) already multiplied by this member's Lagrange coefficient
        for the set {with_partner, this member}: the term that member adds to its own."""
        if h is None:
            h = self.public.hash(msg)
        s = self.secret
        if with_partner is not None:
            if self.public.threshold != 2 or with_partner == self.index:
                raise ValueError("a pre-scaled share is for t = 2 and another member")
            s = s * lagrange_at_zero([with_partner, self.index])[self.index] % BLS_R
        return h.scalar_mul(s).compress()

    def secret_bytes(self) -> bytes:
        return self.secret.to_bytes(32, "big")


def split(
    secret: bytes | int | None,
    threshold: int,
    shares: int,
    *,
    dst: bytes = BLS_DEFAULT_DST,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> list[KeyShare]:
    """Split the 32-byte BLS secret ``secret`` (a fresh random one if None) into ``shares``
    shares, any ``threshold`` of which sign; indices 1..shares."""
    t, n = threshold, shares
    if not 1 <= t <= n <= MAX_SHARES:
        raise KeyFileError(f"threshold {t} of {n} shares: need 1 <= t <= n <= {MAX_SHARES}")
    if secret is None:
        s = 1 + randbelow(BLS_R - 1)
    else:
        s = int.from_bytes(secret, "big") if isinstance(secret, bytes | bytearray) else secret
        if not 0 < s < BLS_R:
            raise KeyFileError("invalid BLS12-381 secret: the scalar is 0 or not below r")
    coeffs = [s] + [1 + randbelow(BLS_R - 1) for _ in range(t - 1)]
    commitments = tuple(_G1.scalar_mul(a).compress() for a in coeffs)
    public = ThresholdPublic(t, n, commitments, dst=bytes(dst))
    out = []
    for i in range(1, n + 1):
        y = 0
        for a in reversed(coeffs):  # Horner
            y = (y * i + a) % BLS_R
        out.append(KeyShare(i, y, public))
    return out


# ---- the share key file -------------------------------------------------------------------


def share_file_json(share: KeyShare) -> dict[str, Any]:
    return {
        "type": SHARE_FILE_TYPE,
        "version": _FILE_VERSION,
        **share.public.to_json(),
        "index": share.index,
        "secret_share": base64.b64encode(share.secret_bytes()).decode(),
    }


def write_share_file(
    path: str | os.PathLike[str], share: KeyShare, *, overwrite: bool = False
) -> None:
    """Write member ``share.index``'s key file (mode 0600, atomically)."""
    text = json.dumps(share_file_json(share), indent=2) + "\n"
    write_private_file(path, text.encode("ascii"), overwrite=overwrite)


def _b64(doc: Mapping[str, Any], key: str, p: str) -> bytes:
    return _strict_b64(doc.get(key), key, p)


def _int(doc: Mapping[str, Any], key: str, p: str) -> int:
    v = doc.get(key)
    if type(v) is not int:
        raise KeyFileError(f"{p}: {key} must be an integer")
    return v


def load_share_file(
    path: str | os.PathLike[str],
    *,
    dst: bytes = BLS_DEFAULT_DST,
    check_permissions: bool = True,
) -> KeyShare:
    """Load and check a share key file: the commitments, the group key and the share must
    agree (Feldman); anything else is a :class:`KeyFileError` naming the file."""
    p = os.fspath(path)
    raw = read_private_file(p, what="threshold share file", check_permissions=check_permissions)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (JSONDecodeError, int()'s digit limit)
        raise KeyFileError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("type") != SHARE_FILE_TYPE:
        raise KeyFileError(f"{p}: not a threshold share file (type must be {SHARE_FILE_TYPE!r})")
    if doc.get("version") != _FILE_VERSION:
        raise KeyFileError(f"{p}: share file version {doc.get('version')!r} is not known")
    comms = doc.get("commitments")
    if not isinstance(comms, list):
        raise KeyFileError(f"{p}: commitments must be a list")
    try:
        public = ThresholdPublic(
            _int(doc, "threshold", p),
            _int(doc, "shares", p),
            tuple(_b64({"c": c}, "c", p) for c in comms),
            dst=bytes(dst),
        )
        if _b64(doc, "group_public_key", p) not in (
            public.group_public_key,
            public.commitments[0],
        ):
            raise KeyFileError("group_public_key is not the first commitment")
        secret = _b64(doc, "secret_share", p)
        if len(secret) != 32:
            raise KeyFileError(f"secret_share is 32 bytes, got {len(secret)}")
        share = KeyShare(_int(doc, "index", p), int.from_bytes(secret, "big"), public)
    except KeyFileError as e:
        msg = str(e)
        raise KeyFileError(msg if msg.startswith(p) else f"{p}: {msg}") from None
    if not share.check():
        raise KeyFileError(
            f"{p}: the secret share of member {share.index} does not match the commitments "
            "(a corrupted file, or a share of another split)"
        )
    return share


def same_split(shares: Sequence[KeyShare]) -> bool:
    """Do all ``shares`` belong to one split (same threshold, size and commitments)?"""
    if not shares:
        return True
    a = shares[0].public
    return all(
        s.public.threshold == a.threshold
        and s.public.shares == a.shares
        and s.public.commitments == a.commitments
        for s in shares
    )
