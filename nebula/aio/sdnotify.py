"""systemd's readiness protocol (``Type=notify``), without a dependency.

systemd passes ``NOTIFY_SOCKET``: the path of an ``AF_UNIX`` datagram socket, or an
abstract name written with a leading ``@``.  A service sends newline-separated
``KEY=value`` assignments to it: ``READY=1`` once it serves, ``STOPPING=1`` when it
begins to shut down, ``STATUS=...`` free text for ``systemctl status``
(sd_notify(3)).  Without ``NOTIFY_SOCKET`` (not under systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("nebula.daemon")

__all__ = ["notify", "notify_address"]


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address ``NOTIFY_SOCKET`` names (None if unset or unusable)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # the abstract namespace
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", value)
    return None


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to systemd; True if sent, False if not under systemd.

    A failure to send is logged, never raised: the signer keeps running (systemd then
    reports the start as timed out, which is the right signal for the operator).
    """
    address = notify_address(os.environ.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True
