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
import collections
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
from nebula.guard import Decision, SignRecord, Verdict
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


class DecisionLock:
    """One signing decision at a time for a chain: an asyncio lock (first come, first
    served; a released lock goes straight to the first waiter) that a callback can also
    take without waiting (:meth:`try_acquire`, :meth:`SigningService.begin`).  Not
    thread-safe: the event loop's thread only."""

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        # Waiters in arrival order; a cancelled one stays until release skips it.  While
        # any wait, the lock is held: release hands it over without unlocking.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        return self._locked

    def try_acquire(self) -> bool:
        """Take the lock if it is free (no one waits then); False, and nothing queued, if
        it is held."""
        if self._locked:
            return False
        self._locked = True
        return True

    async def acquire(self) -> None:
        if not self._locked:
            self._locked = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed the lock, then cancelled before it ran: pass it on
            raise

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("DecisionLock is not acquired")
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # still locked: now the waiter's
                return
        self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


#: ``answer(response, error)`` of a request started by :meth:`SigningService.begin`.
Answer = Callable[[Response | None, BaseException | None], None]


class SigningService:
    #: Refusal log lines per chain per second; past it, one line counts the rest (the
    #: ``nebula_refusals_total`` metric counts every one).  A validator connection that
    #: sends thousands of bad requests a second must not fill the disk with the log.
    REFUSAL_LINES_PER_SECOND = 10

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
        self.lock = DecisionLock()
        self.on_signed = on_signed
        self.on_refused = on_refused
        self.metrics = metrics
        self._replicated = store.replicated
        self._threshold = bool(getattr(backend, "threshold", False))
        #: Requests are decided without waiting (a native key, the local store): the
        #: validator connection answers them inside its socket callback.
        self.inline = bool(backend.inline and store.inline and not self._threshold)
        #: New decisions can start without a coroutine (:meth:`begin`): a key that signs
        #: without waiting and a store that begins commits (Raft).
        self.begins = bool(backend.inline and store.begins_commits and not self._threshold)
        self._stored_ok: tuple[bytes, bytes] | None = None  # last stored pair checked
        self._stored_ext_ok: tuple[bytes, bytes] | None = None  # its extension's
        self._log_window = -1.0  # the current second of refusal lines: its start
        self._log_lines = 0  # refusal lines logged in it
        self._log_dropped = 0  # refusals not logged in it

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
        hrs: tuple[int, int, int] | None = None
        try:
            hrs = self._vote_hrs(req)
            sign_bytes, ext_bytes, need_ext = self._vote_bytes(req)
            rec, ts = await self._decide(hrs, sign_bytes, ext_bytes)
        except SigningRefused as e:
            return self._vote_refused(req, hrs, e)
        return self._vote_signed(req, need_ext, rec, ts)

    def _vote_hrs(self, req: SignVoteRequest) -> tuple[int, int, int]:
        if req.chain_id != self.chain_id:
            raise ChainIdMismatch(
                f"unable to sign vote: chain id {req.chain_id!r} is not {self.chain_id!r}"
            )
        vote = req.vote
        step = _STEP_OF_VOTE.get(vote.type)  # type: ignore[call-overload]
        if step is None:
            raise InvalidRequest(f"unable to sign vote: unknown vote type {vote.type}")
        return (vote.height, vote.round, int(step))

    def _vote_bytes(self, req: SignVoteRequest) -> tuple[bytes, bytes, bool]:
        """(sign bytes, extension sign bytes or b"", extension signature required)."""
        vote = req.vote
        self._check_hr(vote.height, vote.round)
        is_non_nil_precommit = vote.type == SignedMsgType.PRECOMMIT and not vote.block_id.is_zero()
        if vote.extension and not is_non_nil_precommit:
            raise InvalidRequest(
                "unexpected vote extension - extensions are only allowed in non-nil precommits"
            )
        need_ext = extension_signature_required(self.family, req)
        sign_bytes = proto.vote_sign_bytes(req.chain_id, vote)
        ext_bytes = proto.vote_extension_sign_bytes(req.chain_id, vote) if need_ext else b""
        return sign_bytes, ext_bytes, need_ext

    def _vote_refused(
        self, req: SignVoteRequest, hrs: tuple[int, int, int] | None, e: SigningRefused
    ) -> SignedVoteResponse:
        self._refused(req.chain_id, e.reason, hrs, str(e))
        if isinstance(e, Unavailable):
            raise e  # the connection is dropped and the node retries (errors.Unavailable)
        code, desc = wire_error(e)
        return SignedVoteResponse(vote=Vote(), error=RemoteSignerError(code, desc))

    @staticmethod
    def _vote_signed(
        req: SignVoteRequest, need_ext: bool, rec: SignRecord, ts: Any
    ) -> SignedVoteResponse:
        vote = req.vote
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
        hrs: tuple[int, int, int] | None = None
        try:
            hrs = self._proposal_hrs(req)
            sign_bytes = self._proposal_bytes(req)
            rec, ts = await self._decide(hrs, sign_bytes, b"")
        except SigningRefused as e:
            return self._proposal_refused(req, hrs, e)
        return self._proposal_signed(req, rec, ts)

    def _proposal_hrs(self, req: SignProposalRequest) -> tuple[int, int, int]:
        p = req.proposal
        if req.chain_id != self.chain_id:
            raise ChainIdMismatch(
                f"unable to sign proposal: chain id {req.chain_id!r} is not {self.chain_id!r}"
            )
        if p.type not in (SignedMsgType.PROPOSAL, SignedMsgType.UNKNOWN):
            raise InvalidRequest(f"unable to sign proposal: wrong message type {p.type}")
        return (p.height, p.round, int(Step.PROPOSE))

    def _proposal_bytes(self, req: SignProposalRequest) -> bytes:
        p = req.proposal
        self._check_hr(p.height, p.round)
        if p.pol_round < -1 or p.pol_round >= p.round:
            raise InvalidRequest(
                f"unable to sign proposal: invalid pol_round {p.pol_round} for round {p.round}"
            )
        return proto.proposal_sign_bytes(req.chain_id, p)

    def _proposal_refused(
        self, req: SignProposalRequest, hrs: tuple[int, int, int] | None, e: SigningRefused
    ) -> SignedProposalResponse:
        self._refused(req.chain_id, e.reason, hrs, str(e))
        if isinstance(e, Unavailable):
            raise e
        code, desc = wire_error(e)
        return SignedProposalResponse(
            proposal=Proposal(type=0), error=RemoteSignerError(code, desc)
        )

    @staticmethod
    def _proposal_signed(
        req: SignProposalRequest, rec: SignRecord, ts: Any
    ) -> SignedProposalResponse:
        out = dataclasses.replace(req.proposal, signature=rec.signature)
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
                    or (
                        pre.record.ext_sign_bytes == ext_bytes
                        and pre.record.ext_signature
                        and self._stored_ext_verifies(pre.record)
                    )
                )
            ):
                # A retry this leader already combined - or an imported record: checked.
                return self._checked_stored(pre.record), pre.timestamp
            if (
                not threshold
                and pre.verdict in (Verdict.SAME, Verdict.SAME_TIMESTAMP)
                and pre.record is not None
            ):
                # A retry: the stored signature is the answer; nothing new to persist.
                rec = self._checked_stored(pre.record)
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
            rec, ts, accepted = self._settle(decision, t0, t1, t2, later is not None)
            if not accepted and ext_bytes and not threshold:
                rec = await self._with_extension(rec, ext_bytes)
            return rec, ts

    def _settle(
        self, decision: Any, t0: float, t1: float, t2: float, signed_in_store: bool
    ) -> tuple[SignRecord, Any, bool]:
        """The store's ``decision`` (reached now) of a request that passed the guard at
        ``t1`` and went to the store at ``t2``: metrics, then (record to release,
        timestamp override or None, accepted), or the refusal raised."""
        t3 = time.perf_counter()
        chain = self.chain_id
        if not isinstance(decision, Decision):
            raise StateError(f"store returned {type(decision).__name__}, not a decision")
        sign_s, commit_s = t2 - t1, t3 - t2
        if self._threshold or signed_in_store:
            # The signature is made inside the store: gathering, combining and verifying
            # the shares after the decision, or the signing thread's work before it, is
            # this request's "sign" phase.
            made = min(self.store.combine_seconds(chain), commit_s)
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
            return rec, None, True
        # Another decision for this HRS won (e.g. a retry raced through another leader):
        # answer with what the state machine holds.
        if not self._threshold:
            rec = self._checked_stored(rec)
        return rec, decision.timestamp, False

    def _checked_stored(self, rec: SignRecord) -> SignRecord:
        """``rec``, a stored decision about to answer a retry, once its signature is
        checked to be this key's over its sign bytes.  Signatures made here always are;
        an imported state may hold another key's (CometBFT's state file after a key
        change) or a damaged one, which is refused, never handed back (found in review).
        The last good pair is remembered: a retry is checked once."""
        pair = (rec.sign_bytes, rec.signature)
        if pair == self._stored_ok:
            return rec
        if not self.backend.verify(rec.sign_bytes, rec.signature):
            raise StateError(
                f"the stored signature for height {rec.height} round {rec.round} step "
                f"{rec.step} does not verify with this chain's key (an imported state of "
                "another key?); not handed back, and this step is not signed again"
            )
        self._stored_ok = pair
        return rec

    def _stored_ext_verifies(self, rec: SignRecord) -> bool:
        """Whether ``rec``'s stored extension signature (about to answer a retry) is this
        key's over its extension sign bytes; one that is not (an imported state) is never
        handed back: it is signed afresh, as FilePV always does (not slashable)."""
        pair = (rec.ext_sign_bytes, rec.ext_signature)
        if pair == self._stored_ext_ok:
            return True
        if not self.backend.verify(*pair):
            return False
        self._stored_ext_ok = pair
        return True

    # ---- the same decision from callbacks -----------------------------------------------

    def begin(self, req: Request, answer: Answer) -> bool:
        """Start ``req`` without a coroutine (``self.begins``); True: ``answer(response,
        None)`` - or ``answer(None, error)`` where :meth:`handle` would raise - follows
        once, from a later callback (the store's).  False: nothing was started (a request
        that is not a new vote or proposal decision, a refusal, a retry, the chain's lock
        held): :meth:`handle` answers it.

        The same path as :meth:`handle`: the checks, the guard's pre-check against the
        applied state, the signature (or the store's signing thread), the store's decision
        as the authority (S2), the same metrics; one decision at a time per chain."""
        if not self.begins:
            return False
        kind = type(req)
        try:
            if kind is SignVoteRequest:
                hrs = self._vote_hrs(req)  # type: ignore[arg-type]
                sign_bytes, ext_bytes, need_ext = self._vote_bytes(req)  # type: ignore[arg-type]
            elif kind is SignProposalRequest:
                hrs = self._proposal_hrs(req)  # type: ignore[arg-type]
                sign_bytes, ext_bytes, need_ext = self._proposal_bytes(req), b"", False  # type: ignore[arg-type]
            else:
                return False
        except SigningRefused:
            return False  # handle() refuses it (log, metric, answer)
        if not self.lock.try_acquire():
            return False
        started = False
        try:
            started = self._begin_decision(req, hrs, sign_bytes, ext_bytes, need_ext, answer)
        except SigningRefused:
            pass  # nothing on its way (the key failed, the store refused): handle() answers
        finally:
            if not started:
                self.lock.release()
        return started

    def _begin_decision(
        self,
        req: Request,
        hrs: tuple[int, int, int],
        sign_bytes: bytes,
        ext_bytes: bytes,
        need_ext: bool,
        answer: Answer,
    ) -> bool:
        """:meth:`begin` once the chain's lock is held: True when the store took the
        decision (its callback releases the lock)."""
        chain = self.chain_id
        store = self.store
        if not store.is_authoritative():
            return False
        t0 = time.perf_counter()
        pre = guard.check(store.last(chain), *hrs, sign_bytes)
        t1 = time.perf_counter()
        if pre.verdict != Verdict.ACCEPT:
            return False  # a refusal or a retry: handle() answers it
        backend = self.backend
        later = None
        if backend.signs_later():
            sig = ext_sig = b""
            later = backend.sign_later
        else:
            sig = self._sign_now(sign_bytes)
            ext_sig = self._sign_now(ext_bytes) if ext_bytes else b""
        t2 = time.perf_counter()
        record = SignRecord(*hrs, sign_bytes, sig, ext_bytes, ext_sig)
        kind = type(req)

        def decided(decision: Any, err: BaseException | None) -> None:
            try:
                try:
                    if err is not None:
                        raise err
                    rec, ts, accepted = self._settle(decision, t0, t1, t2, later is not None)
                    if not accepted and ext_bytes:
                        rec = self._with_extension_now(rec, ext_bytes)
                except SigningRefused as e:
                    if kind is SignVoteRequest:
                        resp: Response = self._vote_refused(req, hrs, e)  # type: ignore[arg-type]
                    else:
                        resp = self._proposal_refused(req, hrs, e)  # type: ignore[arg-type]
                else:
                    if kind is SignVoteRequest:
                        resp = self._vote_signed(req, need_ext, rec, ts)  # type: ignore[arg-type]
                    else:
                        resp = self._proposal_signed(req, rec, ts)  # type: ignore[arg-type]
            except BaseException as e:  # what handle() would raise: the connection ends
                self.lock.release()
                answer(None, e)
                return
            self.lock.release()
            answer(resp, None)

        # A SigningRefused raised here (by the key above or by the store) is begin()'s:
        # nothing is on its way, and handle() meets the same refusal and answers it.
        return store.begin_commit(chain, record, later, decided)

    def _sign_now(self, msg: bytes) -> bytes:
        sig = self.backend.sign_sync(msg)
        if sig is None:  # self.begins: the backend signs without waiting
            raise BackendError(f"{type(self.backend).__name__} cannot sign without waiting")
        return sig

    def _with_extension_now(self, rec: SignRecord, ext_bytes: bytes) -> SignRecord:
        """:meth:`_with_extension` with a key that signs without waiting."""
        if rec.ext_sign_bytes == ext_bytes and rec.ext_signature and self._stored_ext_verifies(rec):
            return rec
        return dataclasses.replace(
            rec, ext_sign_bytes=ext_bytes, ext_signature=self._sign_now(ext_bytes)
        )

    async def _with_extension(self, rec: SignRecord, ext_bytes: bytes) -> SignRecord:
        # Extension signatures are not slashable; FilePV signs them afresh on retries.
        if rec.ext_sign_bytes == ext_bytes and rec.ext_signature and self._stored_ext_verifies(rec):
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
        self, requested: str, reason: str, hrs: tuple[int, int, int] | None, text: str
    ) -> None:
        """Log, count and report a refusal.  It is counted and logged under this
        service's chain (the connection's): the chain id a request names is the
        validator's input, so it is only quoted (repr) - never a label of its own (one
        series per id sent) or raw text in the log (a forged line)."""
        chain_id = self.chain_id
        last = self.store.last(chain_id)
        last_txt = f"{last.height}/{last.round}/{last.step}" if last else "none"
        at = f"{hrs[0]}/{hrs[1]}/{hrs[2]}" if hrs else "-"
        extra = {
            "event": "refused",
            "chain_id": chain_id,
            "hrs": at,
            "reason": reason,
            "last_signed": last_txt,
        }
        asked = ""
        if requested != chain_id:
            asked = f" requested_chain_id={requested[:64]!r}"
            extra["requested_chain_id"] = requested[:64]
        if self._log_refusal_now():
            log.warning(
                "refused chain=%s hrs=%s reason=%s last_signed=%s%s: %s",
                chain_id,
                at,
                reason,
                last_txt,
                asked,
                text,
                extra=extra,
            )
        if self.metrics is not None:
            self.metrics.refusals.labels(chain_id, reason).inc()
        if self.on_refused is not None:
            self.on_refused(chain_id, reason, hrs, text)

    def _log_refusal_now(self) -> bool:
        """Whether this refusal gets its own log line (at most
        :attr:`REFUSAL_LINES_PER_SECOND` a second; the first refusal of a new second
        first logs how many went unlogged in the one before it)."""
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            if self._log_dropped:
                log.warning(
                    "chain=%s: %d more refusals within a second were not logged, one by "
                    "one (nebula_refusals_total counts every one)",
                    self.chain_id,
                    self._log_dropped,
                    extra={"event": "refusals_not_logged", "chain_id": self.chain_id},
                )
            self._log_window, self._log_lines, self._log_dropped = now, 0, 0
        if self._log_lines < self.REFUSAL_LINES_PER_SECOND:
            self._log_lines += 1
            return True
        self._log_dropped += 1
        return False


__all__ = ["NebulaError", "SigningService"]
