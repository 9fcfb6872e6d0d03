"""Drive several chains of one signer at once (``nebula bench --local N --chains K``).

Each chain has its own validator (a listener the signer dials, its own key) and, as a
validator does, one request in flight; the chains run concurrently.  Two client drivers:

* ``loop`` (the default): one thread multiplexes every chain's connection with
  ``selectors`` (epoll): when a response is complete its chain's next request is sent
  at once.  No GIL hand-offs, one ``epoll_wait`` for all ready sockets: the cheapest
  client on CPU, which matters when the client shares two cores with the signers.
* ``threads``: one thread per chain with the blocking client of :mod:`nebula.bench.client`
  (the single-chain bench's code, per thread).

Every signature is verified against its chain's key, after the timed window (as in the
single-chain bench): verification would otherwise take client CPU from the signers.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from nebula.bench import stats
from nebula.bench.client import BlockingListener, ValidatorConnection
from nebula.bench.runner import (
    _CLIENT,
    BenchResult,
    RunOptions,
    Verifier,
    _start_height,
    _time_handshakes,
    account,
)
from nebula.bench.workload import Item, plan
from nebula.crypto.keys import address_of
from nebula.errors import ConfigError, NebulaError, ProtocolError
from nebula.types import PubKeyRequest, PubKeyResponse

__all__ = ["CLIENTS", "MultiResult", "run_chains"]

CLIENTS = ("loop", "threads")
_PROGRESS_EVERY = 0.1


@dataclasses.dataclass(slots=True)
class MultiResult:
    """One run over several chains: a :class:`BenchResult` per chain plus the whole."""

    client: str
    chains: list[BenchResult]
    duration: float = 0.0  # wall time from the first timed request to the last answer
    #: label -> {"role", "user_ms", "system_ms"}: CPU time per timed request (all chains)
    cpu: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    roles_stable: bool | None = None
    roles_note: str = ""
    phases: dict[str, dict[str, float]] | None = None
    phases_note: str = ""

    @property
    def requests(self) -> int:
        return sum(len(r.rtts) for r in self.chains)

    @property
    def signatures_verified(self) -> int:
        return sum(r.signatures_verified for r in self.chains)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.chains)

    @property
    def warmup_errors(self) -> int:
        return sum(r.warmup_errors for r in self.chains)

    @property
    def reconnects(self) -> int:
        return sum(r.reconnects for r in self.chains)

    @property
    def throughput(self) -> float:
        """Timed requests per second across all chains."""
        return self.requests / self.duration if self.duration > 0 else 0.0

    @property
    def signatures_per_second(self) -> float:
        """Verified signatures per second across all chains."""
        return self.signatures_verified / self.duration if self.duration > 0 else 0.0

    def summary(self, kind: str | None = None) -> stats.Summary:
        """Latency over every chain's timed requests together."""
        return stats.summarize(
            r
            for res in self.chains
            for r, k in zip(res.rtts, res.kinds, strict=True)
            if kind is None or k == kind
        )

    def worst_chain(self) -> BenchResult | None:
        """The chain with the highest p50."""
        done = [r for r in self.chains if r.rtts]
        return max(done, key=lambda r: r.summary().p50) if done else None


