"""What both Vault backends share: settings, the token, TLS, and the HTTP clients.

Two HTTP clients, on purpose:

* **hvac** (requests underneath) for the synchronous work done once: reading the public
  key and the start-up self-test when the backend is built, and the ``nebula vault``
  key-management commands;
* :class:`AsyncVaultHTTP`, a small keep-alive HTTP/1.1 client on asyncio streams, for
  the signing hot path. It runs on the event loop itself (no thread hop, no blocked
  executor thread after a timeout), and ``asyncio.timeout`` bounds the whole request —
  connect, TLS handshake, write, read — so the signing lock is never held past the
  configured timeout, whatever the server does.

Every failure becomes a :class:`~nebula.errors.BackendError` whose message says what
was attempted, against which address, and why it failed; configuration problems are
:class:`~nebula.errors.ConfigError`; an unreadable or over-permissive token file is a
:class:`~nebula.errors.KeyFileError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from nebula.aio.lookup import Lookup
from nebula.crypto.keys import canonical_key_type, read_private_file
from nebula.errors import BackendError, ConfigError, NebulaError

log = logging.getLogger("nebula.vault")

__all__ = [
    "AsyncVaultHTTP",
    "VaultSettings",
    "check_key_type_for_version",
    "hvac_call",
    "hvac_client",
    "load_token",
    "parse_vault_signature",
    "ssl_context",
    "vault_error_text",
    "warn_if_token_expires",
]

_MAX_BODY = 1 << 20
_MOUNT_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: safe in an HTTP header

# Key types each CometBFT line accepts in PubKeyResponse (protocol.md §2.4).
_BLS_VERSIONS = frozenset({"v0_39", "v0_40", "v1_0", "v1"})


@dataclass(frozen=True, slots=True)
class VaultSettings:
    """Where and how to reach one key in Vault / OpenBao."""

    address: str
    mount: str
    key_name: str
    token: str = field(repr=False)
    ca_cert: str | None = None
    insecure_skip_verify: bool = False
    timeout: float = 1.0
    #: where ``token`` was read from: read again when Vault refuses it (HTTP 403), so a
    #: token renewed in the file (Vault Agent's sink) is taken without a restart
    token_path: str | None = None
    #: filled in from ``address``
    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 8200

    @classmethod
    def create(
        cls,
        address: str,
        mount: str,
        key_name: str,
        token: str,
        *,
        ca_cert: str | None = None,
        insecure_skip_verify: bool = False,
        timeout: float = 1.0,
        where: str = "vault",
        max_timeout: float = 4.0,
        token_path: str | None = None,
    ) -> VaultSettings:
        """Validated settings; every problem is a ConfigError naming ``where``.

        ``timeout`` must stay below ``max_timeout``: 4 s for signing (CometBFT gives up
        after 5 s); key management (``nebula vault``) allows more.
        """
        scheme, host, port = _parse_address(address, where)
        mount = mount.strip("/")
        if not _MOUNT_RE.match(mount) or ".." in mount.split("/"):
            raise ConfigError(f"{where}: invalid mount path {mount!r}")
        if not _KEY_NAME_RE.match(key_name):
            raise ConfigError(
                f"{where}: invalid key_name {key_name!r} (letters, digits, '_', '-', '.')"
            )
        if not _TOKEN_RE.match(token):
            raise ConfigError(f"{where}: the Vault token is empty or has invalid characters")
        if not 0 < timeout < max_timeout:
            raise ConfigError(
                f"{where}: timeout must be in (0, {max_timeout:g}) seconds, got {timeout}"
            )
        if ca_cert is not None and scheme != "https":
            raise ConfigError(f"{where}: ca_cert is set but the address {address!r} is not https")
        if insecure_skip_verify and scheme != "https":
            raise ConfigError(
                f"{where}: insecure_skip_verify is set but the address {address!r} is not https"
            )
        if ca_cert is not None and not os.path.isfile(ca_cert):
            raise ConfigError(f"{where}: ca_cert {ca_cert} does not exist")
        if scheme == "http" and not _is_loopback(host):
            log.warning(
                "%s: %s is plain http to a non-loopback host: the Vault token and every "
                "message travel unencrypted",
                where,
                address,
            )
        return cls(
            address=f"{scheme}://{_host_port(host, port)}",
            mount=mount,
            key_name=key_name,
            token=token,
            ca_cert=ca_cert,
            insecure_skip_verify=insecure_skip_verify,
            timeout=float(timeout),
            token_path=token_path,
            scheme=scheme,
            host=host,
            port=port,
        )

    def path(self, *parts: str) -> str:
        """``/v1/<mount>/<parts...>`` with each part URL-quoted."""
        quoted = "/".join(urllib.parse.quote(p, safe="") for p in parts)
        return f"/v1/{urllib.parse.quote(self.mount, safe='/')}/{quoted}"


def _parse_address(address: str, where: str) -> tuple[str, str, int]:
    try:
        u = urllib.parse.urlsplit(address.strip())
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid address {address!r}: {exc}") from None
    if u.scheme not in ("http", "https"):
        raise ConfigError(f"{where}: address must be http:// or https://, got {address!r}")
    if not u.hostname:
        raise ConfigError(f"{where}: address {address!r} has no host")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ConfigError(
            f"{where}: address {address!r} must be scheme://host[:port] only (no path, "
            "query or credentials)"
        )
    return u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------
# The token and the config
# ---------------------------------------------------------------------------------------


def load_token(token_path: Path | str | None, token_env: str | None, *, where: str) -> str:
    """The Vault token: from ``token_path`` if set (0600 required), else ``$token_env``.

    A configured token file that is missing is an error, never a silent fallback to the
    environment.
    """
    if token_path:
        raw = read_private_file(token_path, what="Vault token file")
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: Vault token file {token_path} is not ASCII") from None
        if not token:
            raise ConfigError(f"{where}: Vault token file {token_path} is empty")
        return token
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ConfigError(
                f"{where}: the environment variable {token_env} (token_env) is unset or empty"
            )
        return token
    raise ConfigError(f"{where}: set token_path or token_env")


def check_key_type_for_version(key_type: str, version: str, where: str) -> str:
    """The canonical key type, if the configured CometBFT line accepts it (§2.4)."""
    try:
        kt = canonical_key_type(key_type)
    except ConfigError:
        raise BackendError(f"{where}: Vault reports an unknown key type {key_type!r}") from None
    v = version.strip().lower().replace(".", "_")
    v = v if v.startswith("v") else "v" + v
    if kt == "bls12381" and v not in _BLS_VERSIONS:
        raise BackendError(
            f"{where}: the key is bls12381 but CometBFT {version} has no BLS12-381 "
            "consensus keys (v0.39, v0.40 and v1.0 have)"
        )
    return kt


# ---------------------------------------------------------------------------------------
# TLS and hvac
# ---------------------------------------------------------------------------------------


def ssl_context(s: VaultSettings) -> ssl.SSLContext | None:
    """The client TLS context for ``s`` (None for http)."""
    if s.scheme != "https":
        return None
    try:
        ctx = ssl.create_default_context(cafile=s.ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load ca_cert {s.ca_cert}: {exc}") from None
    if s.insecure_skip_verify:
        log.warning(
            "insecure_skip_verify = true: the Vault server's TLS certificate is NOT checked"
        )
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def hvac_client(s: VaultSettings, *, timeout: float | None = None) -> Any:
    """An hvac client for ``s`` (management and start-up calls)."""
    import hvac

    verify: bool | str = True
    if s.scheme == "https":
        verify = False if s.insecure_skip_verify else (s.ca_cert or True)
    if verify is False:
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    # No redirects, as on the signing path: hvac would send X-Vault-Token to whatever host
    # the Location names, and a start against a standby would pass its self-test, then
    # refuse every signature (found in review).  hvac_call refuses the 3xx answer.
    return hvac.Client(
        url=s.address,
        token=s.token,
        verify=verify,
        timeout=timeout or s.timeout,
        allow_redirects=False,
    )


T = TypeVar("T")


def hvac_call(what: str, s: VaultSettings, fn: Callable[[], T]) -> T:
    """Run one hvac call; any failure becomes a BackendError naming ``what``."""
    import hvac.exceptions
    import requests

    try:
        out = fn()
    except NebulaError:
        raise
    except hvac.exceptions.Forbidden as exc:
        raise BackendError(
            f"{what}: Vault at {s.address} denied the request (token revoked, expired, or "
            f"without the needed policy): {_hvac_errors(exc)}"
        ) from None
    except hvac.exceptions.InvalidPath as exc:
        raise BackendError(
            f"{what}: nothing at that path on {s.address} (mount {s.mount!r}, key "
            f"{s.key_name!r}): {_hvac_errors(exc)}"
        ) from None
    except hvac.exceptions.VaultError as exc:
        raise BackendError(f"{what}: Vault at {s.address} answered: {_hvac_errors(exc)}") from None
    except requests.exceptions.SSLError as exc:
        raise BackendError(f"{what}: TLS with {s.address} failed: {exc}") from None
    except requests.exceptions.Timeout:
        raise BackendError(
            f"{what}: Vault at {s.address} did not answer within {s.timeout} s"
        ) from None
    except requests.exceptions.ConnectionError as exc:
        raise BackendError(f"{what}: cannot reach Vault at {s.address}: {_root(exc)}") from None
    except requests.exceptions.RequestException as exc:
        raise BackendError(f"{what}: request to {s.address} failed: {exc}") from None
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise BackendError(f"{what}: unexpected answer from {s.address}: {exc!r}") from None
    if isinstance(out, requests.Response) and 300 <= out.status_code < 400:
        # (hvac raises for 4xx and 5xx only, and hands back a 3xx it did not follow)
        text = vault_error_text(out.status_code, out.content[:_MAX_BODY])
        raise BackendError(f"{what}: Vault at {s.address} answered {text}")
    return out


def warn_if_token_expires(s: VaultSettings, client: Any) -> int | None:
    """Log a warning if the token has a TTL (signing stops when it expires); its TTL.

    Best effort: a token that may not look itself up, or a server without the token
    endpoint, is not an error here (the self-test signature is the real check).
    """
    try:
        data = client.auth.token.lookup_self()["data"]
        ttl = int(data.get("ttl") or 0)
    except Exception:
        return None
    if ttl > 0:
        renew = "renewable" if data.get("renewable") else "NOT renewable"
        log.warning(
            "the Vault token for %s expires in %d s (%s); Nebula does not renew it, and "
            "signing stops when it expires: use a periodic token renewed by Vault Agent, "
            "or a token without TTL",
            s.address,
            ttl,
            renew,
        )
    return ttl


def _hvac_errors(exc: Any) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)
    return str(exc).split(", on ")[0] or type(exc).__name__


def _root(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------


class _Errors(msgspec.Struct):
    errors: list[Any] = msgspec.field(default_factory=list)


_errors_decoder = msgspec.json.Decoder(_Errors)


def vault_error_text(status: int, body: bytes) -> str:
    """``HTTP <status>: <Vault's errors>`` for a non-2xx answer."""
    try:
        errors = _errors_decoder.decode(body).errors
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        errors = []  # (RecursionError: nested past msgspec's depth limit)
    detail = "; ".join(str(e) for e in errors) if errors else body[:200].decode("utf-8", "replace")
    hint = ""
    if status == 403:
        hint = " (token revoked, expired, or without the needed policy)"
    elif 300 <= status < 400:
        hint = (
            " (a redirect, as a standby node answers: Nebula does not follow redirects; "
            "set address to the active node, or to a load balancer that forwards to it)"
        )
    return f"HTTP {status}{hint}: {detail or 'no details'}"


