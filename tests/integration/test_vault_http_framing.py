"""The Vault transit backend's own HTTP client against answers whose framing the test
controls: what a real OpenBao never sends but a proxy in front of it, a standby node or
a broken server can (found in review).  The server here is a raw socket that plays
transit with one Ed25519 key - the one stand-in in these tests, because no real server
sends these answers on demand; the real OpenBao runs in tests/integration/test_vault.py.

* an interim ``103 Early Hints`` before the answer is read past, and the keep-alive
  connection stays in step (it used to answer every later request with the previous
  request's answer: refused as "does not verify", the chain never signed again);
* a negative chunk size and a header line past the buffer are refusals (BackendError),
  never another exception that ends the validator's connection;
* a close-delimited answer that arrives in pieces is read whole;
* a redirect (a standby node) is refused with a message that says what to do;
* JSON nested past the decoders' depth limit is a refusal, not a RecursionError.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nebula.backends._vault_common import VaultSettings
from nebula.backends.vault_signer_plugin import VaultSignerPluginBackend
from nebula.backends.vault_transit import VaultTransitBackend
from nebula.crypto.keys import generate
from nebula.errors import BackendError
from nebula.service import SigningService
from nebula.state.local import LocalStore
from nebula.types import SignVoteRequest, WireFamily
from tests.support.votes import vote

# frame(n, status, body) -> what to send for the n-th sign request: bytes to write, or
# a float (sleep that long), or None (close the connection).
Frame = Callable[[int, int, bytes], list[bytes | float | None]]


def _plain(n: int, status: int, body: bytes) -> list[bytes | float | None]:
    return [b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)]


class RawTransit:
    """Transit's sign endpoint with one key, answers framed by ``frame``."""

    def __init__(self) -> None:
        self.key = generate("ed25519")
        self.frame: Frame = _plain
        self.signs = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.sock.close()

    def backend(self) -> VaultTransitBackend:
        s = VaultSettings.create(self.address, "transit", "val", "tok", timeout=1.0)
        return VaultTransitBackend(s, self.key.public_key, 1)

    def plugin_backend(self) -> VaultSignerPluginBackend:
        s = VaultSettings.create(self.address, "nebula", "val", "tok", timeout=1.0)
        return VaultSignerPluginBackend(s, "ed25519", self.key.public_key)

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):  # the client aborts the connections it drops
            self._answer_each(c)

    def _answer_each(self, c: socket.socket) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    n = int(value)
            while len(buf) < n:
                buf += c.recv(65536)
            body, buf = buf[:n], buf[n:]
            doc = json.loads(body)
            msg = base64.b64decode(doc.get("input") or doc["payload"])  # transit | plugin
            sig = base64.b64encode(self.key.sign(msg)).decode()
            answer = json.dumps({"data": {"signature": f"vault:v1:{sig}"}}).encode()
            k, self.signs = self.signs, self.signs + 1
            for part in self.frame(k, 200, answer):
                if part is None:
                    return
                if isinstance(part, float):
                    time.sleep(part)
                else:
                    c.sendall(part)


@pytest.fixture
def server() -> RawTransit:
    s = RawTransit()
    yield s
    s.close()


def _sign_all(backend: VaultTransitBackend | VaultSignerPluginBackend, n: int) -> list[str]:
    async def go() -> list[str]:
        out = []
        for i in range(n):
            try:
                await backend.sign(b"msg-%d" % i)
                out.append("signed")
            except BackendError as e:
                out.append(str(e))
        await backend.close()
        return out

    return asyncio.run(go())


def test_an_interim_answer_is_read_past_and_the_connection_stays_in_step(server) -> None:
    def frame(n: int, status: int, body: bytes) -> list[bytes | float | None]:
        early = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        return [early, *_plain(n, status, body)] if n % 3 == 0 else _plain(n, status, body)

    server.frame = frame
    assert _sign_all(server.backend(), 7) == ["signed"] * 7


@pytest.mark.parametrize("size", [b"-1", b"0x5", b"1_0", b"+5", b""])
def test_a_bad_chunk_size_is_a_refusal(server, size: bytes) -> None:
    server.frame = lambda n, st, body: [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\n%s\r\n0\r\n\r\n" % (size, body)
    ]
    (got,) = _sign_all(server.backend(), 1)
    assert "bad chunk size" in got


def test_a_header_line_past_the_buffer_is_a_refusal(server) -> None:
    big = b"X-Big: " + b"a" * (1 << 21) + b"\r\n"
    server.frame = lambda n, st, body: [b"HTTP/1.1 200 OK\r\n" + big + b"\r\n"]
    (got,) = _sign_all(server.backend(), 1)
    assert "malformed HTTP answer" in got


def test_a_close_delimited_answer_in_pieces_is_read_whole(server) -> None:
    server.frame = lambda n, st, body: [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body[:20],
        0.05,
        body[20:],
        None,
    ]
    assert _sign_all(server.backend(), 3) == ["signed"] * 3


def test_a_redirect_is_refused_saying_what_to_do(server) -> None:
    server.frame = lambda n, st, body: [
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://active:8200/v1/x\r\n"
        b"Content-Length: 0\r\n\r\n"
    ]
    (got,) = _sign_all(server.backend(), 1)
    assert "HTTP 307" in got and "set address to the active node" in got