class _Chain:
    """One chain's validator: its listener, connection, planned requests and answers."""

    def __init__(self, listener: BlockingListener, opts: RunOptions) -> None:
        self.listener = listener
        self.opts = opts
        self.res = BenchResult(options=opts)
        self.conn: ValidatorConnection | None = None
        self.verifier: Verifier | None = None
        self.warm: list[Item] = []
        self.timed: list[Item] = []
        self.warm_msgs: list[bytes] = []
        self.msgs: list[bytes] = []
        self.t_first = 0.0  # the first timed request's send time
        self.t_last = 0.0  # the last timed answer's arrival
        # driver state: the batch being sent, the next index, the send time in flight
        self.batch: list[Item] = []
        self.out: list[bytes] = []
        self.rtts: list[float] | None = None
        self.i = 0
        self.t0 = 0.0

    def connect(self) -> None:
        """Accept the signer's connection, ask for the key, plan the requests."""
        opts = self.opts
        self.conn = self.listener.accept(opts.accept_timeout)
        self.conn.set_timeout(opts.request_timeout)
        self.res.handshake_seconds = self.conn.handshake_seconds
        try:
            pk = self.conn.request(PubKeyRequest(opts.chain_id))
        except (OSError, ProtocolError) as e:
            raise NebulaError(f"{opts.chain_id}: PubKeyRequest failed: {e}") from None
        if not isinstance(pk, PubKeyResponse) or pk.error is not None:
            err = getattr(pk, "error", None)
            raise NebulaError(
                f"{opts.chain_id}: the signer refused PubKeyRequest: "
                f"{err.description if err else pk}"
            )
        self.res.key_type, self.res.pub_key = pk.key_type, pk.pub_key
        self.verifier = Verifier(opts.chain_id, opts.family, pk.key_type, pk.pub_key)
        self.res.start_height = _start_height(opts)
        items = plan(
            opts.chain_id,
            opts.family,
            start_height=self.res.start_height,
            count=opts.warmup + opts.requests,
            validator_address=address_of(pk.key_type, pk.pub_key),
            proposal_every=opts.proposal_every,
            extension_size=opts.extension_size,
        )
        self.warm, self.timed = items[: opts.warmup], items[opts.warmup :]

    def fail(self, item: Item, e: BaseException, *, warmup: bool) -> None:
        """Count the failed request, drop the connection and accept the re-dial."""
        opts = self.opts
        why = (
            f"no response within {opts.request_timeout}s"
            if isinstance(e, BlockingIOError | TimeoutError)
            else f"connection lost: {e}"
        )
        self.res.add_error(f"{opts.chain_id}: {item.kind} h={item.height}: {why}", warmup=warmup)
        assert self.conn is not None
        self.conn.close()
        if self.res.reconnects >= opts.max_reconnects:
            raise NebulaError(f"{opts.chain_id}: gave up after {self.res.reconnects} reconnects")
        self.res.reconnects += 1
        self.conn = self.listener.accept(opts.accept_timeout)
        self.conn.set_timeout(opts.request_timeout)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# ---- drivers ---------------------------------------------------------------------------


def _drive_threads(chains: list[_Chain], warmup: bool, tick: Callable[[int], None] | None) -> None:
    """One thread per chain, each with the blocking round trip of the single-chain bench."""
    start = threading.Barrier(len(chains) + 1)
    failures: list[BaseException] = []
    done = [0] * len(chains)

    def work(idx: int, ch: _Chain) -> None:
        batch = ch.warm if warmup else ch.timed
        out = ch.warm_msgs if warmup else ch.msgs
        rtts = ch.res.rtts
        try:
            start.wait()
            if not warmup:
                ch.t_first = time.perf_counter()
            for item in batch:
                while True:
                    assert ch.conn is not None
                    try:
                        msg, rtt = ch.conn.roundtrip(item.wire)
                        break
                    except (OSError, ProtocolError) as e:
                        ch.fail(item, e, warmup=warmup)
                out.append(msg)
                if not warmup:
                    rtts.append(rtt)
                done[idx] += 1
            if not warmup:
                ch.t_last = time.perf_counter()
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    threads = [
        threading.Thread(target=work, args=(i, ch), name=f"bench-{ch.opts.chain_id}", daemon=True)
        for i, ch in enumerate(chains)
    ]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        while t.is_alive():
            t.join(_PROGRESS_EVERY)
            if tick is not None:
                tick(sum(done))
    if failures:
        raise failures[0]


def _drive_loop(chains: list[_Chain], warmup: bool, tick: Callable[[int], None] | None) -> None:
    """One thread, every chain's socket in one epoll set, one request in flight each."""
    perf = time.perf_counter
    sel = selectors.DefaultSelector()
    active = 0
    done = 0
    try:
        for ch in chains:
            ch.batch = ch.warm if warmup else ch.timed
            ch.out = ch.warm_msgs if warmup else ch.msgs
            ch.rtts = None if warmup else ch.res.rtts
            ch.i = 0
            if not ch.batch:
                continue
            assert ch.conn is not None
            sel.register(ch.conn.sock, selectors.EVENT_READ, ch)
            active += 1
        t_start = perf()
        for key in list(sel.get_map().values()):
            ch = key.data
            ch.t0 = ch.conn.send(ch.batch[0].wire)
            if not warmup:
                ch.t_first = t_start
        next_report = perf() + _PROGRESS_EVERY
        timeout = min(ch.opts.request_timeout for ch in chains)
        while active:
            events = sel.select(_PROGRESS_EVERY)
            for key, _ in events:
                ch = key.data
                conn = ch.conn
                try:
                    msg = conn.read_available()
                except (OSError, ProtocolError) as e:
                    _retry(sel, ch, e, warmup)
                    continue
                if msg is None:
                    continue
                t1 = perf()
                ch.out.append(msg)
                if ch.rtts is not None:
                    ch.rtts.append(t1 - ch.t0)
                ch.i += 1
                done += 1
                if ch.i < len(ch.batch):
                    try:
                        ch.t0 = conn.send(ch.batch[ch.i].wire)
                    except OSError as e:
                        _retry(sel, ch, e, warmup)
                else:
                    ch.t_last = t1
                    sel.unregister(conn.sock)
                    active -= 1
            now = perf()
            if not events:  # nothing arrived for a while: is a request stuck?
                for key in list(sel.get_map().values()):
                    ch = key.data
                    if now - ch.t0 > timeout:
                        _retry(sel, ch, TimeoutError(), warmup)
            if tick is not None and now >= next_report:
                tick(done)
                next_report = now + _PROGRESS_EVERY
    finally:
        sel.close()


