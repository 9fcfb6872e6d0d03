"""Dealerless key generation for threshold BLS12-381: no machine ever holds the whole key.

:func:`nebula.crypto.threshold.split` is dealer-based: one machine holds the whole key for
a moment.  This module is Pedersen's distributed key generation with Feldman commitments
(the first phase of Gennaro-Jarecki-Krawczyk-Rabin's DKG), as an operator ceremony in
file rounds.  Its result is, for member ``j``, a :class:`~nebula.crypto.threshold.KeyShare`
of exactly the kind ``split`` makes (and the same share key file), so everything that
loads share files works unchanged.  Sans-I/O: pure functions over bytes, ints and JSON
documents; the CLI (:mod:`nebula.cli.dkg`) reads and writes the files.

The ceremony (members ``1..n``, member ``i`` = the Raft node id that will hold share
``i``; threshold ``t``, ``2 <= t <= n``):

1. **init** (each member, offline): :func:`new_member` makes a ceremony identity: an
   X25519 key pair (to receive encrypted shares) and an Ed25519 key pair (to sign what it
   deals).  The public half, signed by the Ed25519 key (:class:`MemberPublic`: index,
   X25519 key, Ed25519 key), goes to every other member; the secret half
   (:class:`MemberSecret`) stays on the member's machine.
2. **deal** (each member, once every member's public file is there): the *ceremony* is
   the threshold and the n public member files; its id is
   ``SHA-256(domain || t || n || member 1 || ... || member n)`` (:class:`Ceremony`).
   Member ``i`` draws a random polynomial ``f_i(x) = a_i0 + a_i1 x + ... + a_i,t-1 x^(t-1)``
   over the scalar field (every coefficient nonzero), publishes the Feldman commitments
   ``C_ik = a_ik * G1`` and, for every member ``j`` including itself, a libsodium sealed
   box to ``j``'s X25519 key holding ``ceremony id || i || j || f_i(j)``.  The deal
   (ceremony id, dealer, t, n, commitments, ciphertexts) is signed with ``i``'s Ed25519 key
   (:func:`make_deal`).  The coefficients exist only in memory during the call; only the
   encrypted evaluations and the commitments are written.
3. **finish** (each member, with all n deals): :func:`finish` checks each deal - signed by
   its dealer's ceremony key, for this ceremony id, t and n, exactly one per member, its
   commitments valid G1 points other than infinity, the sealed box for this member opens
   with this member's key and names this ceremony, the dealer and this member, and the
   value is below r and lies on the dealer's committed polynomial
   (``f_i(j) * G1 == sum_k C_ik * j^k``).  Every deal that fails is named with its dealer
   (:class:`~nebula.errors.DealRefused`) and nothing is produced.  Otherwise member ``j``'s
   share is ``s_j = sum_i f_i(j)`` (mod r), the group commitments are
   ``C_k = sum_i C_ik`` and the group public key is ``C_0``: ``s_j`` is the evaluation at
   ``j`` of ``F = sum_i f_i``, whose commitments are the ``C_k``, so ``KeyShare.check``
   holds and any t shares interpolate ``F(0) = sum_i a_i0``, the group secret, which no
   machine ever computes.  The **transcript hash** (SHA-256 over the ceremony id and the
   signed bytes of the n deals in dealer order) is printed on every member.

What the members must compare, over a channel the operator does not control (a call, a
chat signed by someone they know): the **ceremony id** before they hand over their deal,
and the **transcript hash** and group address after finish.  Equal transcript hashes
mean every member used the same member keys, the same t and n and the same n deals,
hence holds a share of the same group key; a member whose finish failed, or whose hash
differs, means the ceremony failed: every member deletes what finish wrote and the
ceremony restarts (a member's own bad deal is replaced by a new one: the others' deals
stay valid, as long as every member then uses the same files again).

Security argument, against an adversary that controls the operator (it carries, drops,
reorders, replays or replaces any file) and up to ``t - 1`` members:

* *Secrecy.*  The group secret is ``sum_i a_i0``.  An honest member ``h`` keeps ``f_h``
  in memory only; the adversary sees ``C_hk`` (which reveal ``a_h0 * G1``, the honest
  share of the public key, nothing more under the discrete logarithm assumption) and the
  ``t - 1`` evaluations ``f_h(j)`` for the members ``j`` it controls: ``t - 1`` points of
  a random polynomial of degree ``t - 1`` are independent of ``f_h(0)`` (Shamir).  The
  evaluations for honest members are sealed to their X25519 keys.  So the adversary
  learns nothing about ``a_h0``, hence nothing about the group secret beyond the public
  key.  One machine sees only its own polynomial, the evaluations sealed to it and public
  commitments: with ``n >= t >= 2`` that is one share, not the key.
* *Substituted member keys.*  Every member file is self-signed; each member refuses a
  member list whose entry for itself is not its own identity, and the ceremony id covers
  every member's keys, so a list that differs between members gives different ceremony
  ids (compared out of band) and every deal is refused by a member with another list.
  The operator can still swap an *entire* identity consistently for all other members
  (it cannot forge the member's own); that member then refuses the list, and out-of-band
  comparison of the ceremony id catches it before anyone deals.
* *Replays and copies.*  A deal names its ceremony id, t and n under its dealer's
  signature, and every plaintext names the ceremony, its dealer and its recipient: a
  deal from another ceremony (other member keys or another t) is refused, and a dealer
  cannot re-sign another dealer's ciphertexts as its own (they name the other dealer).
* *Bad deals.*  A dealer that deals inconsistent values is caught by the Feldman check
  at the member that received them and named there.  The dealer cannot pick a
  constant-term commitment whose logarithm it does not know (rogue key) as long as the
  honest members' checks pin its polynomial: with t-1 colluding dealers, n-t+1 honest
  members each check one evaluation, which is at least t only when n >= 2t-1.  A larger
  t is refused (a review found a rushing dealer of a 3-of-3 ceremony learning the whole
  key: a constant term ``x*G1 - Q`` against the others' sum ``Q``, with higher
  coefficients that cancel ``Q`` at the two honest members' points).  A proof of knowledge
  of each ``a_i0`` would lift the limit; it is not built.  Disputes ("dealer i's value for me is
  wrong" vs "member j lies") can be settled by member j revealing its ceremony X25519
  secret (the ceremony is void anyway; j makes a new identity); this is not automated.
* *Bias.*  Pedersen's DKG lets a rushing dealer (one who deals last, having seen the
  other deals, or who makes the ceremony restart until it likes the outcome) bias the
  distribution of the group public key (Gennaro et al., J. Cryptology 2007).  That is
  acceptable here: the dealer still cannot learn the group secret, and it only chooses
  among keys ``PK_h + a * G1`` where ``PK_h`` is an honest dealer's uniformly random
  contribution and ``a`` a scalar fixed by the other deals.  A forgery under such a key
  gives one under ``PK_h`` (subtract ``a * H(m)``; BLS signatures are unique), which is
  the intuition behind GJKR's proof that Pedersen's DKG is good enough for threshold
  signatures of this kind ("Secure applications of Pedersen's distributed key
  generation protocol", CT-RSA 2003).  What can be biased is a property of the public
  key (e.g. its address's first bits), which any validator can already grind for its own
  key.  A commit-then-reveal round would not remove the bias (a member can still refuse
  to reveal and force a restart), so it is not built.
* *Ceremony secrets.*  A member's ceremony X25519 secret and the (public) deal files
  together give that member's share: after the ceremony succeeded (every member compared
  the transcript hash), each member deletes its ceremony secret file.  Python cannot
  erase the polynomial's coefficients from memory; they live in the dealing process only.

``t = 1`` is refused: a 1-of-n share is the whole key (every member's share is the group
secret), the opposite of this module's purpose; ``nebula keys generate`` makes such a key.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.exceptions import RuntimeError as NaclRuntimeError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey
from pyblst import BlstP1Element

from nebula.crypto.keys import _G1, BLS_DEFAULT_DST, BLS_R, _strict_b64
from nebula.crypto.threshold import MAX_SHARES, KeyShare, ThresholdPublic
from nebula.errors import DealRefused, KeyFileError

__all__ = [
    "DEAL_FILE_TYPE",
    "MEMBER_FILE_TYPE",
    "MEMBER_SECRET_TYPE",
    "Ceremony",
    "Deal",
    "DkgResult",
    "MemberPublic",
    "MemberSecret",
    "finish",
    "make_deal",
    "new_member",
    "transcript_hash",
]

MEMBER_FILE_TYPE = "nebula/DkgMember"
MEMBER_SECRET_TYPE = "nebula/DkgMemberSecret"
DEAL_FILE_TYPE = "nebula/DkgDeal"
_VERSION = 1
MIN_THRESHOLD = 2

_D_MEMBER = b"nebula/dkg/v1/member\x00"
_D_CEREMONY = b"nebula/dkg/v1/ceremony\x00"
_D_DEAL = b"nebula/dkg/v1/deal\x00"
_D_TRANSCRIPT = b"nebula/dkg/v1/transcript\x00"

_PLAIN_LEN = 32 + 2 + 2 + 32  # ceremony id, dealer, recipient, f_i(j)
_SEALED_LEN = _PLAIN_LEN + 48  # a sealed box adds an ephemeral X25519 key and a MAC


def _u16(v: int) -> bytes:
    return struct.pack(">H", v)


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_size(threshold: int, shares: int) -> None:
    t, n = threshold, shares
    if not MIN_THRESHOLD <= t <= n <= MAX_SHARES:
        raise KeyFileError(
            f"a {t}-of-{n} key generation: need {MIN_THRESHOLD} <= t <= n <= {MAX_SHARES} "
            "(with t = 1 every share is the whole key: use `nebula keys generate`)"
        )
    if n < 2 * t - 1:
        # t-1 colluding dealers leave n-t+1 honest members, each checking one evaluation
        # of every deal; fewer than t checks do not pin a deal's polynomial, and a dealer
        # that deals last can then choose a constant term that cancels the others' and
        # learn the group secret (found in review: 3-of-3, one dealer, the whole key).
        raise KeyFileError(
            f"a {t}-of-{n} key generation is refused: the dealerless ceremony needs "
            f"n >= 2t - 1 (at most t = {(n + 1) // 2} for n = {n}), or a dealer can learn "
            "the whole key; for a larger t, split a key with `nebula keys split`"
        )


# ---- ceremony identities --------------------------------------------------------------


@dataclass(frozen=True)
class MemberPublic:
    """A member's public ceremony identity (the file every other member gets)."""

    index: int
    #: X25519 public key: deals seal this member's values to it
    encryption_key: bytes
    #: Ed25519 public key: this member's deal is signed by it
    verify_key: bytes
    #: Ed25519 signature of :meth:`signed_bytes` by ``verify_key``
    signature: bytes

    def __post_init__(self) -> None:
        i = self.index
        if type(i) is not int or not 1 <= i <= MAX_SHARES:
            raise KeyFileError(f"member index {i!r} outside 1..{MAX_SHARES}")
        if len(self.encryption_key) != 32 or len(self.verify_key) != 32:
            raise KeyFileError(f"member {i}: a ceremony public key is 32 bytes")
        try:
            VerifyKey(bytes(self.verify_key)).verify(self.signed_bytes(), bytes(self.signature))
        except (BadSignatureError, ValueError, CryptoError):
            raise KeyFileError(
                f"member {i}: the member file's signature does not verify (a corrupted or "
                "forged member file)"
            ) from None

    def signed_bytes(self) -> bytes:
        return _D_MEMBER + _u16(self.index) + self.encryption_key + self.verify_key

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming this identity (to read aloud)."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": MEMBER_FILE_TYPE,
            "version": _VERSION,
            "index": self.index,
            "encryption_key": _b64e(self.encryption_key),
            "verify_key": _b64e(self.verify_key),
            "signature": _b64e(self.signature),
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> MemberPublic:
        """Parse a member file's JSON document; :class:`KeyFileError` naming ``where``."""
        if not isinstance(doc, dict) or doc.get("type") != MEMBER_FILE_TYPE:
            raise KeyFileError(f"{where}: not a DKG member file (type {MEMBER_FILE_TYPE!r})")
        if doc.get("version") != _VERSION:
            raise KeyFileError(f"{where}: member file version {doc.get('version')!r} unknown")
        try:
            return cls(
                _int(doc, "index", where),
                _strict_b64(doc.get("encryption_key"), "encryption_key", where),
                _strict_b64(doc.get("verify_key"), "verify_key", where),
                _strict_b64(doc.get("signature"), "signature", where),
            )
        except KeyFileError as e:
            raise KeyFileError(_at(where, e)) from None


