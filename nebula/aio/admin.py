"""The local admin channel: a 0600 Unix socket next to the node's state.

`nebula status`, `nebula leader transfer`, `nebula state export|import` and
`nebula cluster add|remove` talk to a running node through it: one JSON request
per connection, one JSON response.  Only the account that runs Nebula (and root)
can connect; nothing on it ever returns key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nebula.config import LoadedConfig
from nebula.errors import NebulaError

log = logging.getLogger("nebula.admin")

_MAX_PATH = 100
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def socket_path(cfg: LoadedConfig) -> Path:
    """Where a node's admin socket lives (derived from its config alone)."""
    raw = cfg.raw
    if raw.persist == "raft" and raw.raft is not None:
        base = cfg.resolve(raw.raft.data_path)
        assert base is not None
        p = base / "admin.sock"
    else:
        state = cfg.resolve(raw.state_path)
        assert state is not None
        p = state.with_name(state.name + ".admin.sock")
    p = Path(os.path.abspath(p))
    if len(str(p)) > _MAX_PATH:  # AF_UNIX paths are limited to ~107 bytes
        digest = hashlib.sha256(str(p).encode()).hexdigest()[:16]
        p = Path("/tmp") / f"nebula-admin-{digest}.sock"
    return p


class AdminServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("expected an object")
                handler = self.handlers.get(str(req.get("cmd")))
                if handler is None:
                    raise NebulaError(f"unknown admin command {req.get('cmd')!r}")
                result = await handler(req)
                out: dict[str, Any] = {"ok": True, "result": result}
            except (NebulaError, ValueError, TimeoutError) as e:
                out = {"ok": False, "error": str(e) or type(e).__name__}
            writer.write(json.dumps(out, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one admin command (blocking); raises NebulaError with the node's message."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NebulaError(f"node not running (no admin socket at {path}): {e}") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    try:
        out = json.loads(buf)
    except ValueError:
        raise NebulaError(f"malformed admin response from {path}") from None
    if not out.get("ok"):
        raise NebulaError(out.get("error") or "admin command failed")
    return out.get("result")
