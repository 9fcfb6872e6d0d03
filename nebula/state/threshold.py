"""Threshold BLS on the Raft replication (BLS-Raft): no member holds the whole key.

Each member of an n-member cluster holds one share of a t-of-n split of the validator's
BLS12-381 key (:mod:`nebula.crypto.threshold`; member i holds share i, i = its Raft node
id).  A signing decision is a ``TSIGN`` log command carrying the sign bytes (and the
vote-extension sign bytes) but no signature.  Then:

1. the leader proposes it and, while the followers append, signs its own share;
2. a follower appends the entry, ``fdatasync``s it, and only then - on the append
   acknowledgement raft-rs sends after the sync - attaches its signature share (the
   piggyback hook of :class:`nebula.raft.node.RaftNode`: ``on_append`` records the entry,
   ``on_send`` adds the share to the acknowledgement's ``context`` field).  Before signing
   it runs the double-sign guard against its own applied state: it never signs a share
   for a decision its state already refuses;
3. the entry commits; the state machine decides on the sign bytes through the guard,
   exactly as for a whole key (ACCEPT, SAME, SAME_TIMESTAMP or REFUSE);
4. unless refused, the leader takes its own share and followers' shares over the sign
   bytes the state machine holds for that height/round/step, combines any t of them by
   Lagrange interpolation in G2, verifies the result once against the group key (each
   share only if that fails: a bad share is dropped, counted and logged with its member)
   and releases it.  BLS is deterministic, so any t shares give the one signature the
   whole key would, and a retry returns it again.

Failover.  A new leader holds every committed decision, but not their signatures (only
the releasing leader combined them).  A retry from the validator reaches the guard as
SAME (or SAME_TIMESTAMP); the new leader proposes a ``TSIGN`` for it again, the state
machine answers with the stored record, the followers sign that record's sign bytes on
append, and the leader combines them.  No new decision is made.  The releasing leader
keeps the last combined signature per chain in memory, so its own retries cost nothing.

**The safety rule: t must be at least the Raft quorum (floor(n/2) + 1).**  A follower's
share of sign bytes X leaves it only on an append acknowledgement, i.e. after it durably
appended an entry carrying X (in some term T, from T's leader).  The leader's own share
never leaves the leader.  So t >= quorum shares over X imply that an entry carrying X
is held by a majority (with t - 1 >= quorum - 1 followers plus the leader that proposed
it) - which is exactly Raft's commit rule for an entry of its leader's own term: that
entry is committed, and every later leader has it.  The state machine applies committed
entries in log order through the guard, so for each (chain, height, round, step) exactly
one decision stands, and the leader combines only over the sign bytes of the standing
decision.  A conflicting X' at the same height/round/step can reach t shares only through
an entry that is also on a majority, hence committed, hence ordered after the standing
decision and refused by the guard - and the leader does not combine a refused decision,
while followers do not share what their applied state already refuses.  With t < quorum
a minority (say, a leader cut off with one follower in a 5-member cluster) could gather t
shares for an entry that never commits and that a new majority overrides with a
conflicting decision: two signatures for one height/round/step.  Such a config is refused
(:func:`check_cluster`), and ``nebula keys split`` refuses to write it unless told.

Test: ``tests/sim/test_threshold_sim.py`` (the deterministic simulation: a partitioned
minority never gathers t shares; one combined signature per height/round/step across
leader changes) and ``tests/integration/test_threshold_cluster.py`` (real processes).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nebula import guard
from nebula.crypto.threshold import KeyShare
from nebula.errors import ConfigError, NebulaError
from nebula.guard import SignRecord, Verdict
from nebula.raft import _core, commands

log = logging.getLogger("nebula.threshold")

__all__ = ["Share", "ThresholdShares", "check_cluster", "digest", "quorum"]

_CTX_MAGIC = b"NTS"
_CTX_VERSION = 1
_SHARE_HEAD = struct.Struct("<QB")  # entry index, flags (bit 0: an extension share follows)
_SIG = 96
_DIGEST = 32
_ENTRY_NORMAL = 0


def quorum(n: int) -> int:
    """The Raft quorum of ``n`` voters."""
    return n // 2 + 1


def digest(msg: bytes) -> bytes:
    return hashlib.sha256(msg).digest()


def check_cluster(share: KeyShare, node_id: int, members: list[int], where: str) -> None:
    """Refuse a threshold share that does not fit this cluster (ConfigError naming ``where``).

    t <= n, n = the cluster size, the share index = the node id, every member id a share
    index, and t >= the Raft quorum (the safety rule, see the module docstring)."""
    pub = share.public
    t, n = pub.threshold, pub.shares
    if n != len(members):
        raise ConfigError(
            f"{where}: the share is one of {n}, but the cluster has {len(members)} members "
            f"({sorted(members)}): split the key into one share per member"
        )
    if share.index != node_id:
        raise ConfigError(
            f"{where}: the share file holds share {share.index}, but this is node {node_id}: "
            f"give node {node_id} the file share-{node_id}.json"
        )
    bad = [m for m in members if not 1 <= m <= n]
    if bad:
        raise ConfigError(
            f"{where}: member ids {bad} are not share indices 1..{n} (node ids must be 1..n)"
        )
    if t > n:
        raise ConfigError(f"{where}: threshold {t} exceeds the {n} shares")
    if t < quorum(n):
        raise ConfigError(
            f"{where}: threshold {t} of {n} is below the Raft quorum {quorum(n)}: refused. "
            "A signature share leaves a follower only once it durably appended the "
            "decision, so t >= quorum shares prove the decision committed; with fewer, a "
            "minority could sign a decision the majority overrides (a double sign). "
            f"Split the key again with --threshold {quorum(n)} or more"
        )


@dataclass(frozen=True, slots=True)
class Share:
    """One member's share of an entry's decision: over the message with ``msg_digest``
    (and, optionally, the extension)."""

    msg_digest: bytes
    sig: bytes
    ext_digest: bytes = b""
    ext_sig: bytes = b""
    #: t = 2: multiplied by the sender's Lagrange coefficient for {receiver, sender}
    scaled: bool = False


def encode_shares(items: list[tuple[int, Share]]) -> bytes:
    out = [_CTX_MAGIC, bytes([_CTX_VERSION, len(items)])]
    for index, sh in items:
        has_ext = bool(sh.ext_sig)
        flags = (1 if has_ext else 0) | (2 if sh.scaled else 0)
        out += [_SHARE_HEAD.pack(index, flags), sh.msg_digest, sh.sig]
        if has_ext:
            out += [sh.ext_digest, sh.ext_sig]
    return b"".join(out)


def decode_shares(ctx: bytes) -> list[tuple[int, Share]]:
    """The shares in an acknowledgement's context; ValueError if malformed."""
    if ctx[:3] != _CTX_MAGIC or len(ctx) < 5 or ctx[3] != _CTX_VERSION:
        raise ValueError("not a share context")
    count, off, out = ctx[4], 5, []
    one = _DIGEST + _SIG
    for _ in range(count):
        index, flags = _SHARE_HEAD.unpack_from(ctx, off)
        off += _SHARE_HEAD.size
        if len(ctx) < off + one:
            raise ValueError("truncated share")
        d, s = ctx[off : off + _DIGEST], ctx[off + _DIGEST : off + one]
        off += one
        ed = es = b""
        if flags & 1:
            if len(ctx) < off + one:
                raise ValueError("truncated extension share")
            ed, es = ctx[off : off + _DIGEST], ctx[off + _DIGEST : off + one]
            off += one
        out.append((index, Share(d, s, ed, es, bool(flags & 2))))
    if off != len(ctx):
        raise ValueError("trailing bytes")
    return out


