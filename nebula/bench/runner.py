"""Drive a connected signer with the planned requests, time them, verify every answer."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from nebula import proto
from nebula.bench import stats
from nebula.bench.client import BlockingListener
from nebula.bench.workload import KINDS, Item, plan
from nebula.crypto.keys import address_of, signature_verifier
from nebula.errors import NebulaError, ProtocolError
from nebula.types import (
    PubKeyRequest,
    PubKeyResponse,
    SignedProposalResponse,
    SignedVoteResponse,
    SignProposalRequest,
    WireFamily,
)

__all__ = ["BenchResult", "RunOptions", "Verifier", "kinds_present", "run"]

_MAX_ERROR_SAMPLES = 20
_PROGRESS_EVERY = 0.1  # seconds between progress callbacks


@dataclasses.dataclass(slots=True)
class RunOptions:
    chain_id: str
    family: WireFamily
    requests: int = 2000
    warmup: int = 200
    start_height: int | None = None  # None: one above what the signer's metrics report, else 1
    proposal_every: int = 1
    extension_size: int = 64
    accept_timeout: float = 60.0
    request_timeout: float = 5.0
    max_reconnects: int = 3
    metrics_targets: Sequence[str] = ()
    handshakes: int = 0  # extra reconnections after the run, to time the handshake
    #: (label, pid, metrics target or None) of the signer processes whose CPU time per
    #: timed request is reported (local runs); the bench client itself is always added
    processes: Sequence[tuple[str, int, str | None]] = ()


@dataclasses.dataclass(slots=True)
class BenchResult:
    options: RunOptions
    key_type: str = ""
    pub_key: bytes = b""
    start_height: int = 0
    handshake_seconds: float = 0.0  # the first connection's
    handshakes: list[float] = dataclasses.field(default_factory=list)  # later re-dials
    duration: float = 0.0  # wall time of the timed requests
    kinds: list[str] = dataclasses.field(default_factory=list)
    rtts: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    warmup_errors: int = 0
    error_samples: list[str] = dataclasses.field(default_factory=list)
    reconnects: int = 0
    signatures_verified: int = 0
    phases: dict[str, dict[str, float]] | None = None
    phases_note: str = ""
    #: label -> {"role", "user_ms", "system_ms"}: CPU time per timed request
    cpu: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: Raft members only: True if every member kept its role and term through the timed
    #: run (so each CPU figure belongs to one role); False if leadership moved meanwhile
    roles_stable: bool | None = None
    roles_note: str = ""

    def add_error(self, text: str, *, warmup: bool = False) -> None:
        if warmup:
            self.warmup_errors += 1
        else:
            self.errors += 1
        if len(self.error_samples) < _MAX_ERROR_SAMPLES:
            self.error_samples.append(("warmup: " if warmup else "") + text)

    # ---- derived numbers -----------------------------------------------------------

    def summary(self, kind: str | None = None) -> stats.Summary:
        if kind is None:
            return stats.summarize(self.rtts)
        return stats.summarize(r for r, k in zip(self.rtts, self.kinds, strict=True) if k == kind)

    @property
    def throughput(self) -> float:
        """Timed requests per second, one at a time (each one a signing decision)."""
        return len(self.rtts) / self.duration if self.duration > 0 else 0.0

    @property
    def signatures_per_second(self) -> float:
        """Verified signatures (including extension signatures) per second."""
        return self.signatures_verified / self.duration if self.duration > 0 else 0.0


class Verifier:
    """Checks one response against the request it answers."""

    def __init__(self, chain_id: str, family: WireFamily, key_type: str, pub_key: bytes) -> None:
        self.chain_id = chain_id
        self.family = family
        self.verify = signature_verifier(key_type, pub_key)

    def check(self, item: Item, msg: bytes) -> tuple[int, str | None]:
        """(signatures verified, error text or None)."""
        try:
            resp = proto.decode_response(msg, self.family)
        except NebulaError as e:
            return 0, f"{item.kind} h={item.height}: undecodable response: {e}"
        where = f"{item.kind} h={item.height}"
        if isinstance(item.request, SignProposalRequest):
            if not isinstance(resp, SignedProposalResponse):
                return 0, f"{where}: got {type(resp).__name__}"
            if resp.error is not None:
                return 0, f"{where}: refused ({resp.error.code}) {resp.error.description}"
            sb = item.sign_bytes
            if resp.proposal.timestamp != item.request.proposal.timestamp:
                sb = proto.proposal_sign_bytes(self.chain_id, resp.proposal)
            if not self.verify(sb, resp.proposal.signature):
                return 0, f"{where}: proposal signature does not verify"
            return 1, None
        if not isinstance(resp, SignedVoteResponse):
            return 0, f"{where}: got {type(resp).__name__}"
        if resp.error is not None:
            return 0, f"{where}: refused ({resp.error.code}) {resp.error.description}"
        sb = item.sign_bytes
        if resp.vote.timestamp != item.request.vote.timestamp:
            sb = proto.vote_sign_bytes(self.chain_id, resp.vote)
        if not self.verify(sb, resp.vote.signature):
            return 0, f"{where}: vote signature does not verify"
        if not item.ext_sign_bytes:
            if resp.vote.extension_signature:
                return 1, f"{where}: unexpected extension signature"
            return 1, None
        if not resp.vote.extension_signature:
            return 1, f"{where}: extension signature missing"
        if not self.verify(item.ext_sign_bytes, resp.vote.extension_signature):
            return 1, f"{where}: extension signature does not verify"
        return 2, None


def _start_height(opts: RunOptions) -> int:
    if opts.start_height is not None:
        return opts.start_height
    if opts.metrics_targets:
        snap = stats.scrape(opts.metrics_targets)
        return snap.last_heights.get(opts.chain_id, 0) + 1
    return 1


def _time_handshakes(listener: BlockingListener, opts: RunOptions, res: BenchResult) -> None:
    """Close the connection ``opts.handshakes`` times; time each re-dial's handshake.

    The signer redials after its backoff; the clock runs from the accepted TCP
    connection to the established session (both sides' key exchange, the transcript,
    the signature and its verification, two network round trips).
    """
    for _ in range(opts.handshakes):
        try:
            c = listener.accept(opts.accept_timeout)
        except (TimeoutError, OSError) as e:
            res.add_error(f"re-dial for a handshake timing failed: {e}")
            return
        res.handshakes.append(c.handshake_seconds)
        c.close()


_ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}
_CLIENT = "bench client"


def run(
    listener: BlockingListener,
    opts: RunOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Accept the signer's connection, send warmup + timed requests, verify everything.

    ``progress(done, total)`` is called between requests, at most every 0.1 s (outside
    the timed send-to-receive window).  With ``opts.handshakes`` (TCP only) the
    connection is then closed that many times to time the signer's re-dial handshakes.
    """
    res = BenchResult(options=opts)
    conn = listener.accept(opts.accept_timeout)
    conn.set_timeout(opts.request_timeout)
    res.handshake_seconds = conn.handshake_seconds
    try:
        pk = conn.request(PubKeyRequest(opts.chain_id))
    except (OSError, ProtocolError) as e:
        raise NebulaError(f"PubKeyRequest failed: {e}") from None
    if not isinstance(pk, PubKeyResponse) or pk.error is not None:
        err = getattr(pk, "error", None)
        raise NebulaError(f"the signer refused PubKeyRequest: {err.description if err else pk}")
    res.key_type, res.pub_key = pk.key_type, pk.pub_key
    verifier = Verifier(opts.chain_id, opts.family, pk.key_type, pk.pub_key)

    res.start_height = _start_height(opts)
    items = plan(
        opts.chain_id,
        opts.family,
        start_height=res.start_height,
        count=opts.warmup + opts.requests,
        validator_address=address_of(pk.key_type, pk.pub_key),
        proposal_every=opts.proposal_every,
        extension_size=opts.extension_size,
    )
    warm, timed = items[: opts.warmup], items[opts.warmup :]
    total = len(items)

    def send_all(batch: list[Item], done0: int) -> tuple[list[bytes | None], list[float], float]:
        nonlocal conn
        msgs: list[bytes | None] = []
        rtts: list[float] = []
        perf = time.perf_counter
        next_report = perf() + _PROGRESS_EVERY
        t_start = perf()
        for i, item in enumerate(batch):
            while True:
                try:
                    msg, rtt = conn.roundtrip(item.wire)
                    break
                except (OSError, ProtocolError) as e:
                    why = (
                        f"no response within {opts.request_timeout}s"
                        if isinstance(e, BlockingIOError)
                        else f"connection lost: {e}"
                    )
                    res.add_error(f"{item.kind} h={item.height}: {why}")
                    conn.close()
                    if res.reconnects >= opts.max_reconnects:
                        raise NebulaError(
                            f"gave up after {res.reconnects} reconnects: {e}"
                        ) from None
                    res.reconnects += 1
                    conn = listener.accept(opts.accept_timeout)
                    conn.set_timeout(opts.request_timeout)
            msgs.append(msg)
            rtts.append(rtt)
            if progress is not None and perf() >= next_report:
                progress(done0 + i + 1, total)
                next_report = perf() + _PROGRESS_EVERY
        return msgs, rtts, perf() - t_start

    try:
        warm_msgs, _, _ = send_all(warm, 0)
        before = after = None
        if opts.metrics_targets:
            before = stats.scrape(opts.metrics_targets)
        procs = [*opts.processes, (_CLIENT, os.getpid(), None)]
        cpu_before = [stats.cpu_seconds(pid) for _, pid, _ in procs]
        msgs, rtts, duration = send_all(timed, len(warm))
        cpu_after = [stats.cpu_seconds(pid) for _, pid, _ in procs]
        if opts.metrics_targets:
            after = stats.scrape(opts.metrics_targets)
        if progress is not None:
            progress(total, total)
    finally:
        conn.close()
    if opts.handshakes and listener.scheme == "tcp":
        _time_handshakes(listener, opts, res)

    res.kinds = [it.kind for it in timed]
    res.rtts = rtts
    res.duration = duration
    for item, msg in zip(warm, warm_msgs, strict=True):
        _, err = verifier.check(item, msg)  # type: ignore[arg-type]
        if err:
            res.add_error(err, warmup=True)
    for item, msg in zip(timed, msgs, strict=True):
        n, err = verifier.check(item, msg)  # type: ignore[arg-type]
        res.signatures_verified += n
        if err:
            res.add_error(err)
    account(res, procs, cpu_before, cpu_after, before, after, len(timed))
    return res


