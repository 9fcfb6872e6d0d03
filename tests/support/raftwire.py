"""A hand-written client of the Raft transport's wire format (version 1), for tests.

Written from the format in ``nebula/raft/transport.py``'s docstring rather than from
its code, so the tests check the documented format: a dialer that can send a correct
handshake, a wrong one, garbage, frames with chosen counters, tampered frames, and
record every byte it sent (to replay a whole connection later).  Async (asyncio
streams), so it runs on the event loop of the transport under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"NBRT"
AUTHENTICATOR = b"\x00nebula raft transport v1 authenticator"


def hello(
    from_id: int, to_id: int, nonce_c: bytes, version: int = 1, magic: bytes = MAGIC
) -> bytes:
    return magic + bytes([version]) + struct.pack(">QQ", from_id, to_id) + nonce_c


def key(secret: bytes, nonce_c: bytes, nonce_s: bytes, from_id: int, to_id: int) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=nonce_c + nonce_s,
        info=b"nebula raft transport v1" + struct.pack(">QQ", from_id, to_id),
    ).derive(secret)


class RawDialer:
    """One connection to a transport's listener, driven step by step."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sent = bytearray()  # every byte written, in order
        self.aead: ChaCha20Poly1305 | None = None
        self.counter = 0

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawDialer:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.sent += data
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def handshake(
        self,
        secret: bytes,
        from_id: int,
        to_id: int,
        *,
        version: int = 1,
        authenticate: bool = True,
        timeout: float = 2.0,
    ) -> bytes | None:
        """Hello, read nonce_s (None if the listener closed instead), then the authenticator."""
        nonce_c = os.urandom(32)
        await self.write(hello(from_id, to_id, nonce_c, version))
        try:
            nonce_s = await asyncio.wait_for(self.reader.readexactly(32), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.aead = ChaCha20Poly1305(key(secret, nonce_c, nonce_s, from_id, to_id))
        self.counter = 0
        if authenticate:
            await self.write(self.frame_raw(AUTHENTICATOR))
        return nonce_s

    def frame_raw(self, plaintext: bytes, counter: int | None = None) -> bytes:
        """One sealed frame of ``plaintext`` (kind byte included)."""
        assert self.aead is not None
        c = self.counter if counter is None else counter
        if counter is None:
            self.counter += 1
        sealed = self.aead.encrypt(c.to_bytes(12, "little"), plaintext, None)
        return struct.pack(">I", len(sealed)) + sealed

    def frame(self, payload: bytes, counter: int | None = None) -> bytes:
        return self.frame_raw(b"\x01" + payload, counter)

    async def send(self, payload: bytes) -> None:
        await self.write(self.frame(payload))

    async def closed_within(self, timeout: float) -> bool:
        """True if the listener closed the connection within ``timeout`` seconds."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not data:
                    return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.transport.abort()