def parse_vault_signature(text: str, size: int, where: str) -> tuple[int, bytes]:
    """``vault:v<N>:<base64>`` -> (N, signature bytes of exactly ``size``)."""
    import binascii

    prefix, sep, rest = text.partition(":")
    version, sep2, b64 = rest.partition(":")
    if prefix != "vault" or not sep or not sep2 or not version.startswith("v"):
        raise BackendError(f"{where}: signature {text[:40]!r} is not 'vault:vN:<base64>'")
    try:
        n = int(version[1:])
        sig = binascii.a2b_base64(b64, strict_mode=True)
    except (ValueError, binascii.Error):
        raise BackendError(f"{where}: signature {text[:40]!r} is malformed") from None
    if len(sig) != size:
        raise BackendError(f"{where}: the signature is {len(sig)} bytes, expected {size}")
    return n, sig


# ---------------------------------------------------------------------------------------
# The async HTTP/1.1 client of the hot path
# ---------------------------------------------------------------------------------------

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Retry(Exception):
    """A reused keep-alive connection was found dead before any answer: try a new one."""


class AsyncVaultHTTP:
    """Keep-alive HTTP/1.1 to one Vault server, on the running event loop.

    ``request`` is bounded as a whole by ``timeout``; on any failure or cancellation
    the connection in use is dropped (never reused half-read). A reused idle connection
    that the server closed in the meantime is retried once on a fresh one, within the
    same deadline (safe here: a consensus signature is deterministic).
    """

    __slots__ = ("_closed", "_head", "_idle", "_lookup", "_settings", "_ssl", "_token")

    def __init__(self, settings: VaultSettings, ssl_ctx: ssl.SSLContext | None) -> None:
        self._settings = settings
        self._ssl = ssl_ctx
        self._idle: list[_Conn] = []
        self._closed = False
        self._token = ""
        self._head = b""
        # One name lookup in flight (nebula.aio.lookup): a hanging DNS cannot take the
        # loop's resolver threads from other chains' connections.
        self._lookup = Lookup(settings.host, settings.port)
        self._use_token(settings.token)

    def _use_token(self, token: str) -> None:
        s = self._settings
        self._token = token
        self._head = (
            f"Host: {_host_port(s.host, s.port)}\r\n"
            f"X-Vault-Token: {token}\r\n"
            "X-Vault-Request: true\r\n"
            "User-Agent: nebula-signer\r\n"
        ).encode("ascii")

    def _token_renewed(self) -> bool:
        """After a 403: True if ``token_path`` now holds another valid token (taken)."""
        path = self._settings.token_path
        if not path:
            return False
        try:
            token = load_token(path, None, where="Vault token file")
        except NebulaError as exc:
            log.warning("cannot read the Vault token again from %s: %s", path, exc)
            return False
        if token == self._token or not _TOKEN_RE.match(token):
            return False
        log.info("Vault refused the token; using the new one in %s", path)
        self._use_token(token)
        return True

    async def request(
        self, method: str, path: str, body: bytes | None = None, *, what: str
    ) -> tuple[int, bytes]:
        """(status, body); BackendError on a timeout or any transport failure."""
        s = self._settings
        if self._closed:
            raise BackendError(f"{what}: the Vault client is closed")

        def build() -> bytes:
            req = b"%s %s HTTP/1.1\r\n%s" % (method.encode(), path.encode(), self._head)
            if body is None:
                return req + b"\r\n"
            return req + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                len(body),
                body,
            )

        try:
            async with asyncio.timeout(s.timeout):
                try:
                    status, data = await self._exchange(build(), method, reuse=True)
                except _Retry:
                    status, data = await self._exchange(build(), method, reuse=False)
                if status == 403 and self._token_renewed():
                    status, data = await self._exchange(build(), method, reuse=False)
                return status, data
        except TimeoutError:
            raise BackendError(
                f"{what}: Vault at {s.address} did not answer within {s.timeout} s"
            ) from None
        except BackendError as exc:
            raise BackendError(f"{what}: {s.address}: {exc}") from None
        except ssl.SSLError as exc:
            raise BackendError(f"{what}: TLS with {s.address} failed: {exc}") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise BackendError(
                f"{what}: connection to Vault at {s.address} failed: {_describe(exc)}"
            ) from None
        except ValueError as exc:  # StreamReader.readline: a line past the buffer limit
            raise BackendError(f"{what}: {s.address}: malformed HTTP answer: {exc}") from None

    async def _exchange(self, req: bytes, method: str, *, reuse: bool) -> tuple[int, bytes]:
        conn: _Conn | None = None
        reused = False
        if reuse:
            while self._idle:
                r, w = self._idle.pop()
                if r.at_eof() or w.is_closing() or getattr(r, "_buffer", None):
                    # Closed, or bytes nobody asked for: never read them as an answer.
                    w.transport.abort()
                    continue
                conn, reused = (r, w), True
                break
        if conn is None:
            s = self._settings
            host = await self._lookup.address()
            conn = await asyncio.open_connection(
                host,
                s.port,
                ssl=self._ssl,
                server_hostname=s.host if self._ssl is not None else None,
                limit=_MAX_BODY,
            )
        reader, writer = conn
        started = False
        try:
            writer.write(req)
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            started = True
            status, body, keep = await _read_response(reader, line, method)
        except (OSError, asyncio.IncompleteReadError) as exc:
            writer.transport.abort()
            if reused and not started:
                raise _Retry from exc
            raise
        except BaseException:  # timeout, cancellation, a malformed answer
            writer.transport.abort()
            raise
        if keep and not self._closed:
            self._idle.append(conn)
        else:
            writer.transport.abort()
        return status, body

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, w in idle:
            w.close()
        for _, w in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 0.5)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the server closed the connection"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


