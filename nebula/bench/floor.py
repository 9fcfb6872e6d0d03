"""``nebula bench --floor``: the cheapest round trips this machine allows, without Nebula.

A signer's latency has a part no signer code can remove: waking the processes that
take part (over loopback, on however many cores there are) and making the decision
durable on the disk under the state.  This module measures that part with the same
I/O stack Nebula runs on, and none of Nebula's work, so that ``nebula bench`` numbers
can be read against it:

* the client is a blocking socket with ``TCP_NODELAY``, timed from ``sendall`` until
  the whole answer is read (as :mod:`nebula.bench.client` does);
* every server is a separate process running a uvloop event loop, one connection per
  peer, ``TCP_NODELAY``;
* a durable write is one ``pwrite`` of a 4 KiB block that was written and fsync'ed
  before the run, then ``fdatasync`` (as the local state file and the Raft journal do).

Scenarios (one request in flight, ``REQUEST_SIZE``-byte requests and answers):

``loopback``
    The server echoes.  Two process wake-ups and the loopback: the transport floor.
``1 node, 1 fdatasync``
    The server makes the request durable once before answering (a single durable
    write per decision, the least S1 allows).
``1 node, 2 fdatasyncs``
    Two durable writes in sequence (what ``persist = "local"`` does: mirrored slots).
``N nodes, majority durable``
    The leader forwards the request to its N-1 followers, then writes and syncs its
    own copy; each follower writes and syncs, then acknowledges; the leader answers
    once its own copy and enough acknowledgements make a majority durable.  This is
    the message and sync pattern of one Raft commit (AppendEntries, fdatasync on every
    member, acknowledgements), without Raft's bookkeeping.
``3 nodes, K at once, group commit`` (``--floor --chains K``)
    K client connections, each with one request in flight (K chains' validators, as
    ``nebula bench --local 3 --chains K`` drives them).  The leader group-commits what
    one loop pass read: one forward to each follower, one durable write of its own;
    a follower makes what one read brought durable with one write and acknowledges the
    last of it.  The throughput ceiling of many chains on this machine's cores and disk.

Nothing is encoded, encrypted, guarded, signed or replicated by Raft here, so a
scenario's numbers are a floor for the matching Nebula setup on the same machine, not
an estimate of it.  The disk is shared by every process (all nodes on one machine),
as it is in ``nebula bench --local``.
"""

from __future__ import annotations

import dataclasses
import os
import select
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nebula.bench.stats import Summary, cpu_time, summarize
from nebula.errors import NebulaError

__all__ = [
    "REQUEST_SIZE",
    "SCENARIOS",
    "FloorResult",
    "Scenario",
    "chains_comparison",
    "floor_json",
    "format_floor",
    "group_scenario",
    "machine_setup",
    "run_floor",
    "run_scenario",
]

REQUEST_SIZE = 200
"""Bytes per request and per answer (a SignVoteRequest for a v1.0 vote is ~150-250)."""
BLOCK = 4096
_SEQ = struct.Struct("<Q")
_STARTUP_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    followers: int  # 0: the server answers alone
    syncs: int  # durable writes per request (per group, at once) on every node
    connections: int = 1  # > 1: that many clients at once, and the leader group-commits


def group_scenario(connections: int) -> Scenario:
    """``3 nodes, K at once, group commit`` (module docstring)."""
    if connections < 2:
        raise NebulaError("the group-commit floor needs at least 2 connections")
    return Scenario(f"3 nodes, {connections} at once, group commit", 2, 1, connections)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("loopback", 0, 0),
    Scenario("1 node, 1 fdatasync", 0, 1),
    Scenario("1 node, 2 fdatasyncs", 0, 2),
    Scenario("3 nodes, majority durable", 2, 1),
    Scenario("5 nodes, majority durable", 4, 1),
)


# ---- the server processes ------------------------------------------------------------


def _durable_file(directory: str, name: str) -> int:
    """A file whose first block is written and synced, so later fdatasyncs flush data only."""
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.pwrite(fd, bytes(BLOCK), 0)
    os.fsync(fd)
    return fd