def what_to_sign(cur: SignRecord | None, rec: SignRecord) -> bytes | None:
    """The sign bytes a member shares for a TSIGN of ``rec`` given its state ``cur``: the
    decision's own, the stored ones for a retry (SAME / SAME_TIMESTAMP), None if the guard
    refuses."""
    d = guard.check(cur, rec.height, rec.round, rec.step, rec.sign_bytes, deterministic=True)
    if d.verdict == Verdict.REFUSE:
        return None
    if d.verdict == Verdict.ACCEPT or d.record is None:
        return rec.sign_bytes
    return d.record.sign_bytes


class ThresholdShares:
    """One member's side of BLS-Raft: the piggyback hooks and the leader's share pool.

    Sans-I/O (the Raft store and the simulation drive it): ``shares`` maps a chain id
    (bytes) to this member's :class:`KeyShare`; ``state(chain)`` is the applied sign
    record; ``term_at(index)`` the log's term at an index."""

    def __init__(
        self,
        node_id: int,
        shares: Mapping[bytes, KeyShare],
        state: Callable[[bytes], SignRecord | None],
        term_at: Callable[[int], int | None],
        *,
        on_share: Callable[[int], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.shares = dict(shares)
        self._state = state
        self._term_at = term_at
        self.on_share = on_share
        self._appended: dict[int, tuple[int, bytes]] = {}  # index -> (term, command)
        # leader: index -> member -> share, for the entries it waits on (expect/release)
        self.pool: dict[int, dict[int, Share]] = {}
        self.bad: dict[int, int] = {}  # member -> bad shares seen
        self.signed_shares = 0  # shares this member attached (follower side)

    # -- follower side -----------------------------------------------------------------

    def on_append(self, entries: list[tuple[int, int, int, bytes, bytes]]) -> None:
        for index, term, etype, data, _ctx in entries:
            if etype == _ENTRY_NORMAL and len(data) > 2 and data[1] == commands.OP_TSIGN:
                self._appended[index] = (term, data)
            else:
                self._appended.pop(index, None)

    def _share_for(self, data: bytes, to: int) -> Share | None:
        try:
            _op, chain, rec = commands.decode_command(data)
        except NebulaError:
            return None
        key = self.shares.get(chain)
        if key is None:
            return None
        bad = guard.bound_to(
            chain,
            rec.height,
            rec.round,
            rec.step,
            rec.sign_bytes,
            rec.ext_sign_bytes,
        )
        if bad is not None:
            log.warning(
                "threshold: no share for chain %s %d/%d/%d: %s",
                chain.decode(errors="replace"),
                rec.height,
                rec.round,
                rec.step,
                bad,
            )
            return None
        msg = what_to_sign(self._state(chain), rec)
        if msg is None:
            log.warning(
                "threshold: no share for chain %s %d/%d/%d: the guard refuses it here",
                chain.decode(errors="replace"),
                rec.height,
                rec.round,
                rec.step,
            )
            return None
        ext = rec.ext_sign_bytes
        # t = 2: the signing set is {the leader this goes to, this member}, so the share
        # goes out already multiplied by this member's Lagrange coefficient (the leader
        # saves a G2 multiplication per signature on its critical path).
        partner = to if key.public.threshold == 2 and to != key.index else None
        return Share(
            digest(msg),
            key.sign_share(msg, with_partner=partner),
            digest(ext) if ext else b"",
            key.sign_share(ext, with_partner=partner) if ext else b"",
            partner is not None,
        )

    def on_send(self, to: int, mtype: int, payload: bytes) -> bytes:
        """Attach shares to an append acknowledgement (it leaves after the sync)."""
        if mtype != _core.MSG_APPEND_RESPONSE or not self._appended:
            return payload
        try:
            info = _core.message_info(payload)
            if info[7]:  # a rejection acknowledges nothing
                return payload
            acked = info[5]
            items: list[tuple[int, Share]] = []
            for index in sorted(i for i in self._appended if i <= acked):
                term, data = self._appended.pop(index)
                if self._term_at(index) != term:
                    continue  # replaced by a later leader's entry
                sh = self._share_for(data, to)
                if sh is not None:
                    items.append((index, sh))
                    log.debug(
                        "threshold: share for entry %d (message %s) to member %d",
                        index,
                        sh.msg_digest[:4].hex(),
                        to,
                    )
            if not items:
                return payload
            self.signed_shares += len(items)
            return _core.message_with_context(payload, encode_shares(items[-255:]))
        except Exception as e:  # never let the hook stop the node: send it without shares
            log.warning("threshold: no shares attached: %s: %s", type(e).__name__, e)
            return payload

    @property
    def appended_count(self) -> int:
        """TSIGN entries appended here and not acknowledged yet."""
        return len(self._appended)

    def forget_below(self, index: int) -> None:
        """Drop the appended entries below ``index`` (no share is sent for them)."""
        for i in [i for i in self._appended if i < index]:
            del self._appended[i]

    # -- leader side -------------------------------------------------------------------

    def on_receive(self, peer: int, payload: bytes) -> None:
        if len(payload) < 8:
            return
        try:
            info = _core.message_info(payload)
        except Exception:
            return  # raft-rs refuses it next
        if info[0] != _core.MSG_APPEND_RESPONSE or not info[9] or info[7]:
            return
        try:
            items = decode_shares(info[9])
        except (ValueError, struct.error) as e:
            log.warning("threshold: malformed shares from member %d dropped: %s", peer, e)
            return
        # Only for entries this leader waits on (``expect``), one share per member and
        # entry: shares for made-up indices used to fill the pool until its eviction
        # dropped the real entries' shares, and signing stalled (found in review).
        pooled = []
        for index, sh in items:
            slot = self.pool.get(index)
            if slot is not None and peer not in slot:
                slot[peer] = sh
                pooled.append(index)
        if self.on_share is not None:
            for index in pooled:
                self.on_share(index)

    def expect(self, index: int) -> None:
        """The leader proposed a signing entry at ``index``: pool the followers' shares
        for it (until :meth:`release`).  Shares for any other index are dropped."""
        self.pool.setdefault(index, {})

    def candidates(self, index: int, msg_digest: bytes, ext: bool) -> dict[int, bytes]:
        """Followers' shares for entry ``index`` over the message with ``msg_digest``."""
        out: dict[int, bytes] = {}
        for peer, sh in self.pool.get(index, {}).items():
            if ext:
                if sh.ext_digest == msg_digest and sh.ext_sig:
                    out[peer] = sh.ext_sig
            elif sh.msg_digest == msg_digest:
                out[peer] = sh.sig
        return out

    def combine(
        self,
        index: int,
        key: KeyShare,
        msg: bytes,
        ext: bool = False,
        on_bad: Callable[[int], None] | None = None,
        prepared: Any = None,
    ) -> tuple[bytes | None, int]:
        """(the group signature over ``msg`` from this member's share and the followers'
        shares for entry ``index``, or None; how many shares there were).

        The first t are combined and verified once; only when that fails is each share
        checked, and a bad one dropped, counted and passed to ``on_bad``."""
        sigs, have = self.combine_many(index, key, [(msg, ext)], on_bad, prepared)
        return (None if sigs is None else sigs[0]), have

    def combine_many(
        self,
        index: int,
        key: KeyShare,
        items: list[tuple[bytes, bool]],
        on_bad: Callable[[int], None] | None = None,
        prepared: Any = None,
    ) -> tuple[list[bytes] | None, int]:
        """:meth:`combine` for several messages of one entry, ``(message, is the
        extension)`` each (a precommit's vote and extension), verified with one pairing
        check (``prepared`` from ``prepare_batch`` over the same messages); (every
        signature in order or None; the fewest shares any of them had)."""
        pub = key.public
        pool = self.pool.get(index, {})
        gots: list[dict[int, bytes]] = []
        scaled: list[frozenset[int]] = []
        bad_count = self.bad.get
        for msg, ext in items:
            got = self.candidates(index, digest(msg), ext)
            got.pop(self.node_id, None)
            # Members that sent bad shares before go last (arrival order otherwise): the
            # first t are combined and checked with one pairing, and a bad share among
            # them costs a check of every share, each time it is picked.
            got = dict(sorted(got.items(), key=lambda kv: bad_count(kv[0], 0)))
            gots.append(got)
            # (t > 2: a share claiming to be pre-scaled is taken as it is: it fails the check)
            scaled.append(frozenset(p for p in got if pool[p].scaled and pub.threshold == 2))
        have = min(len(g) for g in gots) + 1
        if have < pub.threshold:
            return None, have
        bad: list[int] = []
        sigs = pub.combine_many(
            [m for m, _ in items],
            gots,
            own=(key.index, key.secret),
            on_bad=bad.append,
            prepared=prepared,
            scaled=scaled,
        )
        for member in dict.fromkeys(bad):
            self.drop(index, member)
            if on_bad is not None:
                on_bad(member)
        return sigs, have - len(set(bad))

    def drop(self, index: int, peer: int) -> None:
        """Forget a share that failed verification (and count it)."""
        self.pool.get(index, {}).pop(peer, None)
        self.bad[peer] = self.bad.get(peer, 0) + 1

    def release(self, index: int) -> None:
        self.pool.pop(index, None)
