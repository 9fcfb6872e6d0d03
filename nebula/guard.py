"""The double-sign rules, as a pure function (design.md S2, protocol.md §5.1).

``check(last, height, round, step, sign_bytes)`` compares a request with the last
signed state and says what may happen; ``apply(last, record)`` is the atomic
check-and-set that every store (the local fsync'ed file, the Raft state machine)
runs to decide.  Neither does I/O, reads a clock or keeps state: the same inputs
always give the same decision, which is what a replicated state machine needs.

Semantics follow CometBFT's FilePV:

* strictly higher (height, round, step) -> ACCEPT;
* a lower height, round or step -> REFUSE (regression);
* the same HRS with identical sign bytes -> SAME (answer with the stored signature);
* the same HRS where the two canonical messages differ only in the timestamp ->
  SAME_TIMESTAMP (answer with the stored signature and the stored timestamp);
* anything else at the same HRS -> REFUSE (conflicting data).

``deterministic=True`` (threshold BLS, nebula.state.threshold): the stored record may hold
the sign bytes without a signature (the signature is combined from shares after the
decision commits).  BLS is deterministic, so signing the stored sign bytes again gives
the same signature: such a record answers SAME / SAME_TIMESTAMP like a signed one.  The
rules themselves do not change.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nebula.errors import (
    DoubleSignRefused,
    NebulaError,
    RegressionRefused,
    SigningRefused,
    StateError,
)
from nebula.types import Step, Timestamp


class Verdict(enum.IntEnum):
    ACCEPT = 0
    SAME = 1
    SAME_TIMESTAMP = 2
    REFUSE = 3


@dataclass(frozen=True, slots=True)
class SignRecord:
    """One signing decision: what the state machine stores and replicates."""

    height: int
    round: int
    step: int
    sign_bytes: bytes = b""
    signature: bytes = b""
    ext_sign_bytes: bytes = b""
    ext_signature: bytes = b""

    @property
    def hrs(self) -> tuple[int, int, int]:
        return (self.height, self.round, self.step)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    # ACCEPT from apply(): the new record; SAME*: the stored record; REFUSE: None.
    record: SignRecord | None = None
    # SAME_TIMESTAMP: the stored timestamp to put in the response.
    timestamp: Timestamp | None = None
    error: SigningRefused | None = None

    @property
    def ok(self) -> bool:
        return self.verdict != Verdict.REFUSE


_ACCEPT = Decision(Verdict.ACCEPT)


def _split_timestamp(sign_bytes: bytes, proposal: bool) -> tuple[bytes, Timestamp] | None:
    from nebula.proto import canonical_vote_without_timestamp

    try:
        return canonical_vote_without_timestamp(sign_bytes, proposal=proposal)
    except NebulaError:
        return None


def _canonical_fields(sign_bytes: bytes) -> dict[int, int | bytes]:
    """The top-level fields of length-prefixed canonical sign bytes: varint and
    sfixed64 fields as signed integers, length-delimited ones as bytes (last wins).
    Raises NebulaError (DecodeError) for anything else."""
    import struct

    from nebula._fast.pb_py import I64, LEN, VARINT, _Reader

    r = _Reader(sign_bytes, "canonical sign bytes")
    length = r.uvarint()
    if length != r.end - r.pos:
        raise r.error(f"length prefix {length} but {r.end - r.pos} bytes follow")
    out: dict[int, int | bytes] = {}
    while r.more():
        field, wt = r.key()
        if wt == VARINT:
            out[field] = r.int64()
        elif wt == I64:
            start = r.advance(8, "sfixed64")
            out[field] = struct.unpack_from("<q", sign_bytes, start)[0]
        elif wt == LEN:
            out[field] = r.chunk()
        else:
            raise r.error(f"field {field} has wire type {wt}")
    return out


_TYPE_OF_STEP = {Step.PROPOSE: 32, Step.PREVOTE: 1, Step.PRECOMMIT: 2}


def bound_to(
    chain_id: str | bytes,
    height: int,
    round: int,
    step: int,
    sign_bytes: bytes,
    ext_sign_bytes: bytes = b"",
) -> str | None:
    """None if ``sign_bytes`` are the canonical vote/proposal of exactly this chain,
    height, round and step (and ``ext_sign_bytes``, when given, the canonical vote
    extension of the same chain, height and round, on a precommit); else what is wrong.

    The guard decides on (height, round, step) and stores the sign bytes it is given;
    a member that signs for a record it did not build (a threshold share) must know the
    bytes it signs are the ones the decision is about."""
    chain = chain_id if isinstance(chain_id, bytes) else chain_id.encode()
    want_type = _TYPE_OF_STEP.get(step)  # type: ignore[call-overload]
    if want_type is None:
        return f"step {step} signs nothing"
    try:
        f = _canonical_fields(sign_bytes)
    except NebulaError as e:
        return f"sign bytes are not canonical: {e}"
    chain_field = 7 if want_type == 32 else 6
    if (
        f.get(1, 0) != want_type
        or f.get(2, 0) != height
        or f.get(3, 0) != round
        or f.get(chain_field, b"") != chain
    ):
        return "sign bytes are not for this chain, height, round and step"
    if ext_sign_bytes:
        if step != Step.PRECOMMIT:
            return "extension sign bytes on a step that is not a precommit"
        try:
            e = _canonical_fields(ext_sign_bytes)
        except NebulaError as err:
            return f"extension sign bytes are not canonical: {err}"
        if (
            not isinstance(e.get(1, b""), bytes)
            or set(e) - {1, 2, 3, 4}
            or e.get(2, 0) != height
            or e.get(3, 0) != round
            or e.get(4, b"") != chain
        ):
            return "extension sign bytes are not this precommit's vote extension"
    return None


def check(
    last: SignRecord | None,
    height: int,
    round: int,
    step: int,
    sign_bytes: bytes,
    *,
    deterministic: bool = False,
) -> Decision:
    """What may be done with a request for (height, round, step, sign_bytes)."""
    if last is None:
        return _ACCEPT
    if height > last.height:
        return _ACCEPT
    if height < last.height:
        return Decision(
            Verdict.REFUSE,
            error=RegressionRefused(f"height regression. Got {height}, last height {last.height}"),
        )
    if round > last.round:
        return _ACCEPT
    if round < last.round:
        return Decision(
            Verdict.REFUSE,
            error=RegressionRefused(
                f"round regression at height {height}. Got {round}, last round {last.round}"
            ),
        )
    if step > last.step:
        return _ACCEPT
    if step < last.step:
        return Decision(
            Verdict.REFUSE,
            error=RegressionRefused(
                f"step regression at height {height} round {round}. "
                f"Got {step}, last step {last.step}"
            ),
        )
    # Same height, round and step.
    if not last.sign_bytes or not (last.signature or deterministic):
        return Decision(
            Verdict.REFUSE,
            error=StateError(
                f"no SignBytes found for height {height} round {round} step {step}; "
                "refusing to sign again at an already-signed step"
            ),
        )
    if sign_bytes == last.sign_bytes:
        return Decision(Verdict.SAME, record=last)
    is_proposal = step == Step.PROPOSE
    new = _split_timestamp(sign_bytes, is_proposal)
    old = _split_timestamp(last.sign_bytes, is_proposal)
    if new is not None and old is not None and new[0] == old[0]:
        return Decision(Verdict.SAME_TIMESTAMP, record=last, timestamp=old[1])
    return Decision(
        Verdict.REFUSE,
        error=DoubleSignRefused(
            f"conflicting data: double signing requested at height {height} round {round} "
            f"step {step}"
        ),
    )


def apply(
    last: SignRecord | None, record: SignRecord, *, deterministic: bool = False
) -> tuple[SignRecord | None, Decision]:
    """Atomic check-and-set: returns (new last state, decision).

    On ACCEPT the new state is ``record`` and the decision carries it; otherwise the
    state is unchanged and the decision carries the stored record or the refusal.
    ``deterministic``: the record carries sign bytes but no signature yet (threshold BLS).
    """
    decision = check(
        last,
        record.height,
        record.round,
        record.step,
        record.sign_bytes,
        deterministic=deterministic,
    )
    if decision.verdict == Verdict.ACCEPT:
        if not record.sign_bytes or not (record.signature or deterministic):
            return last, Decision(
                Verdict.REFUSE, error=StateError("refusing to store a record without signature")
            )
        return record, Decision(Verdict.ACCEPT, record=record)
    return last, decision