#: Interim (1xx) answers skipped before the final one, at most.
_MAX_INTERIM = 8


async def _read_response(
    reader: asyncio.StreamReader, status_line: bytes, method: str
) -> tuple[int, bytes, bool]:
    """Parse one HTTP/1.x answer after its status line: (status, body, keep-alive).

    Interim answers (``100 Continue``, ``103 Early Hints``, from Vault or a proxy before
    it) are read past: returned as the answer, they left the real one on the connection
    for the next request to read."""
    for _ in range(_MAX_INTERIM):
        status, body, keep = await _read_one(reader, status_line, method)
        if not 100 <= status < 200:
            return status, body, keep
        if status == 101:
            raise BackendError("Vault's answer switches protocols (HTTP 101)")
        status_line = await reader.readline()
        if not status_line:
            raise asyncio.IncompleteReadError(b"", None)
    raise BackendError(f"more than {_MAX_INTERIM} interim (1xx) answers from Vault")


async def _read_one(
    reader: asyncio.StreamReader, status_line: bytes, method: str
) -> tuple[int, bytes, bool]:
    """One answer (final or interim) after its status line: (status, body, keep-alive)."""
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise BackendError(f"not an HTTP answer: {status_line[:60]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise BackendError(f"bad HTTP status line {status_line[:60]!r}") from None
    keep = parts[0] == b"HTTP/1.1"
    length = -1
    chunked = False
    n_headers = 0
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        if line in (b"\r\n", b"\n"):
            break
        n_headers += 1
        if n_headers > 100:
            raise BackendError("too many HTTP headers in Vault's answer")
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise BackendError(f"bad Content-Length {value[:40]!r}") from None
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            v = value.lower()
            if b"close" in v:
                keep = False
            elif b"keep-alive" in v:
                keep = True
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, b"", keep
    if chunked:
        return status, await _read_chunked(reader), keep
    if length >= 0:
        if length > _MAX_BODY:
            raise BackendError(f"Vault's answer is too large ({length} bytes)")
        return status, await reader.readexactly(length), keep
    body = bytearray()  # close-delimited: everything up to the end of the stream
    while chunk := await reader.read(_MAX_BODY + 1 - len(body)):
        body += chunk
        if len(body) > _MAX_BODY:
            raise BackendError("Vault's answer is too large")
    return status, bytes(body), False


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        digits = line.split(b";", 1)[0].strip()
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):  # int() takes -1, 0x5, 1_0
            raise BackendError(f"bad chunk size {line[:40]!r}")
        size = int(digits, 16)
        if size == 0:
            while True:  # trailers up to the empty line
                t = await reader.readline()
                if not t.endswith(b"\n"):
                    raise asyncio.IncompleteReadError(t, None)
                if t in (b"\r\n", b"\n"):
                    return bytes(out)
        if len(out) + size > _MAX_BODY:
            raise BackendError("Vault's answer is too large")
        out += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise BackendError("bad chunk terminator in Vault's answer")