def account(
    res: Any,
    procs: Sequence[tuple[str, int, str | None]],
    cpu_before: Sequence[tuple[float, float] | None],
    cpu_after: Sequence[tuple[float, float] | None],
    before: Any,
    after: Any,
    timed: int,
) -> None:
    """Fill ``res``'s roles, CPU per timed request per process and phase means from the
    ``/proc`` readings and metric scrapes taken around the timed requests (``res``: a
    :class:`BenchResult` or a multi-chain result, which have the same fields)."""
    roles, res.roles_stable, res.roles_note = roles_over_run(before, after)
    for (label, _, target), b, a in zip(procs, cpu_before, cpu_after, strict=True):
        if a is None or b is None or not timed:
            continue
        if label == _CLIENT:
            role = "validator"
        else:  # a Raft member reports nebula_raft_role; a single node does not count
            role = roles.get(target, "signer") if target else "signer"
        res.cpu[label] = {
            "role": role,
            "user_ms": (a[0] - b[0]) * 1000.0 / timed,
            "system_ms": (a[1] - b[1]) * 1000.0 / timed,
        }
    if before is not None and after is not None:
        res.phases = stats.phase_means(before, after)
        if res.reconnects:
            res.phases_note = "reconnects during the run: phase means include retried requests"
    else:
        res.phases_note = "no metrics endpoint given: per-phase breakdown unavailable"


