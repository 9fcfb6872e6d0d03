"""One RaftStore in its own process, driven over stdin/stdout, and a cluster harness.

Run a node::

    python -m tests.support.raftnode '<json config>'

Config keys: ``node_id``, ``bind``, ``peers`` ({id: "host:port"}), ``data``,
``secret`` (hex), optional ``initial`` ({chain: priv_validator_state-like JSON}),
``loop`` ("uvloop" | "asyncio"), and ``store`` (extra RaftStore keyword arguments).

Control channel: one JSON object per line on stdin, ``{"id": n, "op": ...}``; every
request is handled as its own task (so requests may overlap) and answered with one
line ``{"id": n, ...}`` on stdout.  Unsolicited lines ``{"event": ...}`` report role
changes.  Ops: ``commit`` (chain, h, r, s, sb, sig[, esb, esig] hex), ``status``,
``transfer`` (to), ``compact``, ``add_member`` / ``remove_member``, ``bench`` (n, chain,
start), ``transport`` (the transport's listener and per-peer counters), ``close``.  Errors come back as ``{"id": n, "error": "<class>", "message": ...}``.

The harness (:class:`NodeProcess`, :class:`Cluster`) starts such processes for the
integration tests and the benchmark; every process it starts is killed by pid on
``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nebula.errors import ConfigError, NebulaError

REPO = Path(__file__).resolve().parents[2]


# ---- the node process ------------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _record_json(rec: Any) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {
        "h": rec.height,
        "r": rec.round,
        "s": rec.step,
        "sb": rec.sign_bytes.hex(),
        "sig": rec.signature.hex(),
    }


def _install_faults(faults_dir: str) -> None:
    """While ``<faults_dir>/fdatasync_eio`` exists, ``os.fdatasync`` fails with EIO (a disk
    that lost a write).  The check is a stat per call: test processes only.  (The
    slow-disk and clock hooks of ``tests/support/faults/sitecustomize.py`` are enabled
    by ``PYTHONPATH`` + ``NEBULA_FAULTS_DIR``; they cannot make a call fail.)"""
    import errno

    flag = os.path.join(faults_dir, "fdatasync_eio")
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if os.path.exists(flag):
            raise OSError(errno.EIO, "Input/output error (injected)")
        real(fd)

    os.fdatasync = fdatasync


async def _serve(cfg: dict[str, Any]) -> None:
    import logging

    from nebula.guard import SignRecord
    from nebula.state.base import record_from_json
    from nebula.state.raft import RaftStore

    if cfg.get("faults"):
        _install_faults(cfg["faults"])
    loop = asyncio.get_running_loop()
    initial = {
        c: record_from_json(v, f"initial[{c}]") for c, v in (cfg.get("initial") or {}).items()
    }
    store = RaftStore(
        int(cfg["node_id"]),
        cfg["bind"],
        {int(k): v for k, v in cfg["peers"].items()},
        cfg["data"],
        bytes.fromhex(cfg["secret"]),
        initial=initial,
        loop=loop,
        **cfg.get("store", {}),
    )
    await store.start()
    store.on_role_change(lambda leader: _emit({"event": "role", "leader": leader}))
    done = asyncio.Event()

    async def commit(req: dict[str, Any]) -> dict[str, Any]:
        rec = SignRecord(
            int(req["h"]),
            int(req["r"]),
            int(req["s"]),
            bytes.fromhex(req["sb"]),
            bytes.fromhex(req["sig"]),
            bytes.fromhex(req.get("esb", "")),
            bytes.fromhex(req.get("esig", "")),
        )
        chain = req.get("chain", "test-chain")
        dec = await store.commit(chain, rec)
        return {
            "chain": chain,
            "verdict": dec.verdict.name,
            "record": _record_json(dec.record),
            "refusal": None if dec.error is None else type(dec.error).__name__,
        }

    async def bench(req: dict[str, Any]) -> dict[str, Any]:
        n = int(req.get("n", 1000))
        h0 = int(req.get("start", 1))
        chain = req.get("chain", "bench")
        lat = []
        bad = 0
        for h in range(h0, h0 + n):
            rec = SignRecord(h, 0, 2, b"bench-%d" % h + bytes(140), bytes(64))
            t = time.perf_counter()
            dec = await store.commit(chain, rec)
            lat.append(time.perf_counter() - t)
            bad += dec.verdict.name != "ACCEPT"
        lat.sort()
        return {
            "n": n,
            "not_accepted": bad,
            "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "mean_ms": sum(lat) / len(lat) * 1e3,
        }

    async def handle(req: dict[str, Any]) -> None:
        rid = req.get("id")
        op = req.get("op")
        try:
            if op == "commit":
                out = await commit(req)
            elif op == "status":
                out = {"status": store.status()}
            elif op == "transfer":
                out = {"leader": await store.transfer_leadership(req.get("to"))}
            elif op == "compact":
                store.compact()
                out = {}
            elif op == "add_member":
                await store.add_member(int(req["node"]), req["addr"])
                out = {}
            elif op == "remove_member":
                await store.remove_member(int(req["node"]))
                out = {}
            elif op == "bench":
                out = await bench(req)
            elif op == "transport":
                tr = store._transport
                out = {"listener": tr.listener_stats(), "peers": tr.stats()}
            elif op == "close":
                await store.close()
                done.set()
                out = {}
            else:
                raise ConfigError(f"unknown op {op!r}")
        except NebulaError as e:
            out = {"error": type(e).__name__, "message": str(e)}
        except Exception as e:  # report, keep serving
            out = {"error": type(e).__name__, "message": repr(e)}
        _emit({"id": rid, **out})

    async def watch_loop() -> None:
        # Diagnostics for the tests' logs: a stalled event loop explains elections.
        log = logging.getLogger("raftnode")
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            lag = time.monotonic() - t - 0.05
            if lag > 0.2:
                log.warning("event loop stalled for %.0f ms", lag * 1e3)

    watcher = asyncio.ensure_future(watch_loop())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"event": "ready", "pid": os.getpid()})
    tasks: set[asyncio.Task] = set()
    while not done.is_set():
        line = await reader.readline()
        if not line:
            break
        t = asyncio.ensure_future(handle(json.loads(line)))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    watcher.cancel()
    if not done.is_set():
        await store.close()


def main(argv: list[str]) -> int:
    import logging

    cfg = json.loads(argv[1])
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    if cfg.get("loop", "uvloop") == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    try:
        runner(_serve(cfg))
    except NebulaError as e:
        _emit({"event": "fatal", "error": type(e).__name__, "message": str(e)})
        return 2
    return 0


# ---- the harness -----------------------------------------------------------------------


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


class NodeDead(RuntimeError):
    """The node process exited or its control channel closed."""


def _limit_nofile(n: int) -> Any:
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


class NodeProcess:
    """A ``raftnode`` child process and its line-based control channel.

    ``nofile``: the child's RLIMIT_NOFILE (soft and hard), set before it execs."""

    def __init__(self, cfg: dict[str, Any], log_path: Path, nofile: int | None = None) -> None:
        self.cfg = cfg
        self.node_id = int(cfg["node_id"])
        self.log_path = log_path
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        #: every commit answer this node gave, including ones nobody waited for any more
        self.responses: list[dict[str, Any]] = []
        self.stopped = False
        self._ready = threading.Event()
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.raftnode", json.dumps(cfg)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            preexec_fn=None if nofile is None else _limit_nofile(nofile),
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *_pythonpath()])},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if "event" in msg:
                self.events.append({**msg, "t": time.monotonic()})
                if msg["event"] in ("ready", "fatal"):
                    self._ready.set()
                continue
            if "verdict" in msg:
                self.responses.append({**msg, "node": self.node_id})
            with self._lock:
                q = self._waiting.pop(msg.get("id"), None)
            if q is not None:
                q.put(msg)
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for q in waiting.values():
            q.put(None)
        self._ready.set()

    def wait_ready(self, timeout: float = 15.0) -> None:
        if not self._ready.wait(timeout):
            raise NodeDead(f"node {self.node_id} did not start within {timeout}s")
        fatal = [e for e in self.events if e["event"] == "fatal"]
        if fatal:
            raise NodeDead(f"node {self.node_id} refused to start: {fatal[0]['message']}")
        if not any(e["event"] == "ready" for e in self.events):
            raise NodeDead(f"node {self.node_id} exited during start (see {self.log_path})")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, op: str, timeout: float = 5.0, **kw: Any) -> dict[str, Any]:
        rid = next(self._ids)
        q: queue.Queue = queue.Queue()
        with self._lock:
            if not self.alive:
                raise NodeDead(f"node {self.node_id} is not running")
            self._waiting[rid] = q
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps({"id": rid, "op": op, **kw}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            with self._lock:
                self._waiting.pop(rid, None)
            raise NodeDead(f"node {self.node_id} is not running") from None
        try:
            msg = q.get(timeout=timeout)
        except queue.Empty:
            with self._lock:
                self._waiting.pop(rid, None)
            raise TimeoutError(f"node {self.node_id}: no answer to {op} in {timeout}s") from None
        if msg is None:
            raise NodeDead(f"node {self.node_id} exited")
        return msg

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        return self.request("status", timeout=timeout)["status"]

    def commit(self, h: int, sb: bytes, *, r: int = 0, s: int = 2, **kw: Any) -> dict[str, Any]:
        sig = kw.pop("sig", b"sig-" + sb)
        return self.request(
            "commit",
            h=h,
            r=r,
            s=s,
            sb=sb.hex(),
            sig=sig.hex(),
            timeout=kw.pop("timeout", 5.0),
            **kw,
        )

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        if self.alive:
            if self.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._reader.join(timeout=2)

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()  # type: ignore[union-attr]
        self._log.close()


class Auditor:
    """Every decision that left the store, per (chain, height, round, step).

    Released = ACCEPT or SAME/SAME_TIMESTAMP (the stored signature handed out again).
    :meth:`check` fails on two different signatures (or sign bytes) for one HRS and
    returns ``{hrs: sign_bytes}``.  ``nodes`` (a callable returning node processes) adds
    every commit answer those processes gave, including ones nobody waited for any
    more; :meth:`record` adds one decision seen in-process.
    """

    RELEASED = ("ACCEPT", "SAME", "SAME_TIMESTAMP")

    def __init__(self, nodes: Any = None) -> None:
        self._nodes = nodes
        self._own: list[tuple[tuple[str, int, int, int], bytes, bytes]] = []

    def record(self, chain: str, verdict: str, rec: Any) -> None:
        """An in-process decision (``rec``: the SignRecord the store returned)."""
        if verdict in self.RELEASED and rec is not None:
            key = (chain, rec.height, rec.round, rec.step)
            self._own.append((key, bytes(rec.sign_bytes), bytes(rec.signature)))

    def released(self) -> dict[tuple[str, int, int, int], set[tuple[bytes, bytes]]]:
        out: dict[tuple[str, int, int, int], set[tuple[bytes, bytes]]] = {}
        for key, sb, sig in self._own:
            out.setdefault(key, set()).add((sb, sig))
        for p in self._nodes() if self._nodes is not None else ():
            for resp in list(p.responses):
                if resp.get("verdict") in self.RELEASED and resp.get("record"):
                    r = resp["record"]
                    key = (resp["chain"], r["h"], r["r"], r["s"])
                    out.setdefault(key, set()).add(
                        (bytes.fromhex(r["sb"]), bytes.fromhex(r["sig"]))
                    )
        return out

    def check(self) -> dict[tuple[str, int, int, int], bytes]:
        released = self.released()
        conflicts = {
            k: sorted(v)
            for k, v in released.items()
            if len({sig for _, sig in v}) > 1 or len({sb for sb, _ in v}) > 1
        }
        assert not conflicts, f"conflicting signatures released for one HRS: {conflicts}"
        return {k: next(iter(v))[0] for k, v in released.items()}


class Cluster:
    """``n`` raftnode processes on 127.0.0.1, optionally with a proxy on every link.

    Node ids are 1..n (raft-rs reserves 0).  With ``proxies=True`` node ``i`` dials node
    ``j`` through ``proxy[(i, j)]`` (each member sends on its own outbound connection),
    so :meth:`isolate` cuts both directions.  ``proxies`` may also be a proxy class with
    :class:`~tests.support.proxy.Proxy`'s interface (``tests.support.frameproxy.FrameProxy``).
    ``nofile``: RLIMIT_NOFILE per node id (descriptor pressure).  ``faults=True``: node
    ``i`` watches ``base/faults/node<i>/`` (see :func:`_install_faults`; :meth:`fault`).
    """

    def __init__(
        self,
        base: Path,
        n: int,
        *,
        proxies: bool | type = False,
        store: dict[str, Any] | None = None,
        secret: bytes = b"nebula-test-cluster-secret-0123",
        loop: str = "uvloop",
        initial: dict[str, Any] | None = None,
        nofile: dict[int, int] | None = None,
        faults: bool = False,
    ) -> None:
        from tests.support.ports import free_ports
        from tests.support.proxy import Proxy

        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.n = n
        self.secret = secret
        self.loop = loop
        self.store = {
            "election_timeout_min": 0.3,
            "election_timeout_max": 0.6,
            "connection_retry": 0.1,
            **(store or {}),
        }
        self.initial = initial
        self.nofile = dict(nofile or {})
        self.faults_dir: Path | None = base / "faults" if faults else None
        self.ids = list(range(1, n + 1))
        self.ports = dict(zip(self.ids, free_ports(n), strict=True))
        self.proxies: dict[tuple[int, int], Any] = {}
        proxy_cls = proxies if isinstance(proxies, type) else Proxy
        if proxies:
            pp = free_ports(n * (n - 1))
            k = 0
            for i in self.ids:
                for j in self.ids:
                    if i != j:
                        self.proxies[(i, j)] = proxy_cls(pp[k], self.ports[j]).start()
                        k += 1
        self.nodes: dict[int, NodeProcess] = {}
        self.retired: list[NodeProcess] = []

    def peers_of(self, i: int, members: list[int] | None = None) -> dict[str, str]:
        out = {}
        for j in self.ids if members is None else members:
            if j == i or (i, j) not in self.proxies:
                out[str(j)] = f"127.0.0.1:{self.ports[j]}"
            else:
                out[str(j)] = f"127.0.0.1:{self.proxies[(i, j)].listen_port}"
        return out

    def config(
        self, i: int, members: list[int] | None = None, store: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        cfg = {
            "node_id": i,
            "bind": f"127.0.0.1:{self.ports[i]}",
            "peers": self.peers_of(i, members),
            "data": str(self.base / f"node{i}"),
            "secret": self.secret.hex(),
            "loop": self.loop,
            "store": {**self.store, **(store or {})},
            "initial": self.initial,
        }
        if self.faults_dir is not None:
            cfg["faults"] = str(self.faults_dir / f"node{i}")
        return cfg

    def start(
        self,
        i: int | None = None,
        wait: bool = True,
        members: list[int] | None = None,
        store: dict[str, Any] | None = None,
    ) -> None:
        """Start node ``i`` (or all); ``members`` limits the peers it is configured with;
        ``store`` adds RaftStore keyword arguments for this start (``join=True``)."""
        ids = (self.ids if members is None else members) if i is None else [i]
        for k in ids:
            if k in self.nodes:
                self.retired.append(self.nodes.pop(k))
            self.nodes[k] = NodeProcess(
                self.config(k, members, store), self.base / f"node{k}.log", self.nofile.get(k)
            )
        if wait:
            for k in ids:
                self.nodes[k].wait_ready()

    def live(self) -> list[NodeProcess]:
        return [p for p in self.nodes.values() if p.alive and not p.stopped]

    def statuses(self, timeout: float = 1.0) -> dict[int, dict[str, Any]]:
        out = {}
        for p in self.live():
            with contextlib.suppress(TimeoutError, NodeDead):
                out[p.node_id] = p.status(timeout)
        return out

    def wait_leader(
        self, timeout: float = 10.0, exclude: set[int] | frozenset[int] = frozenset()
    ) -> NodeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for nid, st in self.statuses().items():
                if st["authoritative"] and nid not in exclude:
                    return self.nodes[nid]
            time.sleep(0.05)
        raise TimeoutError(f"no authoritative leader within {timeout}s")

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def isolate(self, i: int, mode: str = "cut") -> None:
        for (a, b), px in self.proxies.items():
            if i in (a, b):
                px.blackhole() if mode == "blackhole" else px.cut()

    def heal(self) -> None:
        for px in self.proxies.values():
            px.heal()

    def fault(self, i: int, name: str, on: bool = True) -> None:
        """Switch fault ``name`` (``fdatasync_eio``) of node ``i`` on or off."""
        if self.faults_dir is None:
            raise RuntimeError("cluster made without faults=True")
        path = self.faults_dir / f"node{i}" / name
        if on:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("1")
        else:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for p in [*self.nodes.values(), *self.retired]:
            p.close()
        for px in self.proxies.values():
            px.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
