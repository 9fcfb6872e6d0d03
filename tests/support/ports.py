"""Free loopback ports and short Unix socket paths for tests (one registry with devnet)."""

from __future__ import annotations

import tempfile

from nebula.devnet.ports import free_port, free_ports
from nebula.errors import ConfigError

__all__ = ["free_port", "free_ports", "unix_socket_path"]


def unix_socket_path(name: str = "privval.sock") -> str:
    """A fresh, short Unix socket path in a private (0700) directory under the system temp.

    pytest's ``tmp_path`` can exceed the 107-byte ``sun_path`` limit, so sockets for
    ``unix://`` addresses should live here instead. The caller removes the directory.
    """
    path = f"{tempfile.mkdtemp(prefix='nb-')}/{name}"
    if len(path.encode()) > 107:
        raise ConfigError(f"unix socket path too long ({len(path)} bytes): {path}")
    return path
