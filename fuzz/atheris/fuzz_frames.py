#!/usr/bin/env python3
"""atheris harness: SecretConnection frames - FrameOpener twins and Session.feed.

The peer's key is known (the handshake test vector's), so the fuzzer controls frame
*plaintexts*, length field included; the harness seals them with ``cryptography``'s
ChaCha20-Poly1305, independently of both kernels.  Input: one selector byte, then the
payload; ``sel % 3`` picks the target:

0. the payload cut into 1044-byte pieces (the last one short) is opened as raw frames by
   the compiled and the pure FrameOpener, starting at counter ``sel // 3``;
1. the payload cut into 1028-byte plaintexts (4-byte little-endian length field, chunk,
   padding), sealed under consecutive counters, opened by both twins: same chunk or same
   error class, same counter; a length field above 1024 must be a FrameError;
2. the same sealed stream, one ciphertext byte flipped when ``sel & 0x80``, fed to a
   Session on each twin in pieces of a size picked by ``sel``: the plaintext delivered
   must be exactly the chunks before the first bad frame, and the error the right one.

Run: ``python fuzz/atheris/fuzz_frames.py -max_total_time=300``.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris
from _common import Disagreement, agree, outcome, run

with atheris.instrument_imports(include=["nebula"]):
    from nebula._fast import frame_py as PURE
    from nebula.crypto.secretconn import Session

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from nebula import _fast
from nebula.errors import AuthenticationError, FrameError, ProtocolError
from tests.support.vectors import h, load

COMPILED = _fast.load_compiled("frame")
VEC = load("secret_conn_handshake_derived")
KEY = h(VEC["peers"]["node_listener"]["send_key_hex"])
AEAD = ChaCha20Poly1305(KEY)
SEALED, PLAIN, CHUNK = 1044, 1028, 1024
PIECE_SIZES = (1, 3, 100, 1043, 1044, 1045, 3000, 1 << 20)


def seal(counter: int, plaintext: bytes) -> bytes:
    plaintext = plaintext + bytes(PLAIN - len(plaintext))
    return AEAD.encrypt(bytes(4) + counter.to_bytes(8, "little"), plaintext, None)


def plaintexts(payload: bytes) -> list[bytes]:
    return [payload[i : i + PLAIN] for i in range(0, len(payload), PLAIN)]


def length_field(plaintext: bytes) -> int:
    return int.from_bytes((plaintext + bytes(4))[:4], "little")


def open_all(frames: list[bytes], start: int) -> list[tuple[str, Any]]:
    a, b = COMPILED.FrameOpener(KEY, start), PURE.FrameOpener(KEY, start)
    results = []
    for frame in frames:
        result = agree(outcome(a.open, frame), outcome(b.open, frame), "FrameOpener.open")
        if result[0] == "error" and not issubclass(result[1], ProtocolError):
            raise AssertionError(f"FrameOpener raised {result[1].__name__}")
        if a.nonce != b.nonce:
            raise Disagreement(f"counters differ: compiled {a.nonce}, pure {b.nonce}")
        results.append(result)
    return results


def check_session(payload: bytes, flip: int | None, piece: int) -> None:
    """``flip``: a ciphertext bit to corrupt (an index into the wire bytes), or None."""
    plans = plaintexts(payload)
    wire = bytearray(b"".join(seal(i, p) for i, p in enumerate(plans)))
    if flip is not None and wire:
        flip %= len(wire)
        wire[flip] ^= 0x01
    else:
        flip = None
    expected = bytearray()
    error: type | None = None
    for i, p in enumerate(plans):
        if flip is not None and i == flip // SEALED:
            error = AuthenticationError
            break
        n = length_field(p)
        if n > CHUNK:
            error = FrameError
            break
        expected += (p + bytes(PLAIN))[4 : 4 + n]
    for kernel in (COMPILED, PURE):
        session = Session(kernel.FrameSealer(bytes(32)), kernel.FrameOpener(KEY), b"peer")
        delivered = bytearray()
        failed: type | None = None
        for i in range(0, len(wire), piece):
            kind, result = outcome(session.feed, bytes(wire[i : i + piece]))
            if kind == "error":
                failed = result
                break
            delivered += result
        if failed is not error:
            raise AssertionError(
                f"{kernel.__name__}: Session failed with {failed}, expected {error}"
            )
        if error is None and delivered != expected:
            raise AssertionError(f"{kernel.__name__}: Session delivered other plaintext")
        if error is not None and not expected.startswith(delivered):
            raise AssertionError(f"{kernel.__name__}: Session delivered unauthenticated data")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    sel, payload = data[0], data[1:]
    target = sel % 3
    if target == 0:
        frames = [payload[i : i + SEALED] for i in range(0, len(payload), SEALED)]
        open_all(frames, sel // 3)
    elif target == 1:
        plans = plaintexts(payload)
        results = open_all([seal(i, p) for i, p in enumerate(plans)], 0)
        for p, (kind, result) in zip(plans, results, strict=True):
            n = length_field(p)
            if n > CHUNK and result is not FrameError:
                raise AssertionError(f"length field {n} accepted")
            if n <= CHUNK and (kind, result) != ("ok", (p + bytes(PLAIN))[4 : 4 + n]):
                raise AssertionError("authentic frame opened to something else")
    else:
        flip = int.from_bytes(payload[:2], "little") if sel & 0x80 else None
        check_session(payload, flip, PIECE_SIZES[sel // 3 % len(PIECE_SIZES)])


def seeds() -> list[bytes]:
    out = []
    frames = [
        h(f["sealed_frame_hex"]) for peer in VEC["peers"].values() for f in peer["auth_sig_frames"]
    ]
    out += [bytes([0]) + f for f in frames]
    node_auth = h(VEC["peers"]["node_listener"]["auth_sig_message_delimited_hex"])
    for msg in (node_auth, h("023a00"), bytes(CHUNK)):
        plain = len(msg).to_bytes(4, "little") + msg
        out.append(bytes([1]) + plain)
        stream = plain + bytes(PLAIN - len(plain)) + plain
        out += [bytes([2 + 3 * k]) + stream for k in range(8)]
        out.append(bytes([0x80 | 2]) + plain)
    out.append(bytes([1]) + (CHUNK + 1).to_bytes(4, "little"))
    return out


if __name__ == "__main__":
    run("frames", test_one_input, seeds())
    sys.exit(0)