def test_a_malformed_answer_is_answered_as_a_refusal_by_the_service(server, tmp_path: Path) -> None:
    server.frame = lambda n, st, body: [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"
    ]
    svc = SigningService("c", WireFamily.V0_38, server.backend(), LocalStore(tmp_path / "s"))
    resp = asyncio.run(svc.handle(SignVoteRequest(vote(1), "c")))
    assert resp.error is not None and "bad chunk size" in resp.error.description
    assert resp.vote.signature == b"" and svc.store.last("c") is None


_DEEP = b"[" * 100_000 + b"]" * 100_000  # well under the 1 MiB body limit


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"data":{"signature":"vault:v1:AA==","x":%s}}' % _DEEP),
        (200, b'{"x":%s}' % _DEEP),
        (500, b'{"errors":%s}' % _DEEP),
    ],
    ids=["200-deep-data", "200-deep-top", "500-deep-errors"],
)
@pytest.mark.parametrize("kind", ["transit", "plugin"])
@pytest.mark.usefixtures("production_recursion_limit")
def test_a_deeply_nested_answer_is_a_refusal(server, tmp_path: Path, kind, status, body) -> None:
    """A JSON answer nested past msgspec's depth limit (a broken server, or a proxy in
    front of it) is a refusal like any other malformed answer: it used to raise
    RecursionError out of ``sign``, which ended the validator's connection with a
    traceback instead of answering it (found in review)."""
    server.frame = lambda n, st, _body: _plain(n, status, body)
    backend = server.backend() if kind == "transit" else server.plugin_backend()
    svc = SigningService("c", WireFamily.V0_38, backend, LocalStore(tmp_path / "s"))

    async def go() -> tuple[Any, Any]:
        refused = await svc.handle(SignVoteRequest(vote(1), "c"))
        server.frame = _plain  # and it signs once the server answers properly
        signed = await svc.handle(SignVoteRequest(vote(1), "c"))
        await backend.close()
        return refused, signed

    refused, signed = asyncio.run(go())
    assert refused.error is not None and "Vault" in refused.error.description
    assert refused.vote.signature == b""
    assert signed.error is None and signed.vote.signature


def test_a_hanging_name_lookup_is_shared_by_the_requests_behind_it(server) -> None:
    """A lookup that hangs (a DNS outage) holds one thread of the loop's resolver pool
    until it returns; a new lookup per timed-out request would soon hold them all, and
    other chains' new connections would wait behind them (found in review).  One lookup
    is in flight per backend; the requests behind it wait for that one."""
    port = int(server.address.rsplit(":", 1)[1])
    s = VaultSettings.create(f"http://vault.test:{port}", "transit", "val", "tok", timeout=0.1)
    backend = VaultTransitBackend(s, server.key.public_key, 1)
    lookups: list[str] = []

    async def go() -> list[str]:
        loop = asyncio.get_running_loop()

        async def slow_dns(host: str, port: int, **kw: object) -> list:
            lookups.append(host)
            if len(lookups) == 1:
                await asyncio.sleep(2.0)  # the outage: far longer than five 0.1 s timeouts
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

        loop.getaddrinfo = slow_dns  # type: ignore[method-assign]
        out = []
        for i in range(5):
            try:
                await backend.sign(b"m%d" % i)
                out.append("signed")
            except BackendError as e:
                out.append(str(e))
        assert lookups == ["vault.test"]  # five requests, one lookup
        t = backend._http._lookup._task  # the hanging lookup: wait until it answers
        assert t is not None
        await asyncio.wait_for(asyncio.shield(t), 5)
        await backend.sign(b"after")
        out.append("signed")
        await backend.close()
        return out

    out = asyncio.run(go())
    assert all("did not answer within 0.1 s" in e for e in out[:5]), out
    assert out[5] == "signed" and lookups == ["vault.test", "vault.test"]


@pytest.mark.usefixtures("production_recursion_limit")
def test_a_deeply_nested_answer_at_start_is_a_backend_error() -> None:
    """The start-up reads (hvac) too: a deeply nested key answer is a BackendError naming
    the server, not a RecursionError traceback (found in review)."""
    import http.server

    from nebula.backends.vault_signer_plugin import read_plugin_key
    from nebula.backends.vault_transit import read_transit_key

    deep = b'{"data":' + _DEEP + b"}"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(deep)))
            self.end_headers()
            self.wfile.write(deep)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = VaultSettings.create(f"http://127.0.0.1:{srv.server_port}", "m", "k", "t", timeout=2)
        for read in (read_plugin_key, read_transit_key):
            with pytest.raises(BackendError, match="unexpected answer from"):
                read(s)
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_redirect_at_start_is_refused_and_the_token_stays_here() -> None:
    """The start-up reads and self-test (hvac) refuse a redirect as the signing path does:
    hvac followed it, sending X-Vault-Token to whatever host the Location named (http
    included), and a signer pointed at a standby started healthy, then refused every
    signature with 'HTTP 307' (found in review)."""
    import http.server

    seen: list[str | None] = []

    class Active(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("X-Vault-Token"))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    active = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Active)
    target = f"http://127.0.0.1:{active.server_port}"

    class Standby(Active):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    standby = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Standby)
    for srv in (active, standby):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{standby.server_port}"
        s = VaultSettings.create(address, "m", "k", "the-token", timeout=2)
        for backend in (VaultTransitBackend, VaultSignerPluginBackend):
            with pytest.raises(BackendError, match=r"HTTP 307.*set address to the active node"):
                backend.connect(s)
        assert seen == []
    finally:
        for srv in (active, standby):
            srv.shutdown()
            srv.server_close()
