"""The signing path (design.md §2), independent of transport.

``SigningService.handle(request)`` takes a decoded privval request and returns the
response to send.  For votes and proposals::

    chain-id check -> sign bytes -> guard pre-check against the applied state
      -> sign (backend) -> store.commit (fsync / Raft majority) -> response

The pre-check is only an optimisation (it answers retries from the stored
signature without signing); the store's decision is the authority (S2), and the
response carries the signature the store returned.  With a threshold-BLS backend
(``backend.threshold``) nothing is signed here: the record goes to the store without a
signature and the store combines the members' shares after the decision
(nebula/state/threshold.py).  One signing decision runs at
a time across every validator connection (``self.lock``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from nebula import guard, proto
from nebula.backends.base import Backend
from nebula.errors import (
    BackendError,
    ChainIdMismatch,
    InvalidRequest,
    NebulaError,
    NotLeader,
    SigningRefused,
    StateError,
    Unavailable,
    wire_error,
)
from nebula.guard import SignRecord, Verdict
from nebula.metrics import Metrics
from nebula.state.base import SignStore
from nebula.types import (
    PingRequest,
    PingResponse,
    Proposal,
    PubKeyRequest,
    PubKeyResponse,
    RemoteSignerError,
    Request,
    Response,
    SignBytesRequest,
    SignBytesResponse,
    SignedMsgType,
    SignedProposalResponse,
    SignedVoteResponse,
    SignProposalRequest,
    SignVoteRequest,
    Step,
    Vote,
    WireFamily,
    extension_signature_required,
)

log = logging.getLogger("nebula.signer")

_STEP_OF_VOTE = {SignedMsgType.PREVOTE: Step.PREVOTE, SignedMsgType.PRECOMMIT: Step.PRECOMMIT}
_STEP_NAMES = {0: "none", 1: "propose", 2: "prevote", 3: "precommit"}


class SigningService:
    def __init__(
        self,
        chain_id: str,
        family: WireFamily,
        backend: Backend,
        store: SignStore,
        *,
        on_signed: Callable[[str, SignRecord, str], None] | None = None,
        on_refused: Callable[[str, str, tuple[int, int, int] | None, str], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.family = family
        self.backend = backend
        self.store = store
        self.lock = asyncio.Lock()
        self.on_signed = on_signed
        self.on_refused = on_refused
        self.metrics = metrics
        self._replicated = store.replicated
        self._threshold = bool(getattr(backend, "threshold", False))
        #: Requests are decided without waiting (a native key, the local store): the
        #: validator connection answers them inside its socket callback.
        self.inline = bool(backend.inline and store.inline and not self._threshold)

    # ---- dispatch --------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        if isinstance(req, SignVoteRequest):
            return await self._vote(req)
        if isinstance(req, SignProposalRequest):
            return await self._proposal(req)
        if isinstance(req, PingRequest):
            return PingResponse()
        if isinstance(req, PubKeyRequest):
            return self._pubkey(req)
        if isinstance(req, SignBytesRequest):
            # Signing arbitrary bytes with the consensus key would let anyone on the
            # privval connection obtain a vote signature without the double-sign
            # guard.  CometBFT's consensus never sends this request.
            return SignBytesResponse(
                error=RemoteSignerError(
                    0, "SignBytes is refused: raw signing would bypass double-sign protection"
                )
            )
        raise InvalidRequest(f"unsupported request {type(req).__name__}")

    def _pubkey(self, req: PubKeyRequest) -> PubKeyResponse:
        if req.chain_id != self.chain_id:
            self._refused(req.chain_id, "chain_id_mismatch", None, "pubkey request")
            return PubKeyResponse(
                error=RemoteSignerError(
                    0,
                    f"unable to provide pubkey: chain id {req.chain_id!r} is not {self.chain_id!r}",
                )
            )
        return PubKeyResponse(key_type=self.backend.key_type, pub_key=self.backend.public_key)

    # ---- votes -----------------------------------------------------------------------

    async def _vote(self, req: SignVoteRequest) -> SignedVoteResponse:
        vote = req.vote
        hrs: tuple[int, int, int] | None = None
        try:
            if req.chain_id != self.chain_id:
                raise ChainIdMismatch(
                    f"unable to sign vote: chain id {req.chain_id!r} is not {self.chain_id!r}"
                )
            step = _STEP_OF_VOTE.get(vote.type)  # type: ignore[call-overload]
            if step is None:
                raise InvalidRequest(f"unable to sign vote: unknown vote type {vote.type}")
            hrs = (vote.height, vote.round, int(step))
            self._check_hr(vote.height, vote.round)
            is_non_nil_precommit = (
                vote.type == SignedMsgType.PRECOMMIT and not vote.block_id.is_zero()
            )
            if vote.extension and not is_non_nil_precommit:
                raise InvalidRequest(
                    "unexpected vote extension - extensions are only allowed in non-nil precommits"
                )
            need_ext = extension_signature_required(self.family, req)
            sign_bytes = proto.vote_sign_bytes(req.chain_id, vote)
            ext_bytes = proto.vote_extension_sign_bytes(req.chain_id, vote) if need_ext else b""
            rec, ts = await self._decide(hrs, sign_bytes, ext_bytes)
        except SigningRefused as e:
            self._refused(req.chain_id, e.reason, hrs, str(e))
            if isinstance(e, Unavailable):
                raise  # the connection is dropped and the node retries (errors.Unavailable)
            code, desc = wire_error(e)
            return SignedVoteResponse(vote=Vote(), error=RemoteSignerError(code, desc))

        out = Vote(
            type=vote.type,
            height=vote.height,
            round=vote.round,
            block_id=vote.block_id,
            timestamp=ts if ts is not None else vote.timestamp,
            validator_address=vote.validator_address,
            validator_index=vote.validator_index,
            signature=rec.signature,
            # The node keeps its own copy of the extension; echoing a large one would
            # exceed its 10 KiB response limit (protocol.md §1.3).
            extension=b"",
            extension_signature=rec.ext_signature if need_ext else b"",
        )
        return SignedVoteResponse(vote=out)

    # ---- proposals -------------------------------------------------------------------

    async def _proposal(self, req: SignProposalRequest) -> SignedProposalResponse:
        p = req.proposal
        hrs: tuple[int, int, int] | None = None
        try:
            if req.chain_id != self.chain_id:
                raise ChainIdMismatch(
                    f"unable to sign proposal: chain id {req.chain_id!r} is not {self.chain_id!r}"
                )
            if p.type not in (SignedMsgType.PROPOSAL, SignedMsgType.UNKNOWN):
                raise InvalidRequest(f"unable to sign proposal: wrong message type {p.type}")
            hrs = (p.height, p.round, int(Step.PROPOSE))
            self._check_hr(p.height, p.round)
            if p.pol_round < -1 or p.pol_round >= p.round:
                raise InvalidRequest(
                    f"unable to sign proposal: invalid pol_round {p.pol_round} for round {p.round}"
                )
            sign_bytes = proto.proposal_sign_bytes(req.chain_id, p)
            rec, ts = await self._decide(hrs, sign_bytes, b"")
        except SigningRefused as e:
            self._refused(req.chain_id, e.reason, hrs, str(e))
            if isinstance(e, Unavailable):
                raise
            code, desc = wire_error(e)
            return SignedProposalResponse(
                proposal=Proposal(type=0), error=RemoteSignerError(code, desc)
            )
        out = dataclasses.replace(p, signature=rec.signature)
        if ts is not None:
            out.timestamp = ts
        return SignedProposalResponse(proposal=out)

    # ---- the decision ----------------------------------------------------------------

    @staticmethod
    def _check_hr(height: int, round: int) -> None:
        if height <= 0:
            raise InvalidRequest(f"invalid height {height}")
        if round < 0:
            raise InvalidRequest(f"invalid round {round}")

    async def _decide(
        self, hrs: tuple[int, int, int], sign_bytes: bytes, ext_bytes: bytes
    ) -> tuple[SignRecord, Any]:
        """Return (record whose signatures to release, timestamp override or None)."""
        chain = self.chain_id
        store = self.store
        async with self.lock:
            if not store.is_authoritative():
                raise NotLeader("this Nebula node is not the cluster leader")
            t0 = time.perf_counter()
            last = store.last(chain)
            threshold = self._threshold
            pre = guard.check(last, *hrs, sign_bytes, deterministic=threshold)
            t1 = time.perf_counter()
            if pre.verdict == Verdict.REFUSE:
                assert pre.error is not None
                raise pre.error
            if (
                threshold
                and pre.record is not None
                and pre.record.signature
                and (
                    not ext_bytes
                    or (pre.record.ext_sign_bytes == ext_bytes and pre.record.ext_signature)
                )
            ):
                # A retry this leader already combined.
                return pre.record, pre.timestamp
            if (
                not threshold
                and pre.verdict in (Verdict.SAME, Verdict.SAME_TIMESTAMP)
                and pre.record is not None
            ):
                # A retry: the stored signature is the answer; nothing new to persist.
                rec = pre.record
                if ext_bytes:
                    rec = await self._with_extension(rec, ext_bytes)
                return rec, pre.timestamp
            later = None
            if threshold:
                # The store decides, then combines the members' shares (a retry of a
                # decision whose signature this leader does not hold goes this way too).
                sig = ext_sig = b""
            elif self.backend.signs_later():
                # Several chains: the store has the signatures made off the loop thread
                # and decides the signed record (nebula.crypto.signworker).
                sig = ext_sig = b""
                later = self.backend.sign_later
            else:
                sig = await self._sign(sign_bytes)
                ext_sig = await self._sign(ext_bytes) if ext_bytes else b""
            t2 = time.perf_counter()
            record = SignRecord(*hrs, sign_bytes, sig, ext_bytes, ext_sig)
            decision = await store.commit(chain, record, later)
            t3 = time.perf_counter()
            sign_s, commit_s = t2 - t1, t3 - t2
            if threshold or later is not None:
                # The signature is made inside store.commit: gathering, combining and
                # verifying the shares after the decision, or the signing thread's work
                # before it, is this request's "sign" phase.
                made = min(store.combine_seconds(chain), commit_s)
                sign_s, commit_s = made, commit_s - made
            m = self.metrics
            if m is not None:
                m.phase("guard", t1 - t0)
                m.phase("sign", sign_s)
                m.phase("replicate", commit_s)
                if self._replicated:
                    m.raft_commit_seconds.observe(commit_s)
            if decision.verdict == Verdict.REFUSE:
                assert decision.error is not None
                raise decision.error
            if decision.record is None:
                raise StateError("store returned no record")
            rec = decision.record
            if decision.verdict == Verdict.ACCEPT:
                kind = _STEP_NAMES.get(rec.step, "?")
                if m is not None:
                    m.signed(chain, rec.height, rec.round, rec.step, kind)
                if self.on_signed is not None:
                    self.on_signed(chain, rec, kind)
                return rec, None
            # Another decision for this HRS won (e.g. a retry raced through another
            # leader): answer with what the state machine holds.
            if ext_bytes and not threshold:
                rec = await self._with_extension(rec, ext_bytes)
            return rec, decision.timestamp

    async def _with_extension(self, rec: SignRecord, ext_bytes: bytes) -> SignRecord:
        # Extension signatures are not slashable; FilePV signs them afresh on retries.
        if rec.ext_sign_bytes == ext_bytes and rec.ext_signature:
            return rec
        return dataclasses.replace(
            rec, ext_sign_bytes=ext_bytes, ext_signature=await self._sign(ext_bytes)
        )

    async def _sign(self, msg: bytes) -> bytes:
        backend = self.backend
        sig = backend.sign_sync(msg)
        if sig is None:
            try:
                sig = await backend.sign(msg)
            except BackendError:
                if self.metrics is not None:
                    self.metrics.backend_errors.labels(type(backend).__name__).inc()
                raise
        return sig

    def _refused(
        self, chain_id: str, reason: str, hrs: tuple[int, int, int] | None, text: str
    ) -> None:
        last = self.store.last(self.chain_id)
        last_txt = f"{last.height}/{last.round}/{last.step}" if last else "none"
        at = f"{hrs[0]}/{hrs[1]}/{hrs[2]}" if hrs else "-"
        log.warning(
            "refused chain=%s hrs=%s reason=%s last_signed=%s: %s",
            chain_id,
            at,
            reason,
            last_txt,
            text,
            extra={
                "event": "refused",
                "chain_id": chain_id,
                "hrs": at,
                "reason": reason,
                "last_signed": last_txt,
            },
        )
        if self.metrics is not None:
            self.metrics.refusals.labels(chain_id, reason).inc()
        if self.on_refused is not None:
            self.on_refused(chain_id, reason, hrs, text)


__all__ = ["NebulaError", "SigningService"]
