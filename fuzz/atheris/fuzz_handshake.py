#!/usr/bin/env python3
"""atheris harness: the SecretConnection handshake against a fuzzed peer.

Our side is the handshake test vector's signer (fixed identity and ephemeral key); the peer is
the vector's node, whose keys the harness knows, so the fuzzer can write the *plaintext*
of the peer's AuthSigMessage frames, not only raw bytes.  Input: one selector byte, then
the payload.  ``sel % 3`` picks what the payload is:

0. raw bytes from the peer (ephemeral-key message and what follows);
1. the plaintext stream after the node's genuine key message: cut into frames of
   ``1 + payload[0] * 4`` bytes (capped at 1024), honestly sealed with the node's key;
2. as 1, but every 1028 bytes of the payload are one frame's whole plaintext, length
   field included (so over-long length fields reach the handshake).

The wire bytes are fed in pieces of a size picked by ``sel // 3``.  Both frame kernels
run (compiled and pure): they must answer the same bytes, reach the same state and fail
with the same error class.  Only ProtocolError subclasses may escape; the handshake may
complete only with the node's genuine AuthSigMessage and must then report the node's
identity.  Run: ``python fuzz/atheris/fuzz_handshake.py -max_total_time=300``.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris
from _common import agree, outcome, run

# Coverage from the handshake and the pure frame twin; merlin/keccak are not the target.
with atheris.instrument_imports(include=["nebula.crypto.secretconn", "nebula._fast.frame_py"]):
    from nebula._fast import frame_py as PURE
    from nebula.crypto import secretconn

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from nebula import _fast
from nebula.errors import HandshakeError, ProtocolError
from tests.support.vectors import h, load

COMPILED = _fast.load_compiled("frame")
VEC = load("secret_conn_handshake_derived")
NODE = VEC["peers"]["node_listener"]
SIGNER = VEC["peers"]["signer_dialer"]
NODE_KEY_MESSAGE = h(NODE["first_message_on_wire_hex"])
NODE_IDENTITY = h(NODE["identity_pubkey_hex"])
NODE_AUTH_SIG = h(NODE["auth_sig_message_delimited_hex"])
AEAD = ChaCha20Poly1305(h(NODE["send_key_hex"]))
SIGNER_SEED = h(SIGNER["identity_ed25519_seed_hex"])
SIGNER_EPHEMERAL = h(SIGNER["eph_x25519_priv_hex"])
IDENTITY = secretconn.Identity(SIGNER_SEED)
PLAIN, CHUNK = 1028, 1024
PIECE_SIZES = (7, 35, 36, 523, 1044, 1079, 4096, 1 << 20)


def seal(counter: int, plaintext: bytes) -> bytes:
    plaintext = plaintext + bytes(PLAIN - len(plaintext))
    return AEAD.encrypt(bytes(4) + counter.to_bytes(8, "little"), plaintext, None)


def wire_for(target: int, payload: bytes) -> bytes:
    if target == 0:
        return payload
    if target == 1:
        size = min(1 + (payload[0] if payload else 0) * 4, CHUNK)
        stream = payload[1:]
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        plans = [len(c).to_bytes(4, "little") + c for c in chunks]
    else:
        plans = [payload[i : i + PLAIN] for i in range(0, len(payload), PLAIN)]
    return NODE_KEY_MESSAGE + b"".join(seal(i, p) for i, p in enumerate(plans))


def handshake(frame: Any, wire: bytes, piece: int) -> tuple[Any, ...]:
    """Run one handshake on ``frame``; a summary both kernels must share."""
    secretconn._frame = frame
    hs = secretconn.Handshake(IDENTITY, SIGNER_EPHEMERAL)
    sent = bytearray()
    error = None
    for i in range(0, len(wire), piece):
        kind, result = outcome(hs.receive, wire[i : i + piece])
        if kind == "error":
            if not issubclass(result, ProtocolError):
                raise AssertionError(f"Handshake.receive raised {result.__name__}")
            if hs.done or outcome(hs.receive, b"")[1] is not HandshakeError:
                raise AssertionError("a failed handshake goes on")
            error = result
            break
        sent += result
    if len(sent) not in (0, 1044):
        raise AssertionError(f"handshake sent {len(sent)} bytes")
    leftover = None
    if hs.done:
        if hs.remote_identity != NODE_IDENTITY:
            raise AssertionError("handshake completed with a forged identity")
        leftover = outcome(hs.session().feed, b"")
    return bytes(sent), hs.done, error, hs.challenge, leftover


def test_one_input(data: bytes) -> None:
    if not data:
        return
    sel, payload = data[0], data[1:]
    wire = wire_for(sel % 3, payload)
    piece = PIECE_SIZES[sel // 3 % len(PIECE_SIZES)]
    try:
        agree(handshake(COMPILED, wire, piece), handshake(PURE, wire, piece), "handshake")
    finally:
        secretconn._frame = COMPILED


def seeds() -> list[bytes]:
    out = [
        bytes([3 * k]) + NODE_KEY_MESSAGE + h(NODE["auth_sig_frames"][0]["sealed_frame_hex"])
        for k in range(8)
    ]
    out += [bytes([0]) + NODE_KEY_MESSAGE, bytes([0]) + NODE_KEY_MESSAGE[:20]]
    for k in range(8):
        out.append(bytes([1 + 3 * k, 255]) + NODE_AUTH_SIG + b"\x02\x3a\x00")
        out.append(bytes([1 + 3 * k, 10]) + NODE_AUTH_SIG)
    plain = len(NODE_AUTH_SIG).to_bytes(4, "little") + NODE_AUTH_SIG
    out.append(bytes([2]) + plain)
    out.append(bytes([2]) + plain + bytes(PLAIN - len(plain)) + b"\x03\x00\x00\x00\x02\x3a\x00")
    return out


if __name__ == "__main__":
    run("handshake", test_one_input, seeds())
    sys.exit(0)
