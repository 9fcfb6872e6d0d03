"""SecretConnection handshake and session (sans-I/O), with compiled and pure kernels."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from nebula.crypto import merlin, secretconn
from nebula.crypto.secretconn import (
    Handshake,
    Identity,
    Session,
    derive_secrets,
    node_id,
    transcript_challenge,
)
from nebula.errors import (
    AuthenticationError,
    FrameError,
    HandshakeError,
    LowOrderPointError,
    ProtocolError,
)
from tests.conftest import kernel
from tests.support.vectors import h, load

SEALED = 1044


@pytest.fixture
def frame_kernel(kernel_impl: str, monkeypatch: pytest.MonkeyPatch):
    """Run secretconn (and the merlin transcript under it) on one implementation."""
    frame = kernel("frame", kernel_impl)
    monkeypatch.setattr(secretconn, "_frame", frame)
    monkeypatch.setattr(merlin, "_keccak_f1600", kernel("keccak", kernel_impl).keccak_f1600)
    return frame


# -- helpers ------------------------------------------------------------------------------


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _uvarint(field << 3 | 2) + _uvarint(len(payload)) + payload


def _delimited(message: bytes) -> bytes:
    return _uvarint(len(message)) + message


def _auth_sig(pub_key_field: int, key: bytes, sig: bytes) -> bytes:
    return _delimited(_ld(1, _ld(pub_key_field, key)) + _ld(2, sig))


VEC = load("secret_conn_handshake_derived")
NODE = VEC["peers"]["node_listener"]
SIGNER = VEC["peers"]["signer_dialer"]


def _vector_handshake(peer: dict) -> Handshake:
    return Handshake(h(peer["identity_ed25519_seed_hex"]), h(peer["eph_x25519_priv_hex"]))


def _node_after_key() -> Handshake:
    """The node's handshake after it received the signer's key (vector keys)."""
    node = _vector_handshake(NODE)
    node.receive(h(SIGNER["first_message_on_wire_hex"]))
    return node


def _sealed_by_signer(frame, plaintext: bytes) -> bytes:
    """Frames the signer would send first, sealed with the vector's signer send key."""
    return frame.FrameSealer(h(SIGNER["send_key_hex"])).seal(plaintext)


def _pump(a: Handshake, b: Handshake, rng: random.Random) -> None:
    """Run two handshakes against each other, delivering bytes in random pieces."""
    to_b, to_a = bytearray(a.initial_bytes()), bytearray(b.initial_bytes())
    for _ in range(10_000):
        if a.done and b.done and not to_a and not to_b:
            return
        for dst, queue, back in ((b, to_b, to_a), (a, to_a, to_b)):
            if queue:
                n = rng.randint(1, min(len(queue), 1200))
                piece = bytes(queue[:n])
                del queue[:n]
                back += dst.receive(piece)
    raise AssertionError("handshake did not finish")


def _feed_in_pieces(session: Session, data: bytes, rng: random.Random) -> bytes:
    out = []
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 1043, 1044, 1045, 3000, rng.randint(1, 5000)])
        out.append(session.feed(data[pos : pos + n]))
        pos += n
    return b"".join(out)


# -- vectors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row", load("secret_conn_derive")["rows"], ids=lambda r: r["dh_secret_hex"][:8]
)
def test_derive_secrets_golden(row: dict) -> None:
    recv, send = derive_secrets(h(row["dh_secret_hex"]), row["loc_is_least"])
    assert recv == h(row["recv_secret_hex"])
    assert send == h(row["send_secret_hex"])


@pytest.mark.parametrize(
    "vector", load("secret_conn_nonce")["vectors"], ids=lambda v: str(v["increments"])
)
def test_nonce_layout(frame_kernel, vector: dict) -> None:
    key = bytes(range(32))
    chunk = b"nonce"
    plaintext = len(chunk).to_bytes(4, "little") + chunk + bytes(1024 - len(chunk))
    expected = ChaCha20Poly1305(key).encrypt(h(vector["nonce_hex"]), plaintext, None)
    sealer = frame_kernel.FrameSealer(key)
    for _ in range(vector["increments"]):
        sealer.seal(b"\x00")
    assert sealer.nonce == vector["increments"]
    assert sealer.seal(chunk) == expected
    opener = frame_kernel.FrameOpener(key, vector["increments"])
    assert opener.open(expected) == chunk