@dataclass(frozen=True, repr=False)
class MemberSecret:
    """A member's secret ceremony identity (stays on its machine, mode 0600)."""

    index: int
    encryption_secret: bytes  # X25519 secret key
    signing_seed: bytes  # Ed25519 seed
    _public: MemberPublic = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.index) is not int or not 1 <= self.index <= MAX_SHARES:
            raise KeyFileError(f"member index {self.index!r} outside 1..{MAX_SHARES}")
        if len(self.encryption_secret) != 32 or len(self.signing_seed) != 32:
            raise KeyFileError("a ceremony secret key is 32 bytes")
        enc = bytes(PrivateKey(bytes(self.encryption_secret)).public_key)
        sk = SigningKey(bytes(self.signing_seed))
        vk = bytes(sk.verify_key)
        sig = sk.sign(_D_MEMBER + _u16(self.index) + enc + vk).signature
        object.__setattr__(self, "_public", MemberPublic(self.index, enc, vk, sig))

    def __repr__(self) -> str:  # never the secrets
        return f"<MemberSecret {self.index} {self._public.fingerprint}>"

    @property
    def public(self) -> MemberPublic:
        return self._public

    def sign(self, msg: bytes) -> bytes:
        return SigningKey(bytes(self.signing_seed)).sign(msg).signature

    def open(self, sealed: bytes) -> bytes:
        """Open a sealed box addressed to this member (CryptoError if it is not)."""
        return SealedBox(PrivateKey(bytes(self.encryption_secret))).decrypt(bytes(sealed))

    def to_json(self) -> dict[str, Any]:
        return {
            "type": MEMBER_SECRET_TYPE,
            "version": _VERSION,
            "index": self.index,
            "encryption_secret": _b64e(self.encryption_secret),
            "signing_seed": _b64e(self.signing_seed),
            "fingerprint": self.public.fingerprint,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> MemberSecret:
        if not isinstance(doc, dict) or doc.get("type") != MEMBER_SECRET_TYPE:
            raise KeyFileError(
                f"{where}: not a DKG member secret file (type {MEMBER_SECRET_TYPE!r})"
            )
        if doc.get("version") != _VERSION:
            raise KeyFileError(f"{where}: secret file version {doc.get('version')!r} unknown")
        try:
            return cls(
                _int(doc, "index", where),
                _strict_b64(doc.get("encryption_secret"), "encryption_secret", where),
                _strict_b64(doc.get("signing_seed"), "signing_seed", where),
            )
        except KeyFileError as e:
            raise KeyFileError(_at(where, e)) from None


def new_member(index: int, *, random: Callable[[int], bytes] = secrets.token_bytes) -> MemberSecret:
    """A fresh ceremony identity for member ``index`` (its Raft node id)."""
    return MemberSecret(index, random(32), random(32))


@dataclass(frozen=True)
class Ceremony:
    """The threshold and the n members' public identities, indices 1..n."""

    threshold: int
    members: tuple[MemberPublic, ...]
    id: bytes = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.members)
        got = [m.index for m in self.members]
        if got != list(range(1, n + 1)):
            missing = sorted(set(range(1, n + 1)) - set(got))
            dup = sorted({i for i in got if got.count(i) > 1})
            raise KeyFileError(
                f"the member files must be members 1..{n}, one each: got {sorted(got)}"
                + (f" (two files for member {dup})" if dup else "")
                + (f" (none for member {missing})" if missing else "")
            )
        _check_size(self.threshold, n)
        for attr in ("encryption_key", "verify_key"):
            seen: dict[bytes, int] = {}
            for m in self.members:
                k = getattr(m, attr)
                if k in seen:
                    raise KeyFileError(
                        f"members {seen[k]} and {m.index} have the same {attr.replace('_', ' ')}"
                    )
                seen[k] = m.index
        body = _D_CEREMONY + _u16(self.threshold) + _u16(n)
        body += b"".join(m.signed_bytes() for m in self.members)
        object.__setattr__(self, "id", hashlib.sha256(body).digest())

    @classmethod
    def of(cls, threshold: int, members: Iterable[MemberPublic]) -> Ceremony:
        """The ceremony of ``members`` in any order (sorted by index)."""
        return cls(threshold, tuple(sorted(members, key=lambda m: m.index)))

    @property
    def shares(self) -> int:
        return len(self.members)

    def member(self, index: int) -> MemberPublic:
        return self.members[index - 1]

    def check_me(self, me: MemberSecret) -> None:
        """Refuse a member list whose entry for ``me`` is not ``me``'s identity."""
        if not 1 <= me.index <= self.shares:
            raise KeyFileError(f"member {me.index} is not one of the members 1..{self.shares}")
        theirs = self.member(me.index)
        if (theirs.encryption_key, theirs.verify_key) != (
            me.public.encryption_key,
            me.public.verify_key,
        ):
            raise KeyFileError(
                f"the member file for member {me.index} is not this member's ceremony identity "
                f"(it has {theirs.fingerprint}, this member is {me.public.fingerprint}): "
                "a substituted or stale member file"
            )