def _retry(sel: selectors.BaseSelector, ch: _Chain, e: BaseException, warmup: bool) -> None:
    """A failed request in the loop driver: re-dial (blocking the loop; an error path)
    and send the same request again."""
    assert ch.conn is not None
    sel.unregister(ch.conn.sock)
    ch.fail(ch.batch[ch.i], e, warmup=warmup)
    assert ch.conn is not None
    sel.register(ch.conn.sock, selectors.EVENT_READ, ch)
    ch.t0 = ch.conn.send(ch.batch[ch.i].wire)


_DRIVERS = {"loop": _drive_loop, "threads": _drive_threads}


def run_chains(
    listeners: Sequence[BlockingListener],
    opts: Sequence[RunOptions],
    *,
    client: str = "loop",
    metrics_targets: Sequence[str] = (),
    processes: Sequence[tuple[str, int, str | None]] = (),
    handshakes: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> MultiResult:
    """Bench one signer's chains concurrently: ``listeners[i]`` is chain ``opts[i]``'s
    validator.  Warm-up and timed requests run on all chains at once; each signature is
    verified afterwards.  With ``handshakes`` (TCP) the first chain's connection is then
    dropped that many times to time the re-dial handshake."""
    if client not in _DRIVERS:
        raise ConfigError(f"client must be one of {', '.join(CLIENTS)}, got {client!r}")
    if len(listeners) != len(opts) or not opts:
        raise ConfigError("one listener per chain, at least one chain")
    drive = _DRIVERS[client]
    chains = [_Chain(li, o) for li, o in zip(listeners, opts, strict=True)]
    out = MultiResult(client=client, chains=[c.res for c in chains])
    n_warm = sum(o.warmup for o in opts)
    total = n_warm + sum(o.requests for o in opts)

    def ticker(base: int) -> Callable[[int], None] | None:
        if progress is None:
            return None
        return lambda done: progress(base + done, total)

    try:
        for ch in chains:
            ch.connect()
        drive(chains, True, ticker(0))
        before = after = None
        if metrics_targets:
            before = stats.scrape(metrics_targets)
        procs = [*processes, (_CLIENT, os.getpid(), None)]
        cpu_before = [stats.cpu_seconds(pid) for _, pid, _ in procs]
        drive(chains, False, ticker(n_warm))
        cpu_after = [stats.cpu_seconds(pid) for _, pid, _ in procs]
        if metrics_targets:
            after = stats.scrape(metrics_targets)
        if progress is not None:
            progress(total, total)
    finally:
        for ch in chains:
            ch.close()
    first = chains[0]
    if handshakes and first.listener.scheme == "tcp":
        _time_handshakes(first.listener, dataclasses.replace(first.opts, handshakes=handshakes),
                         first.res)  # fmt: skip

    timed_total = 0
    for ch in chains:
        res, verifier = ch.res, ch.verifier
        assert verifier is not None
        res.kinds = [it.kind for it in ch.timed]
        res.duration = ch.t_last - ch.t_first
        timed_total += len(ch.timed)
        for item, msg in zip(ch.warm, ch.warm_msgs, strict=True):
            _, err = verifier.check(item, msg)
            if err:
                res.add_error(f"{ch.opts.chain_id}: {err}", warmup=True)
        for item, msg in zip(ch.timed, ch.msgs, strict=True):
            n, err = verifier.check(item, msg)
            res.signatures_verified += n
            if err:
                res.add_error(f"{ch.opts.chain_id}: {err}")
    starts = [ch.t_first for ch in chains if ch.timed]
    ends = [ch.t_last for ch in chains if ch.timed]
    out.duration = max(ends) - min(starts) if starts else 0.0

    account(out, procs, cpu_before, cpu_after, before, after, timed_total)
    return out