def test_vector_components() -> None:
    for peer in (NODE, SIGNER):
        ident = Identity(h(peer["identity_ed25519_seed_hex"]))
        assert ident.public_key == h(peer["identity_pubkey_hex"])
        assert node_id(ident.public_key) == peer["node_id_hex"]
        assert secretconn._x25519_base(h(peer["eph_x25519_priv_hex"])) == h(
            peer["eph_x25519_pub_hex"]
        )
    dh = h(VEC["dh_secret_hex"])
    assert secretconn._x25519(h(NODE["eph_x25519_priv_hex"]), h(SIGNER["eph_x25519_pub_hex"])) == dh
    assert secretconn._x25519(h(SIGNER["eph_x25519_priv_hex"]), h(NODE["eph_x25519_pub_hex"])) == dh
    okm = h(VEC["hkdf_okm_96_hex"])
    for peer in (NODE, SIGNER):
        recv, send = derive_secrets(dh, peer["loc_is_least"])
        assert (recv, send) == (h(peer["recv_key_hex"]), h(peer["send_key_hex"]))
        assert {recv, send} == {okm[0:32], okm[32:64]}


def test_vector_challenge(frame_kernel) -> None:
    challenge = transcript_challenge(
        h(VEC["lo_eph_pub_hex"]), h(VEC["hi_eph_pub_hex"]), h(VEC["dh_secret_hex"])
    )
    assert challenge == h(VEC["merlin_challenge_hex"])


def test_full_deterministic_handshake(frame_kernel) -> None:
    node, signer = _vector_handshake(NODE), _vector_handshake(SIGNER)
    assert node.initial_bytes() == h(NODE["first_message_on_wire_hex"])
    assert signer.initial_bytes() == h(SIGNER["first_message_on_wire_hex"])

    node_auth = node.receive(signer.initial_bytes())
    signer_auth = signer.receive(node.initial_bytes())
    assert node.challenge == signer.challenge == h(VEC["merlin_challenge_hex"])
    assert node_auth == h(NODE["auth_sig_frames"][0]["sealed_frame_hex"])
    assert signer_auth == h(SIGNER["auth_sig_frames"][0]["sealed_frame_hex"])
    # The sealed frames carry exactly the vector's AuthSigMessages.
    for peer, sealed in ((NODE, node_auth), (SIGNER, signer_auth)):
        opened = frame_kernel.FrameOpener(h(peer["send_key_hex"])).open(sealed)
        assert opened == h(peer["auth_sig_message_delimited_hex"])
        assert opened[-64:] == h(peer["challenge_signature_hex"])
    assert not node.done and not signer.done

    assert node.receive(signer_auth) == b""
    assert signer.receive(node_auth) == b""
    assert node.done and signer.done
    assert node.remote_identity == h(SIGNER["identity_pubkey_hex"])
    assert signer.remote_identity == h(NODE["identity_pubkey_hex"])

    node_s, signer_s = node.session(), signer.session()
    assert node_s.remote_identity == signer.local_identity
    ping = VEC["post_handshake_example"]["node_sends_ping_request"]
    pong = VEC["post_handshake_example"]["signer_sends_ping_response"]
    wire = node_s.seal(h(ping["privval_message_delimited_hex"]))
    assert wire == h(ping["frames"][0]["sealed_frame_hex"])
    assert signer_s.feed(wire) == h(ping["privval_message_delimited_hex"])
    wire = signer_s.seal(h(pong["privval_message_delimited_hex"]))
    assert wire == h(pong["frames"][0]["sealed_frame_hex"])
    assert node_s.feed(wire) == h(pong["privval_message_delimited_hex"])
    assert node_s.send_nonce == node_s.recv_nonce == signer_s.send_nonce == signer_s.recv_nonce == 2