# ---- deals --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deal:
    """Member ``dealer``'s signed deal: commitments and one sealed value per member."""

    ceremony: bytes
    dealer: int
    threshold: int
    shares: int
    commitments: tuple[bytes, ...]  # t compressed G1 points C_i0 .. C_i,t-1
    ciphertexts: tuple[bytes, ...]  # n sealed boxes, member 1 .. n
    signature: bytes

    def __post_init__(self) -> None:
        i = self.dealer
        if type(i) is not int or not 1 <= i <= MAX_SHARES:
            raise KeyFileError(f"deal: dealer {i!r} outside 1..{MAX_SHARES}")

        def bad(msg: str) -> DealRefused:
            return DealRefused(f"the deal of dealer {i}: {msg}", [i])

        if type(self.threshold) is not int or type(self.shares) is not int:
            raise bad("threshold and shares must be integers")
        if not 1 <= self.threshold <= self.shares <= MAX_SHARES:
            raise bad(f"a {self.threshold}-of-{self.shares} deal makes no sense")
        if len(self.ceremony) != 32:
            raise bad("the ceremony id is 32 bytes")
        if len(self.commitments) != self.threshold or any(len(c) != 48 for c in self.commitments):
            raise bad(f"expected {self.threshold} commitments of 48 bytes")
        if len(self.ciphertexts) != self.shares or any(
            len(c) != _SEALED_LEN for c in self.ciphertexts
        ):
            raise bad(f"expected {self.shares} sealed values of {_SEALED_LEN} bytes")
        if len(self.signature) != 64:
            raise bad("the signature is 64 bytes")

    def signed_bytes(self) -> bytes:
        return (
            _D_DEAL
            + self.ceremony
            + _u16(self.dealer)
            + _u16(self.threshold)
            + _u16(self.shares)
            + b"".join(self.commitments)
            + b"".join(self.ciphertexts)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": DEAL_FILE_TYPE,
            "version": _VERSION,
            "ceremony": self.ceremony.hex(),
            "dealer": self.dealer,
            "threshold": self.threshold,
            "shares": self.shares,
            "commitments": [_b64e(c) for c in self.commitments],
            "ciphertexts": [_b64e(c) for c in self.ciphertexts],
            "signature": _b64e(self.signature),
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Deal:
        """Parse a deal file's JSON document; errors name ``where`` (and the dealer)."""
        if not isinstance(doc, dict) or doc.get("type") != DEAL_FILE_TYPE:
            raise KeyFileError(f"{where}: not a DKG deal file (type {DEAL_FILE_TYPE!r})")
        if doc.get("version") != _VERSION:
            raise KeyFileError(f"{where}: deal file version {doc.get('version')!r} unknown")
        try:
            dealer = _int(doc, "dealer", where)
            cer_hex = doc.get("ceremony")
            try:
                cer = bytes.fromhex(cer_hex if isinstance(cer_hex, str) else "?")
            except ValueError:
                raise DealRefused(
                    f"the deal of dealer {dealer}: bad ceremony id", [dealer]
                ) from None
            lists: dict[str, tuple[bytes, ...]] = {}
            for key in ("commitments", "ciphertexts"):
                v = doc.get(key)
                if not isinstance(v, list):
                    raise DealRefused(
                        f"the deal of dealer {dealer}: {key} must be a list", [dealer]
                    )
                lists[key] = tuple(_strict_b64(x, key, where) for x in v)
            return cls(
                cer,
                dealer,
                _int(doc, "threshold", where),
                _int(doc, "shares", where),
                lists["commitments"],
                lists["ciphertexts"],
                _strict_b64(doc.get("signature"), "signature", where),
            )
        except DealRefused as e:
            raise DealRefused(_at(where, e), e.dealers) from None
        except KeyFileError as e:
            raise KeyFileError(_at(where, e)) from None


def make_deal(
    ceremony: Ceremony,
    me: MemberSecret,
    *,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> Deal:
    """Member ``me``'s deal for ``ceremony``: a fresh random polynomial of degree t - 1,
    its commitments and its value at every member, sealed to that member."""
    ceremony.check_me(me)
    t, n = ceremony.threshold, ceremony.shares
    coeffs = [1 + randbelow(BLS_R - 1) for _ in range(t)]
    commitments = tuple(_G1.scalar_mul(a).compress() for a in coeffs)
    sealed = []
    for m in ceremony.members:
        y = 0
        for a in reversed(coeffs):  # Horner
            y = (y * m.index + a) % BLS_R
        plain = ceremony.id + _u16(me.index) + _u16(m.index) + y.to_bytes(32, "big")
        try:
            sealed.append(SealedBox(PublicKey(m.encryption_key)).encrypt(plain))
        except (CryptoError, NaclRuntimeError, ValueError):
            raise KeyFileError(
                f"member {m.index}'s encryption key is unusable (a low-order X25519 point?)"
            ) from None
    del coeffs
    unsigned = Deal(ceremony.id, me.index, t, n, commitments, tuple(sealed), bytes(64))
    return Deal(
        ceremony.id, me.index, t, n, commitments, tuple(sealed), me.sign(unsigned.signed_bytes())
    )


def _check_deal(ceremony: Ceremony, me: MemberSecret, deal: Deal) -> tuple[int, ThresholdPublic]:
    """Member ``me``'s value from ``deal`` and the dealer's commitments; DealRefused."""
    i, j = deal.dealer, me.index
    t, n = ceremony.threshold, ceremony.shares

    def bad(msg: str) -> DealRefused:
        return DealRefused(f"the deal of dealer {i}: {msg}", [i])

    if (deal.threshold, deal.shares) != (t, n):
        raise bad(
            f"it is for a {deal.threshold}-of-{deal.shares} key, this ceremony makes a "
            f"{t}-of-{n} key"
        )
    if not 1 <= i <= n:
        raise bad(f"dealer {i} is not one of the members 1..{n}")
    if deal.ceremony != ceremony.id:
        raise bad(
            f"it was made for another ceremony ({deal.ceremony.hex()[:16]}..., this one is "
            f"{ceremony.id.hex()[:16]}...): other member files, or a replayed deal"
        )
    try:
        VerifyKey(ceremony.member(i).verify_key).verify(deal.signed_bytes(), deal.signature)
    except (BadSignatureError, ValueError, CryptoError):
        raise bad(f"its signature does not verify under member {i}'s ceremony key") from None
    for k, c in enumerate(deal.commitments):
        if c[0] & 0x40:
            raise bad(f"commitment {k} is the point at infinity")
    try:
        public = ThresholdPublic(t, n, deal.commitments)
    except KeyFileError as e:
        raise bad(str(e)) from None
    try:
        plain = me.open(deal.ciphertexts[j - 1])
    except (CryptoError, NaclRuntimeError, ValueError):
        raise bad(f"its sealed value for member {j} does not open with member {j}'s key") from None
    if len(plain) != _PLAIN_LEN or plain[:36] != ceremony.id + _u16(i) + _u16(j):
        raise bad(
            f"its sealed value for member {j} is not a value from dealer {i} to member {j} "
            "in this ceremony"
        )
    y = int.from_bytes(plain[36:], "big")
    if y >= BLS_R:
        raise bad(f"its value for member {j} is not a scalar below r")
    if _G1.scalar_mul(y) != public.public_share(j):
        raise bad(f"its value for member {j} does not match its commitments (Feldman check failed)")
    return y, public


@dataclass(frozen=True)
class DkgResult:
    """What :func:`finish` gives member ``share.index``."""

    share: KeyShare
    ceremony: Ceremony
    #: SHA-256 over the ceremony id and the n deals: every member must see the same
    transcript: bytes

    @property
    def public(self) -> ThresholdPublic:
        return self.share.public


def transcript_hash(ceremony: Ceremony, deals: Iterable[Deal]) -> bytes:
    """SHA-256 over the ceremony id and each deal's signed bytes, in dealer order."""
    h = hashlib.sha256(_D_TRANSCRIPT + ceremony.id)
    for d in sorted(deals, key=lambda d: d.dealer):
        h.update(hashlib.sha256(d.signed_bytes()).digest())
    return h.digest()


def finish(
    ceremony: Ceremony,
    me: MemberSecret,
    deals: Sequence[Deal],
    *,
    dst: bytes = BLS_DEFAULT_DST,
) -> DkgResult:
    """Check all n deals and sum member ``me``'s share and the group commitments.

    Every deal that fails a check is named (with its dealer) in one :class:`DealRefused`
    whose ``dealers`` lists them; so are missing and duplicated dealers."""
    ceremony.check_me(me)
    t, n = ceremony.threshold, ceremony.shares
    problems: dict[int, list[str]] = {}
    by_dealer: dict[int, Deal] = {}
    for d in deals:
        if d.dealer in by_dealer:
            same = d.signed_bytes() == by_dealer[d.dealer].signed_bytes()
            problems.setdefault(d.dealer, []).append(
                f"dealer {d.dealer} has two deals"
                + (" (the same deal given twice)" if same else " (two different deals)")
            )
        else:
            by_dealer[d.dealer] = d
    values: dict[int, tuple[int, ThresholdPublic]] = {}
    for i, d in by_dealer.items():
        if i in problems:
            continue
        try:
            values[i] = _check_deal(ceremony, me, d)
        except DealRefused as e:
            problems.setdefault(i, []).append(str(e))
    for i in range(1, n + 1):
        if i not in by_dealer:
            problems.setdefault(i, []).append(
                f"no deal from dealer {i}" + (" (this member's own deal)" if i == me.index else "")
            )
    if problems:
        names = sorted(problems)
        raise DealRefused(
            f"member {me.index} refuses the deals of dealer(s) {', '.join(map(str, names))}: "
            + "; ".join(p for i in names for p in problems[i])
            + ". Nothing was written; the ceremony restarts (a new deal from each named "
            "dealer, the same files for every member)",
            names,
        )
    secret = sum(y for y, _ in values.values()) % BLS_R
    group: list[BlstP1Element] = []
    for k in range(t):
        acc: BlstP1Element | None = None
        for i in range(1, n + 1):
            pt = BlstP1Element.uncompress(by_dealer[i].commitments[k])
            acc = pt if acc is None else acc + pt
        assert acc is not None
        group.append(acc)
    public = ThresholdPublic(t, n, tuple(p.compress() for p in group), dst=bytes(dst))
    share = KeyShare(me.index, secret, public)
    if not share.check():  # the sum of checked values on the sum of the polynomials
        raise KeyFileError("internal error: the summed share does not match the commitments")
    return DkgResult(share, ceremony, transcript_hash(ceremony, by_dealer.values()))


# ---- helpers ----------------------------------------------------------------------------------


def _int(doc: Mapping[str, Any], key: str, where: str) -> int:
    v = doc.get(key)
    if type(v) is not int:
        raise KeyFileError(f"{where}: {key} must be an integer")
    return v


def _at(where: str, e: Exception) -> str:
    msg = str(e)
    return msg if msg.startswith(where) else f"{where}: {msg}"