def _nodelay(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _serve(
    directory: str,
    syncs: int,
    follower_ports: list[int],
    majority: int,
    group: bool = False,
) -> None:
    """One server process.

    ``majority`` 0: a follower (acknowledges the last request of each read with its
    sequence number after its durable writes); otherwise it answers with the request
    once ``majority`` nodes, itself included, have made it durable.  ``group``: the
    leader forwards and persists once per loop pass (group commit), not per request.
    """
    import asyncio

    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fd = _durable_file(directory, f"node-{os.getpid()}") if syncs else -1
        block = bytearray(BLOCK)

        def persist(msg: bytes) -> None:
            block[: len(msg)] = msg
            for _ in range(syncs):
                os.pwrite(fd, block, 0)
                os.fdatasync(fd)

        # The leader's links to its followers and what they acknowledged.  The leader
        # numbers what it forwards (g); a follower acknowledges the last g it made
        # durable, which vouches for every earlier one (one connection: in order).
        acked = [0] * len(follower_ports)
        waiting: dict[int, tuple[Any, bytes]] = {}  # g -> (client transport, answer)
        need = majority - (1 if syncs else 0)  # this node's own copy counts
        own = [0]  # the last g this node made durable (all of them with no syncs)
        queued: list[bytes] = []  # g-numbered copies read in this loop pass
        armed = [False]
        counter = [0]

        def try_answer() -> None:
            done = own[0] if need <= 0 else min(own[0], sorted(acked, reverse=True)[need - 1])
            for g in [g for g in waiting if g <= done]:
                client, msg = waiting.pop(g)
                client.write(msg)

        class Ack(asyncio.Protocol):
            def __init__(self, k: int) -> None:
                self.k = k
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                n = len(self.buf) // _SEQ.size * _SEQ.size
                if n:
                    (g,) = _SEQ.unpack_from(self.buf, n - _SEQ.size)
                    self.buf = self.buf[n:]
                    acked[self.k] = max(acked[self.k], g)
                    try_answer()

        links = []
        for k, port in enumerate(follower_ports):
            t, _ = await loop.create_connection(lambda k=k: Ack(k), "127.0.0.1", port)
            _nodelay(t)
            links.append(t)

        def flush() -> None:
            armed[0] = False
            if not queued:
                return
            data = b"".join(queued)
            queued.clear()
            for link in links:
                link.write(data)
            if fd >= 0:
                persist(data[-BLOCK:])  # the leader's own copy, while followers write
            own[0] = counter[0]
            try_answer()  # (acknowledged while this node synced)

        class Peer(asyncio.Protocol):
            """A client (or, on a follower, the leader): fixed-size requests."""

            def connection_made(self, transport: Any) -> None:
                self.t = transport
                self.buf = b""
                _nodelay(transport)

            def data_received(self, data: bytes) -> None:
                self.buf += data
                n = len(self.buf) // REQUEST_SIZE * REQUEST_SIZE
                if not n:
                    return
                chunk, self.buf = self.buf[:n], self.buf[n:]
                if links:
                    for i in range(0, n, REQUEST_SIZE):
                        msg = chunk[i : i + REQUEST_SIZE]
                        counter[0] += 1
                        g = counter[0]
                        waiting[g] = (self.t, msg)
                        queued.append(_SEQ.pack(g) + msg[_SEQ.size :])
                    if not group:
                        flush()  # one request in flight: forward and persist at once
                    elif not armed[0]:
                        armed[0] = True
                        loop.call_soon(flush)  # the rest of this loop pass joins it
                    return
                # One durable write for what this read brought (a follower: a group).
                if fd >= 0:
                    persist(chunk[-BLOCK:])
                # a follower acknowledges its last sequence number; a lone server echoes
                last = n - REQUEST_SIZE
                self.t.write(chunk[last : last + _SEQ.size] if majority == 0 else chunk)

        server = await loop.create_server(Peer, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# ---- the client ------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class FloorResult:
    scenario: Scenario
    latency: Summary
    throughput_rps: float
    #: CPU ms (user + system, every thread) per timed request, by role: ``server`` for a
    #: lone server, else ``leader`` and ``follower`` (the busiest follower); a role whose
    #: process could not be read is missing
    cpu_ms: dict[str, float] = dataclasses.field(default_factory=dict)


def _measure(
    port: int, requests: int, warmup: int, timed: Callable[[], None] | None = None
) -> tuple[list[float], float]:
    """``requests`` round trips after ``warmup`` untimed ones; ``timed`` is called once
    when the timed part starts."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pad = os.urandom(REQUEST_SIZE - _SEQ.size)
    times: list[float] = []
    view = memoryview(bytearray(REQUEST_SIZE))
    try:
        t_start = 0.0
        for i in range(warmup + requests):
            if i == warmup:
                if timed is not None:
                    timed()
                t_start = time.perf_counter()
            msg = _SEQ.pack(i + 1) + pad
            t0 = time.perf_counter()
            sock.sendall(msg)
            got = 0
            while got < REQUEST_SIZE:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise NebulaError("floor server closed the connection")
                got += n
            t1 = time.perf_counter()
            if view[:8] != msg[:8]:
                raise NebulaError("floor server answered out of order")
            if i >= warmup:
                times.append(t1 - t0)
        elapsed = time.perf_counter() - t_start
    finally:
        sock.close()
    return times, elapsed


def _measure_many(
    port: int, connections: int, requests: int, warmup: int, timed: Callable[[], None]
) -> tuple[list[float], float]:
    """``connections`` clients at once from one thread (``selectors``), each with one
    request in flight: ``warmup`` then ``requests`` round trips each; ``timed`` is called
    once every client has finished its warmup (the timed part starts then)."""
    socks = []
    try:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        pad = os.urandom(REQUEST_SIZE - _SEQ.size)
        if warmup:
            _drive(socks, warmup, pad)
        timed()
        t_start = time.perf_counter()
        times = _drive(socks, requests, pad)
        return times, time.perf_counter() - t_start
    finally:
        for sock in socks:
            sock.close()


def _drive(socks: list[socket.socket], count: int, pad: bytes) -> list[float]:
    """``count`` round trips on every socket, one in flight each; their times."""
    sel = selectors.DefaultSelector()
    times: list[float] = []
    sent = [0] * len(socks)  # the sequence number in flight per socket
    t0 = [0.0] * len(socks)
    got = [0] * len(socks)
    bufs = [bytearray(REQUEST_SIZE) for _ in socks]

    def send(k: int) -> None:
        sent[k] += 1
        t0[k] = time.perf_counter()
        # 200 bytes into an empty send buffer (the answer to the last one has arrived)
        if socks[k].send(_SEQ.pack(sent[k]) + pad) != REQUEST_SIZE:
            raise NebulaError("floor client: a request did not fit the socket's buffer")

    try:
        for k, sock in enumerate(socks):
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, k)
            send(k)
        left = len(socks)
        while left:
            events = sel.select(30)
            if not events:
                raise NebulaError("floor server stopped answering")
            for key, _ in events:
                k = key.data
                n = socks[k].recv_into(memoryview(bufs[k])[got[k] :])
                if n == 0:
                    raise NebulaError("floor server closed the connection")
                got[k] += n
                if got[k] < REQUEST_SIZE:
                    continue
                times.append(time.perf_counter() - t0[k])
                got[k] = 0
                if _SEQ.unpack_from(bufs[k])[0] != sent[k]:
                    raise NebulaError("floor server answered out of order")
                if sent[k] == count:
                    sel.unregister(socks[k])
                    left -= 1
                else:
                    send(k)
        return times
    finally:
        sel.close()
        for sock in socks:
            sock.setblocking(True)


def _start_server(
    directory: str, syncs: int, followers: list[int], majority: int, group: bool = False
) -> tuple:
    """A server process (``python -m nebula.bench.floor``); returns (process, port)."""
    cmd = [
        sys.executable, "-m", "nebula.bench.floor", directory, str(syncs), str(majority),
        ",".join(map(str, followers)), "group" if group else "",
    ]  # fmt: skip
    env = dict(os.environ)
    # the package this module came from, whether installed or run from a checkout
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], _STARTUP_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise NebulaError(f"a floor server did not start (exit status {proc.poll()})")
    return proc, int(line)


def run_scenario(scenario: Scenario, directory: str, requests: int, warmup: int) -> FloorResult:
    procs: list[subprocess.Popen] = []
    try:
        followers = []
        for _ in range(scenario.followers):
            proc, port = _start_server(directory, scenario.syncs, [], 0)
            procs.append(proc)
            followers.append(port)
        majority = (scenario.followers + 1) // 2 + 1 if scenario.followers else 1
        group = scenario.connections > 1
        proc, leader = _start_server(directory, scenario.syncs, followers, majority, group)
        procs.append(proc)
        before: list[float | None] = []

        def timed() -> None:
            before.extend(cpu_time(p.pid) for p in procs)

        if group:
            times, elapsed = _measure_many(leader, scenario.connections, requests, warmup, timed)
        else:
            times, elapsed = _measure(leader, requests, warmup, timed)
        after = [cpu_time(p.pid) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
    total = len(times)  # every connection's timed requests
    used = [
        None if a is None or b is None else (a - b) * 1000.0 / total
        for a, b in zip(after, before, strict=True)
    ]
    cpu: dict[str, float] = {}
    if used[-1] is not None:
        cpu["leader" if scenario.followers else "server"] = round(used[-1], 4)
    if scenario.followers and all(u is not None for u in used[:-1]):
        cpu["follower"] = round(max(u for u in used[:-1] if u is not None), 4)
    return FloorResult(scenario, summarize(times), total / elapsed if elapsed > 0 else 0.0, cpu)


def run_floor(
    requests: int = 3000,
    warmup: int = 300,
    parent: str | os.PathLike[str] | None = None,
    scenarios: tuple[Scenario, ...] = SCENARIOS,
    progress: Callable[[str], None] | None = None,
) -> list[FloorResult]:
    """Run every scenario in a temporary directory under ``parent`` (the disk measured)."""
    if requests < 1 or warmup < 0:
        raise NebulaError("requests must be >= 1 and warmup >= 0")
    try:
        directory = tempfile.mkdtemp(
            prefix="nebula-floor-", dir=os.fspath(parent) if parent else None
        )
    except OSError as e:
        raise NebulaError(f"cannot create the floor's scratch directory: {e}") from None
    try:
        out = []
        for sc in scenarios:
            if progress is not None:
                progress(sc.name)
            out.append(run_scenario(sc, directory, requests, warmup))
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_ONE_AT_A_TIME = "3 nodes, majority durable"


def chains_comparison(results: list[FloorResult]) -> list[dict[str, Any]]:
    """Each ``3 nodes, K at once`` scenario against ``3 nodes, majority durable`` (one
    request at a time): the ratios ``nebula bench --local 3 --chains 1,K`` reports for
    Nebula (aggregate requests/s and p50), here for the machine with no Nebula work."""
    one = next((r for r in results if r.scenario.name == _ONE_AT_A_TIME), None)
    if one is None or one.throughput_rps <= 0 or one.latency.p50 <= 0:
        return []
    return [
        {
            "connections": r.scenario.connections,
            "throughput_ratio": round(r.throughput_rps / one.throughput_rps, 3),
            "p50_ratio": round(r.latency.p50 / one.latency.p50, 3),
        }
        for r in results
        if r.scenario.connections > 1
    ]


def floor_json(results: list[FloorResult], setup: dict[str, Any]) -> dict[str, Any]:
    return {
        "setup": setup,
        "chains_comparison": chains_comparison(results),
        "request_size": REQUEST_SIZE,
        "scenarios": {
            r.scenario.name: {
                "followers": r.scenario.followers,
                "fdatasyncs_per_node": r.scenario.syncs,
                "connections": r.scenario.connections,
                "latency_ms": {k: round(v, 4) for k, v in r.latency.as_dict().items()},
                "throughput_rps": round(r.throughput_rps, 1),
                "cpu_ms_per_request": dict(r.cpu_ms),
            }
            for r in results
        },
    }


def format_floor(results: list[FloorResult], setup: dict[str, Any]) -> str:
    w = max([28] + [len(r.scenario.name) for r in results])
    head = (
        f"{'scenario':<{w}} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'req/s':>8}"
        f" {'CPU/req: leader':>16} {'follower':>9}"
    )
    lines = [
        f"floor of this machine ({setup.get('workdir')}), {setup.get('requests')} requests "
        f"of {REQUEST_SIZE} bytes, ms:",
        head,
        "-" * len(head),
    ]
    for r in results:
        s = r.latency
        lead = r.cpu_ms.get("leader", r.cpu_ms.get("server"))
        fol = r.cpu_ms.get("follower")
        lines.append(
            f"{r.scenario.name:<{w}} {s.p50:8.3f} {s.p90:8.3f} {s.p99:8.3f} {s.max:8.3f} "
            f"{r.throughput_rps:8.0f} {'-' if lead is None else f'{lead:.3f}':>16} "
            f"{'-' if fol is None else f'{fol:.3f}':>9}"
        )
    lines.append(
        "No signing, encoding, encryption or Raft: Nebula's matching setup cannot be faster,"
    )
    lines.append(
        "nor use less CPU (ms per request: the server or leader, and the busiest follower)."
    )
    for c in chains_comparison(results):
        lines.append(
            f"{c['connections']} at once against one at a time (3 nodes): "
            f"{c['throughput_ratio']:.2f}x the requests/s, {c['p50_ratio']:.2f}x the p50 "
            f"(the ratios `--local 3 --chains 1,{c['connections']}` gives for Nebula)."
        )
    return "\n".join(lines)


def machine_setup(parent: str | os.PathLike[str] | None, requests: int, warmup: int) -> dict:
    return {
        "mode": "floor",
        "workdir": str(Path(parent) if parent else Path(tempfile.gettempdir())),
        "requests": requests,
        "warmup": warmup,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


if __name__ == "__main__":  # a server process of run_scenario
    _d, _syncs, _majority, _followers, _group = sys.argv[1:6]
    _serve(
        _d,
        int(_syncs),
        [int(p) for p in _followers.split(",") if p],
        int(_majority),
        _group == "group",
    )