def test_deterministic_handshake_byte_by_byte(frame_kernel) -> None:
    node, signer = _vector_handshake(NODE), _vector_handshake(SIGNER)
    out = b""
    for byte in signer.initial_bytes() + h(SIGNER["auth_sig_frames"][0]["sealed_frame_hex"]):
        assert not node.done
        out += node.receive(bytes([byte]))
    assert node.done
    assert out == h(NODE["auth_sig_frames"][0]["sealed_frame_hex"])


# -- in-memory pairs ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_random_pair_with_arbitrary_chunking(frame_kernel, seed: int) -> None:
    rng = random.Random(seed)
    a = Handshake(rng.randbytes(32), rng.randbytes(32))
    b = Handshake(Identity(rng.randbytes(32)))  # random ephemeral key
    _pump(a, b, rng)
    assert a.remote_identity == b.local_identity
    assert b.remote_identity == a.local_identity
    sa, sb = a.session(), b.session()
    for _ in range(5):
        messages = [
            rng.randbytes(rng.choice([0, 1, 3, 1024, 1025, rng.randint(0, 4000)])) for _ in range(4)
        ]
        wire = b"".join(sa.seal(m) for m in messages)
        assert _feed_in_pieces(sb, wire, rng) == b"".join(messages)
        wire = b"".join(sb.seal(m) for m in messages)
        assert _feed_in_pieces(sa, wire, rng) == b"".join(messages)


def test_bytes_after_the_handshake_reach_the_session(frame_kernel) -> None:
    a, b = Handshake(os.urandom(32)), Handshake(os.urandom(32))
    a_auth = a.receive(b.initial_bytes())
    b_auth = b.receive(a.initial_bytes())
    assert a.receive(b_auth) == b""
    sa = a.session()
    first = sa.seal(b"right behind the auth frame")
    # b gets a's auth frame, a whole data frame and half of another in one read.
    second = sa.seal(b"x" * 1500)
    b.receive(a_auth + first + second[:700])
    assert b.done
    sb = b.session()
    assert sb.feed(b"") == b"right behind the auth frame"
    assert sb.feed(second[700:]) == b"x" * 1500


def test_auth_sig_message_split_across_frames(frame_kernel) -> None:
    node = _node_after_key()
    message = h(SIGNER["auth_sig_message_delimited_hex"])
    sealer = frame_kernel.FrameSealer(h(SIGNER["send_key_hex"]))
    wire = sealer.seal(message[:1]) + sealer.seal(message[1:50]) + sealer.seal(message[50:])
    node.receive(wire[:SEALED])
    node.receive(wire[SEALED : 2 * SEALED])
    assert not node.done
    node.receive(wire[2 * SEALED :])
    assert node.done
    assert node.remote_identity == h(SIGNER["identity_pubkey_hex"])


# -- refusals -----------------------------------------------------------------------------


def _low_order_variants() -> list[bytes]:
    points = sorted(secretconn.LOW_ORDER_POINTS)
    return points + [p[:31] + bytes([p[31] | 0x80]) for p in points]


def test_low_order_list_is_the_protocol_list() -> None:
    assert len(secretconn.LOW_ORDER_POINTS) == 7
    assert bytes(32) in secretconn.LOW_ORDER_POINTS
    assert b"\x01" + bytes(31) in secretconn.LOW_ORDER_POINTS


@pytest.mark.parametrize("point", _low_order_variants(), ids=lambda p: p.hex()[:8] + p.hex()[-2:])
def test_every_low_order_point_is_rejected(frame_kernel, point: bytes) -> None:
    hs = Handshake(os.urandom(32))
    with pytest.raises(LowOrderPointError):
        hs.receive(b"\x22\x0a\x20" + point)
    assert hs.challenge is None
    with pytest.raises(HandshakeError, match="already failed"):
        hs.receive(b"")


@pytest.mark.parametrize("point", _low_order_variants(), ids=lambda p: p.hex()[:8] + p.hex()[-2:])
def test_x25519_itself_refuses_low_order_points(point: bytes) -> None:
    with pytest.raises(LowOrderPointError):
        secretconn._x25519(os.urandom(32), point)


