"""The byte pump between a stream and a privval session, shared by both sides.

Over ``tcp://`` the session is a SecretConnection (:mod:`nebula.crypto.secretconn`);
over ``unix://`` it is :class:`PlainSession`, which passes bytes through.  Both have
``seal(plaintext) -> bytes to write`` and ``feed(bytes read) -> plaintext``.
"""

from __future__ import annotations

import asyncio

from nebula.crypto.secretconn import Handshake, Identity, Session
from nebula.errors import ProtocolError

READ_CHUNK = 1 << 16


class PlainSession:
    """The no-encryption session of a unix socket."""

    @staticmethod
    def seal(data: bytes) -> bytes:
        return data

    @staticmethod
    def feed(data: bytes) -> bytes:
        return data


async def secret_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: bytes | Identity,
    peer: str,
) -> Session:
    """Run the SecretConnection handshake over a stream (the protocol is symmetric)."""
    hs = Handshake(identity)
    writer.write(hs.initial_bytes())
    while not hs.done:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise ProtocolError(f"{peer} closed the connection during the handshake")
        out = hs.receive(data)
        if out:
            writer.write(out)
    return hs.session()
