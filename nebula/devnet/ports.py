"""Free TCP ports on the loopback interface for local chains and clusters.

The kernel hands out a free port when we bind to port 0. Between our ``close()`` and the
child process binding it, another process could take it, so:

* ports handed out by this process are remembered and never handed out twice, and
* ``free_ports(n)`` keeps all ``n`` probe sockets open until every port is chosen, so the
  ``n`` ports are distinct even without the memory above.

The remaining race (a foreign process binding the port in the gap) is accepted: callers
that start a server should treat "address already in use" as retryable.
"""

from __future__ import annotations

import socket
import threading

from nebula.errors import ConfigError

__all__ = ["free_port", "free_ports"]

_lock = threading.Lock()
_handed_out: set[tuple[str, int]] = set()
_MAX_ATTEMPTS = 200


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports on ``host`` that were free a moment ago."""
    if n < 1:
        raise ConfigError(f"free_ports: n must be >= 1, got {n}")
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        with _lock:
            for _ in range(_MAX_ATTEMPTS):
                if len(ports) == n:
                    break
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(s)
                s.bind((host, 0))
                port = s.getsockname()[1]
                if (host, port) in _handed_out:
                    continue
                _handed_out.add((host, port))
                ports.append(port)
    finally:
        for s in probes:
            s.close()
    if len(ports) != n:
        raise ConfigError(f"free_ports: could not find {n} free ports on {host}")
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port on ``host`` that was free a moment ago."""
    return free_ports(1, host)[0]