def test_all_zero_dh_result_is_rejected(frame_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secretconn, "_x25519", lambda private, public: bytes(32))
    hs = Handshake(os.urandom(32))
    with pytest.raises(LowOrderPointError, match="all zeros"):
        hs.receive(Handshake(os.urandom(32)).initial_bytes())


@pytest.mark.parametrize("prefix", [b"\x23", b"\x22\x0a\x21", b"\x22\x12", b"\x00"])
def test_malformed_key_message_is_rejected_early(frame_kernel, prefix: bytes) -> None:
    with pytest.raises(HandshakeError, match="malformed ephemeral key message"):
        Handshake(os.urandom(32)).receive(prefix)


def test_truncated_input_waits_for_more(frame_kernel) -> None:
    node = _vector_handshake(NODE)
    key_msg = h(SIGNER["first_message_on_wire_hex"])
    assert node.receive(key_msg[:34]) == b""
    assert node.challenge is None
    auth = node.receive(key_msg[34:])
    assert auth == h(NODE["auth_sig_frames"][0]["sealed_frame_hex"])
    frame = h(SIGNER["auth_sig_frames"][0]["sealed_frame_hex"])
    assert node.receive(frame[:-1]) == b""
    assert not node.done
    with pytest.raises(HandshakeError, match="not completed"):
        node.session()
    with pytest.raises(HandshakeError, match="not completed"):
        _ = node.remote_identity
    node.receive(frame[-1:])
    assert node.done


def test_wrong_mac_on_auth_frame(frame_kernel) -> None:
    node = _node_after_key()
    frame = bytearray(h(SIGNER["auth_sig_frames"][0]["sealed_frame_hex"]))
    frame[10] ^= 0x40
    with pytest.raises(AuthenticationError):
        node.receive(bytes(frame))
    with pytest.raises(HandshakeError, match="already failed"):
        node.receive(b"")


def test_tampered_auth_signature(frame_kernel) -> None:
    node = _node_after_key()
    sig = bytearray(h(SIGNER["challenge_signature_hex"]))
    sig[0] ^= 0x01
    wire = _sealed_by_signer(
        frame_kernel, _auth_sig(1, h(SIGNER["identity_pubkey_hex"]), bytes(sig))
    )
    with pytest.raises(HandshakeError, match="challenge verification failed"):
        node.receive(wire)
    assert not node.done


def test_signature_by_another_key(frame_kernel) -> None:
    node = _node_after_key()
    other = Identity(os.urandom(32))
    wire = _sealed_by_signer(
        frame_kernel, _auth_sig(1, h(SIGNER["identity_pubkey_hex"]), other.sign(node.challenge))
    )
    with pytest.raises(HandshakeError, match="challenge verification failed"):
        node.receive(wire)


def test_valid_signature_from_any_ed25519_key_is_accepted(frame_kernel) -> None:
    # The node side does not pin the peer key; it reports it (protocol.md 6.1 step 12).
    node = _node_after_key()
    other = Identity(os.urandom(32))
    wire = _sealed_by_signer(
        frame_kernel, _auth_sig(1, other.public_key, other.sign(node.challenge))
    )
    node.receive(wire)
    assert node.remote_identity == other.public_key


