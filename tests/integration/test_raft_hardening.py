"""The Raft port refuses oversized frames before buffering them (nebula.state.raft).

pysyncobj announces every frame with an int32 length and buffers that many bytes
before anything is authenticated.  These tests play an attacker without the cluster
secret against real node processes: announce a huge (or negative) length, stream
megabytes behind it, and check that the node dropped the connection at once, that
its memory did not follow, and that the cluster kept committing.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

import pytest

from nebula.state.raft import MAX_FRAME, MAX_FRAME_UNAUTHENTICATED
from tests.support.raftnode import Cluster, NodeProcess

STREAM = 48 << 20  # what the attacker tries to push behind its header
CHUNK = 1 << 16


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def attack(
    port: int, header: bytes, total: int = STREAM, timeout: float = 10.0
) -> tuple[int, float]:
    """Send ``header`` then up to ``total`` bytes; returns (bytes sent, seconds) until
    the node closed the connection (or ``total`` was sent)."""
    sent = 0
    chunk = b"\xa5" * CHUNK
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(header)
        try:
            while sent < total:
                sent += s.send(chunk)
                if time.monotonic() - t0 > timeout:
                    break
            # Everything went out: the node must still close the connection.
            s.settimeout(max(0.1, timeout - (time.monotonic() - t0)))
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while s.recv(CHUNK):
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent, time.monotonic() - t0


def commit_ok(leader: NodeProcess, h: int) -> None:
    res = leader.commit(h, b"block-%d" % h)
    assert res.get("verdict") == "ACCEPT", res


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path / "c", 3)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.mark.parametrize(
    "length",
    [(1 << 31) - 1, MAX_FRAME + 1, MAX_FRAME_UNAUTHENTICATED + 1, -1, -(1 << 31)],
    ids=["2GiB", "max+1", "unauthenticated-max+1", "minus-one", "int32-min"],
)
def test_an_oversized_frame_drops_the_connection_without_buffering(
    cluster: Cluster, length: int
) -> None:
    leader = cluster.wait_leader()
    commit_ok(leader, 1)
    follower = next(p for p in cluster.live() if p is not leader)
    for target in (leader, follower):
        before = rss_kib(target.proc.pid)
        sent, took = attack(cluster.ports[target.node_id], struct.pack("i", length))
        grown = rss_kib(target.proc.pid) - before
        # Only socket buffers (kernel side) can hold what was sent before the close.
        assert sent < 8 << 20, f"node {target.node_id} accepted {sent} bytes behind {length}"
        assert took < 5.0, f"node {target.node_id} took {took:.2f}s to drop the connection"
        assert grown < 16 << 10, f"node {target.node_id} RSS grew by {grown} KiB"
        assert target.alive
    for h in range(2, 12):
        commit_ok(cluster.wait_leader(), h)


def test_a_frame_under_the_limit_still_fails_authentication(cluster: Cluster) -> None:
    """A small frame of garbage is read whole, fails decryption and drops the link."""
    leader = cluster.wait_leader()
    body = b"\x00" * 4096
    sent, took = attack(cluster.ports[leader.node_id], struct.pack("i", len(body)) + body, total=0)
    assert took < 5.0
    commit_ok(cluster.wait_leader(), 1)


def test_streaming_many_valid_sized_frames_is_cut_at_the_first(cluster: Cluster) -> None:
    """Frames are parsed as they complete: the first garbage frame ends the link,
    whatever follows it."""
    leader = cluster.wait_leader()
    before = rss_kib(leader.proc.pid)
    frame = struct.pack("i", MAX_FRAME_UNAUTHENTICATED) + b"\x5a" * MAX_FRAME_UNAUTHENTICATED
    sent, took = attack(cluster.ports[leader.node_id], frame * 2)
    assert sent < 8 << 20 and took < 5.0
    assert rss_kib(leader.proc.pid) - before < 16 << 10
    commit_ok(cluster.wait_leader(), 1)


class _NullPoller:
    def subscribe(self, descr: int, callback: object, mask: int) -> None:
        pass

    def unsubscribe(self, descr: int) -> None:
        pass


@pytest.mark.parametrize("authenticated", [False, True])
def test_the_bound_depends_on_authentication(authenticated: bool) -> None:
    """In-process: after the peer's first message decrypted, frames up to MAX_FRAME
    are buffered (an AppendEntries batch may exceed 64 KiB); above it, dropped."""
    from pysyncobj.poller import POLL_EVENT_TYPE
    from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

    from nebula.state.raft import _bound

    limit = MAX_FRAME if authenticated else MAX_FRAME_UNAUTHENTICATED
    for length, kept in ((limit, True), (limit + 1, False)):
        a, b = socket.socketpair()
        try:
            a.setblocking(False)
            conn = TcpConnection(_NullPoller(), socket=a, timeout=10.0)
            _bound(conn)
            if authenticated:
                conn.sendRandKey = b"k" * 32
            received = []
            conn.setOnMessageReceivedCallback(received.append)
            b.sendall(struct.pack("i", length) + b"\x00" * 1000)
            conn._TcpConnection__processConnection(a.fileno(), POLL_EVENT_TYPE.READ)  # type: ignore[attr-defined]
            assert (conn.state == CONNECTION_STATE.CONNECTED) is kept, (length, conn.state)
            assert not received
        finally:
            a.close()
            b.close()


def test_frames_are_uncompressed_and_versioned() -> None:
    """NB2 tokens carry the bare pickle; an NB1 (zlib) token of an older node is refused."""
    import pickle
    import zlib

    from nebula.state.raft import _TransportCipher

    secret = b"nebula-test-cluster-secret-0123"
    a, b = _TransportCipher(secret), _TransportCipher(secret)
    msg = {"type": "append_entries", "entries": [(b"\x00" * 200, 7, 2)]}
    token = a.encrypt_at_time(pickle.dumps(msg, 5), 1)
    assert token[:3] == b"NB2"
    assert pickle.loads(b.decrypt(token)) == msg
    old = b"NB1" + a.encrypt_at_time(zlib.compress(pickle.dumps(msg, 2), 3), 2)[3:]
    with pytest.raises(ValueError, match="mixed versions"):
        b.decrypt(old)