def roles_over_run(
    before: stats.PhaseSnapshot | None, after: stats.PhaseSnapshot | None
) -> tuple[dict[str, str], bool | None, str]:
    """(role per target, stable, note): each Raft member's role through the timed run.

    A member's role is the one it had at the start if it had the same role in the same
    term at the end (Raft terms only grow, so no election happened in between), else
    ``"changed"``.  ``stable`` is None without Raft members, else whether no member
    changed; ``note`` says what moved."""
    if before is None or after is None or not after.raft_roles:
        return {}, None, ""
    out: dict[str, str] = {}
    moved: list[str] = []
    for target, role in after.raft_roles.items():
        same = before.raft_roles.get(target) == role and before.raft_terms.get(
            target
        ) == after.raft_terms.get(target)
        out[target] = _ROLE_NAMES.get(role, "unknown") if same else "changed"
        if not same:
            moved.append(target)
    if not moved:
        return out, True, ""
    terms = sorted(set(before.raft_terms.values()) | set(after.raft_terms.values()))
    note = (
        f"leadership moved during the timed run (terms {terms}): the CPU time of "
        f"{len(moved)} member(s) mixes roles"
    )
    return out, False, note


def kinds_present(res: BenchResult) -> list[str]:
    return [k for k in KINDS if k in set(res.kinds)]
