"""The local admin channel: a 0600 Unix socket in a 0700 directory of the node's own.

`nebula status`, `nebula leader transfer`, `nebula state export|import` and
`nebula cluster add|remove` talk to a running node through it: one JSON request
per connection, one JSON response.  Only the account that runs Nebula (and root)
can connect; nothing on it ever returns key material.

Where it lives (derived from the config alone, so the CLI finds it):
``<state_path>.admin/admin.sock`` with ``persist = "local"``,
``<raft.data_path>/admin/admin.sock`` with ``persist = "raft"``.  The directory is
created 0700; one that is a symlink, or belongs to another user, is refused rather
than used (another account could otherwise pre-create the socket and answer the CLI).
A path longer than ``sun_path`` allows (~107 bytes) is reached through
``/proc/self/fd/<directory>/admin.sock``, never through a shared directory like /tmp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from nebula.config import LoadedConfig
from nebula.errors import NebulaError, StateError

log = logging.getLogger("nebula.admin")

SOCKET_NAME = "admin.sock"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def socket_path(cfg: LoadedConfig) -> Path:
    """Where a node's admin socket lives (derived from its config alone)."""
    raw = cfg.raw
    if raw.persist == "raft" and raw.raft is not None:
        base = cfg.resolve(raw.raft.data_path)
        assert base is not None
        directory = base / "admin"
    else:
        state = cfg.resolve(raw.state_path)
        assert state is not None
        directory = state.with_name(state.name + ".admin")
    return Path(os.path.abspath(directory)) / SOCKET_NAME


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` 0700, or check that an existing one is this user's own.

    StateError if it is a symlink, not a directory, or owned by another user.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StateError(
            f"admin socket directory {directory} is not a directory (a symlink or a file): "
            "refusing to use it; remove it and start again"
        )
    if st.st_uid != os.geteuid():
        raise StateError(
            f"admin socket directory {directory} belongs to uid {st.st_uid}, not to this "
            f"process (uid {os.geteuid()}): refusing to use it; remove it and start again"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """A name ``bind``/``connect`` accept for ``path``, however long the path is."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class AdminServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        ensure_private_dir(self.path.parent)
        # A stale socket of a previous run (the directory is this user's own, and the
        # state's lock, taken before, says no other node runs on this state).
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                with _sun_path(self.path) as name:
                    sock.bind(name)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            self._server = await asyncio.start_unix_server(self._handle, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
            except ValueError:  # over the reader's limit (64 KiB): no request is that long
                line = None
            try:
                if line is None:
                    raise NebulaError("admin request too large")
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
            except Exception as e:  # a handler's bug: answer it, log it, keep serving
                log.exception("admin request failed")
                out = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
            writer.write(json.dumps(out, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()


def _check_server_dir(directory: Path) -> None:
    """Talk only to a socket in a 0700 directory of this user or of the node's account
    (the owner of the directory the node keeps its state in)."""
    try:
        st = os.lstat(directory)
        parent_uid = os.stat(directory.parent).st_uid
    except FileNotFoundError:
        return  # nothing there: the connect says the node is not running
    if (
        stat.S_ISLNK(st.st_mode)
        or not stat.S_ISDIR(st.st_mode)
        or stat.S_IMODE(st.st_mode) & 0o077
        or st.st_uid not in (os.geteuid(), parent_uid)
    ):
        raise NebulaError(
            f"admin socket directory {directory} is not a private directory of the node's "
            "account (a symlink, group/world accessible, or another user's): refusing to "
            "talk to it"
        )


class AdminUnreachable(NebulaError):
    """The node's admin socket accepted nothing or answered nothing in time (a paused or
    wedged node, a socket this account may not use)."""


def request(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one admin command (blocking); raises NebulaError with the node's message
    (:class:`AdminUnreachable` when the node does not answer in time)."""
    _check_server_dir(path.parent)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with _sun_path(path) as name:
                s.connect(name)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NebulaError(f"node not running (no admin socket at {path}): {e}") from None
        except TimeoutError:
            raise AdminUnreachable(
                f"no answer from the node at {path} within {timeout:g}s (paused or wedged?)"
            ) from None
        except OSError as e:
            raise AdminUnreachable(f"cannot reach the node at {path}: {e}") from None
        buf = b""
        try:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise AdminUnreachable(
                f"no answer from the node at {path} within {timeout:g}s (paused or wedged?); "
                f"the outcome of {cmd!r} is unknown"
            ) from None
        except OSError as e:
            raise AdminUnreachable(
                f"lost the connection to the node at {path}: {e}; the outcome of {cmd!r} is unknown"
            ) from None
    try:
        out = json.loads(buf)
    except ValueError:
        raise NebulaError(f"malformed admin response from {path}") from None
    if not out.get("ok"):
        raise NebulaError(out.get("error") or "admin command failed")
    return out.get("result")
