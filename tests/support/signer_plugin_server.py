"""A contract server for the Rust Nebula's Vault signer plugin API, with real keys.

The plugin itself (a Vault plugin binary) cannot be obtained here, so the tests run this
server instead. It implements exactly the API the backend relies on, signing with the
real key code of :mod:`nebula.crypto.keys`:

* ``GET /v1/<mount>/keys/<key>?compressed=true`` -> ``{"data": {"key_type": ...,
  "public_key": "<hex>"}}`` (secp256k1: 33 bytes with ``compressed=true``, 65 without;
  ed25519 32 bytes; bls12381 the 96-byte uncompressed G1 point);
* ``POST /v1/<mount>/keys/<key>/sign`` with ``{"payload": "<base64>"}`` (and ``"dst"``
  for BLS keys) -> ``{"data": {"signature": "vault:v1:<base64>"}}``;
* ``X-Vault-Token`` is checked on every request; errors are Vault-style
  ``{"errors": [...]}`` with 400 / 403 / 404 / 405.

Fault modes for tests (``server.mode``): ``"ok"``; ``"bad_signature"`` (a valid-looking
signature with one bit flipped); ``"lie_type"`` (``key_type`` of another type);
``"slow"`` (sleeps ``server.delay`` seconds before answering a sign request).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import coincurve

from nebula.crypto.keys import BLS_DEFAULT_DST, SECP256K1_N, Bls12381Key, SigningKey

_OTHER_TYPE = {"ed25519": "secp256k1", "secp256k1": "ed25519", "bls12381": "ed25519"}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away, or stop() cutting connections
        super().handle_error(request, client_address)


class SignerPluginServer:
    """A threaded HTTP server on 127.0.0.1 serving one mount of plugin keys."""

    def __init__(self, token: str, mount: str = "nebula") -> None:
        self.token = token
        self.mount = mount.strip("/")
        self.keys: dict[str, SigningKey] = {}
        self.mode = "ok"  # or "bad_signature", "slow", "high_s"
        self.delay = 0.0
        self.sign_requests = 0
        self.last_dst: bytes | None = None
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    @property
    def address(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add_key(self, name: str, key: SigningKey) -> None:
        self.keys[name] = key

    # ---- the API -----------------------------------------------------------------------

    def public_key_of(self, key: SigningKey, compressed: bool) -> bytes:
        if key.key_type == "secp256k1" and not compressed:
            return coincurve.PublicKey(key.public_key).format(compressed=False)
        return key.public_key

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], token: str | None, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        if token != self.token:
            return 403, {"errors": ["permission denied"]}
        prefix = f"/v1/{self.mount}/keys/"
        if not path.startswith(prefix):
            return 404, {"errors": [f"no handler for route {path!r}"]}
        rest = path[len(prefix) :].split("/")
        name = urllib.parse.unquote(rest[0])
        key = self.keys.get(name)
        if len(rest) == 1 and rest[0]:
            if method != "GET":
                return 405, {"errors": ["unsupported operation"]}
            if key is None:
                return 404, {"errors": [f"key {name!r} not found"]}
            compressed = query.get("compressed", ["false"])[0].lower() == "true"
            key_type = key.key_type
            if self.mode == "lie_type":
                key_type = _OTHER_TYPE[key_type]
            return 200, {
                "data": {
                    "key_type": key_type,
                    "public_key": self.public_key_of(key, compressed).hex(),
                }
            }
        if len(rest) == 2 and rest[1] == "sign":
            if method != "POST":
                return 405, {"errors": ["unsupported operation"]}
            if key is None:
                return 404, {"errors": [f"key {name!r} not found"]}
            return self._sign(key, body)
        return 404, {"errors": [f"no handler for route {path!r}"]}

    def _sign(self, key: SigningKey, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            req = json.loads(body)
            payload = base64.b64decode(req["payload"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return 400, {"errors": ["payload must be base64"]}
        with self._lock:
            self.sign_requests += 1
        if self.mode == "slow" and self.delay > 0:
            time.sleep(self.delay)
        signer = key
        if isinstance(key, Bls12381Key):
            dst_text = req.get("dst")
            dst = dst_text.encode() if isinstance(dst_text, str) and dst_text else BLS_DEFAULT_DST
            self.last_dst = dst
            if dst != key.dst:
                signer = Bls12381Key(key.secret_bytes(), dst=dst)
        sig = bytearray(signer.sign(payload))
        if self.mode == "bad_signature":
            sig[7] ^= 0x01
        elif self.mode == "high_s" and len(sig) == 64 and signer.key_type == "secp256k1":
            s = int.from_bytes(sig[32:], "big")  # the other valid form: n - s (high)
            sig[32:] = (SECP256K1_N - s).to_bytes(32, "big")
        return 200, {"data": {"signature": "vault:v1:" + base64.b64encode(bytes(sig)).decode()}}

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> SignerPluginServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Vault

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._conns.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._conns.discard(self.connection)
                super().finish()

            def _serve(self) -> None:
                u = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, doc = server.handle(
                    self.command,
                    u.path,
                    urllib.parse.parse_qs(u.query),
                    self.headers.get("X-Vault-Token"),
                    body,
                )
                out = json.dumps(doc).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:  # the client gave up (a timeout test): not an error here
                    self.close_connection = True

            do_GET = _serve
            do_POST = _serve
            do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop like a dead server: no new connections, open ones cut."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> SignerPluginServer:
        return self.start() if self._httpd is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