@pytest.mark.parametrize(
    ("field", "key", "name"),
    [
        (2, b"\x02" + bytes(32), "secp256k1"),
        (3, bytes(48), "bls12381"),
        (9, bytes(32), "unknown key field 9"),
    ],
)
def test_non_ed25519_key_is_rejected(frame_kernel, field: int, key: bytes, name: str) -> None:
    node = _node_after_key()
    wire = _sealed_by_signer(frame_kernel, _auth_sig(field, key, bytes(64)))
    with pytest.raises(HandshakeError, match=f"expected ed25519 pubkey, got {name}"):
        node.receive(wire)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (_delimited(_ld(2, bytes(64))), "no pub_key"),
        (_delimited(_ld(1, b"") + _ld(2, bytes(64))), "got no key"),
        (_delimited(_ld(1, _ld(1, bytes(31))) + _ld(2, bytes(64))), "must be 32 bytes"),
        (_delimited(_ld(1, _ld(1, bytes(32)))), "signature must be 64 bytes, got 0"),
        (_delimited(_ld(1, _ld(1, bytes(32))) + _ld(2, bytes(63))), "signature must be 64 bytes"),
        (_delimited(b"\x0a\x05ab"), "runs past the end"),
        (_delimited(b"\x08\x01"), "field 1 has wire type 0"),
        (_delimited(b"\x0b"), "unsupported wire type 3"),
        (_delimited(b"\x02\x00"), "field number 0"),
        (_delimited(b"\x0a"), "truncated length"),
        (_uvarint(5000), "exceeds"),
        (b"\xff" * 11, "varint longer than 64 bits"),
    ],
)
def test_malformed_auth_sig_message(frame_kernel, message: bytes, match: str) -> None:
    node = _node_after_key()
    with pytest.raises(HandshakeError, match=match):
        node.receive(_sealed_by_signer(frame_kernel, message))


def test_unknown_fields_in_auth_sig_are_skipped(frame_kernel) -> None:
    node = _node_after_key()
    ident = Identity(h(SIGNER["identity_ed25519_seed_hex"]))
    body = (
        b"\x18\x96\x01"
        + _ld(1, _ld(1, ident.public_key))
        + b"\x25\x00\x00\x00\x00"
        + _ld(2, ident.sign(node.challenge))
    )
    node.receive(_sealed_by_signer(frame_kernel, _delimited(body)))
    assert node.done


def test_reflected_ephemeral_key_is_rejected(frame_kernel) -> None:
    hs = Handshake(os.urandom(32))
    with pytest.raises(HandshakeError, match="our own ephemeral key"):
        hs.receive(hs.initial_bytes())


def test_handshake_is_finished_after_session(frame_kernel) -> None:
    a, b = Handshake(os.urandom(32)), Handshake(os.urandom(32))
    _pump(a, b, random.Random(5))
    a.receive(b"")  # still allowed before the hand-off
    a.session()
    assert a.done
    with pytest.raises(HandshakeError, match="already called"):
        a.session()
    with pytest.raises(HandshakeError, match="feed the Session"):
        a.receive(b"late")


def test_identity_and_ephemeral_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="seed must be 32 bytes"):
        Identity(bytes(31))
    with pytest.raises(ValueError, match="ephemeral private key must be 32 bytes"):
        Handshake(bytes(32), bytes(33))


# -- session refusals ---------------------------------------------------------------------


def _pair(frame_kernel) -> tuple[Session, Session]:
    a, b = Handshake(os.urandom(32)), Handshake(os.urandom(32))
    _pump(a, b, random.Random(1))
    return a.session(), b.session()


def test_session_wrong_mac(frame_kernel) -> None:
    sa, sb = _pair(frame_kernel)
    wire = bytearray(sa.seal(b"ping"))
    wire[-1] ^= 0x01
    with pytest.raises(AuthenticationError):
        sb.feed(bytes(wire))
    with pytest.raises(ProtocolError, match="already failed"):
        sb.feed(b"")
    with pytest.raises(ProtocolError, match="already failed"):
        sb.seal(b"")


def test_session_oversized_length_field(frame_kernel) -> None:
    key = bytes(range(32))
    sealed = ChaCha20Poly1305(key).encrypt(
        bytes(12), (1025).to_bytes(4, "little") + bytes(1024), None
    )
    session = Session(frame_kernel.FrameSealer(key), frame_kernel.FrameOpener(key), b"")
    with pytest.raises(FrameError, match="greater than 1024"):
        session.feed(sealed)


def test_session_partial_frames_wait(frame_kernel) -> None:
    sa, sb = _pair(frame_kernel)
    wire = sa.seal(b"a" * 2000)
    assert sb.feed(wire[:1043]) == b""
    assert sb.feed(wire[1043:1044]) == b"a" * 1024
    assert sb.feed(wire[1044:-1]) == b""
    assert sb.feed(bytearray(wire[-1:])) == b"a" * 976
    assert sb.feed(memoryview(sa.seal(b"end"))) == b"end"
