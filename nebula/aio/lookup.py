"""One host name lookup in flight per connection owner.

``asyncio.open_connection`` with a host name resolves it on the event loop's resolver
pool (a few threads, shared by the whole process).  A lookup that hangs - a DNS outage -
holds its thread until the resolver gives up, whatever timed out meanwhile; an owner that
starts a new lookup on every retry soon holds every thread of the pool, and every other
connection of the process (other chains' Vault backends, other validators) waits behind
them.  :class:`Lookup` keeps one lookup in flight for its owner; the attempts behind it
wait for that one (found in review, with a Vault host name).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Lookup:
    """The address of ``host``: a literal as it is, a name looked up with at most one
    lookup in flight (each new connection after it looks up again: the DNS may change)."""

    __slots__ = ("_host", "_port", "_task")

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._task: asyncio.Future[Any] | None = None

    async def address(self) -> str:
        host = self._host
        if is_ip(host):
            return host
        task = self._task
        if task is None:
            loop = asyncio.get_running_loop()
            task = self._task = asyncio.ensure_future(
                loop.getaddrinfo(host, self._port, type=socket.SOCK_STREAM)
            )
            task.add_done_callback(self._done)
        infos = await asyncio.shield(task)
        if not infos:
            raise OSError(f"{host}: no address")
        return str(infos[0][4][0])

    def _done(self, task: asyncio.Future[Any]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # retrieved here: a failure is raised to the awaiting attempt
