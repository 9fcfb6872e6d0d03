"""Fuzzing SecretConnection: the handshake, the session stream and the frame opener.

The peer is played with the deterministic keys of the handshake test vector, so the
fuzzer gets past the encryption: it controls the *plaintext* of the peer's AuthSigMessage
frames (and their length fields), not only raw bytes.  Properties:

* ``Handshake.receive`` returns bytes to send or raises a ProtocolError subclass (with a
  message), and refuses further use after raising; it completes only with the genuine
  AuthSigMessage of the vector's node, whose identity it then reports;
* ``Session.feed`` delivers exactly the chunks of the authentic frames, in order, however
  the stream is cut, and fails with AuthenticationError / FrameError at the first forged,
  tampered or over-long frame, then stays failed;
* ``FrameOpener.open`` only raises NebulaErrors, and the compiled and pure twins agree on
  the result, the error class and the counter afterwards.
"""

from __future__ import annotations

import itertools
from types import ModuleType

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from nebula.crypto import merlin, secretconn
from nebula.crypto.secretconn import LOW_ORDER_POINTS, Handshake, Session
from nebula.errors import (
    AuthenticationError,
    FrameError,
    HandshakeError,
    LowOrderPointError,
    ProtocolError,
)
from tests.conftest import kernel
from tests.fuzz.conftest import both_kernels, fuzz_settings, outcome
from tests.support.vectors import h, load

SEALED = 1044
CHUNK = 1024
U64 = 1 << 64

VEC = load("secret_conn_handshake_derived")
NODE = VEC["peers"]["node_listener"]
SIGNER = VEC["peers"]["signer_dialer"]
NODE_KEY_MESSAGE = h(NODE["first_message_on_wire_hex"])
NODE_SEND_KEY = h(NODE["send_key_hex"])  # what the signer opens with
NODE_AUTH_SIG = h(NODE["auth_sig_message_delimited_hex"])  # plaintext of the node's frame
NODE_IDENTITY = h(NODE["identity_pubkey_hex"])
VECTOR_FRAMES = [
    h(f["sealed_frame_hex"]) for peer in (NODE, SIGNER) for f in peer["auth_sig_frames"]
] + [
    h(f["sealed_frame_hex"]) for ex in VEC["post_handshake_example"].values() for f in ex["frames"]
]


@pytest.fixture
def frame_kernel(kernel_impl: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Run secretconn (and the merlin transcript under it) on one implementation."""
    frame = kernel("frame", kernel_impl)
    monkeypatch.setattr(secretconn, "_frame", frame)
    monkeypatch.setattr(merlin, "_keccak_f1600", kernel("keccak", kernel_impl).keccak_f1600)
    return frame


def signer_handshake() -> Handshake:
    """Our side: the vector's signer, whose peer is the vector's node."""
    return Handshake(h(SIGNER["identity_ed25519_seed_hex"]), h(SIGNER["eph_x25519_priv_hex"]))


# ---- building peer bytes ----------------------------------------------------------------------


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    return uvarint(field << 3 | 2) + uvarint(len(payload)) + payload


def seal_raw(key: bytes, counter: int, length_field: int, chunk: bytes) -> bytes:
    """One frame sealed independently of the kernels, with any length field."""
    plaintext = length_field.to_bytes(4, "little") + chunk + bytes(CHUNK - len(chunk))
    nonce = bytes(4) + counter.to_bytes(8, "little")
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext[: 4 + CHUNK], None)


# A frame plan: (length field, chunk) per frame; the length field is honest unless a
# bigger-than-1024 one is drawn.
FRAME = st.one_of(
    st.binary(max_size=CHUNK).map(lambda c: (len(c), c)),
    st.binary(max_size=64).map(lambda c: (len(c), c)),
    st.tuples(st.integers(CHUNK + 1, (1 << 32) - 1), st.binary(max_size=16)),
)


def seal_stream(key: bytes, plan: list[tuple[int, bytes]], start: int = 0) -> bytes:
    return b"".join(
        seal_raw(key, start + i, length, chunk) for i, (length, chunk) in enumerate(plan)
    )


@st.composite
def mutated(draw: st.DrawFn, source: bytes) -> bytes:
    out = bytearray(source)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, len(out)))
        if op == "flip" and pos < len(out):
            out[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        else:
            del out[pos : pos + draw(st.integers(1, 4))]
    return bytes(out)


# An AuthSigMessage body: pub_key (PublicKey oneof) and sig, each sometimes wrong.
_KEY_BYTES = st.one_of(
    st.just(NODE_IDENTITY), st.binary(min_size=32, max_size=32), st.binary(max_size=40)
)
_PUBLIC_KEY = st.one_of(
    st.tuples(st.sampled_from([1, 1, 1, 2, 3, 4]), _KEY_BYTES).map(lambda t: ld(*t)),
    st.binary(max_size=8),
    st.just(b""),
)
_SIG = st.one_of(st.binary(min_size=64, max_size=64), st.binary(max_size=70))
_AUTH_BODY = st.lists(
    st.one_of(
        _PUBLIC_KEY.map(lambda k: ld(1, k)),
        _SIG.map(lambda s: ld(2, s)),
        st.binary(max_size=6),  # stray bytes: other fields, bad wire types, junk
        st.integers(0, 2**64 - 1).map(lambda v: uvarint(1 << 3) + uvarint(v)),  # wire type 0
    ),
    max_size=4,
).map(b"".join)
_WELL_FORMED_AUTH_BODY = st.tuples(_PUBLIC_KEY, _SIG).map(lambda t: ld(1, t[0]) + ld(2, t[1]))
AUTH_PLAINTEXT = st.one_of(
    st.just(NODE_AUTH_SIG),
    _WELL_FORMED_AUTH_BODY.map(lambda b: uvarint(len(b)) + b),
    _WELL_FORMED_AUTH_BODY.map(lambda b: uvarint(len(b)) + b),
    mutated(NODE_AUTH_SIG),
    _AUTH_BODY.map(lambda b: uvarint(len(b)) + b),
    st.tuples(st.integers(0, 5000), st.binary(max_size=40)).map(lambda t: uvarint(t[0]) + t[1]),
    st.binary(max_size=120),
)

CUTS = st.lists(st.integers(0, 4000), max_size=8)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run_handshake(hs: Handshake, wire: bytes, cuts: list[int]) -> tuple[bytes, type | None]:
    """Feed ``wire`` in pieces: (bytes we sent back, None or the error class)."""
    sent = b""
    for piece in pieces(wire, cuts):
        kind, result = outcome(hs.receive, piece)
        if kind == "error":
            assert issubclass(result, ProtocolError), result
            assert not hs.done
            # a handshake that failed refuses to go on
            assert outcome(hs.receive, b"")[1] is HandshakeError
            assert outcome(hs.session)[1] is HandshakeError
            return sent, result
        sent += result
    return sent, None


# ---- the handshake ---------------------------------------------------------------------------


@fuzz_settings(150)
@given(
    wire=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=40).map(lambda tail: NODE_KEY_MESSAGE + tail),
        mutated(NODE_KEY_MESSAGE),
        st.binary(min_size=32, max_size=32).map(lambda k: b"\x22\x0a\x20" + k),
        st.sampled_from(VECTOR_FRAMES).map(lambda f: NODE_KEY_MESSAGE + f),
    ),
    cuts=CUTS,
)
def test_handshake_raw_peer_bytes(frame_kernel: ModuleType, wire: bytes, cuts: list[int]) -> None:
    hs = signer_handshake()
    sent, error = run_handshake(hs, wire, cuts)
    # once the peer's key is in, we answer with exactly one sealed AuthSigMessage frame
    assert len(sent) in (0, SEALED)
    if not hs.done:
        return
    # Only the vector node's genuine frame can complete it.
    assert error is None
    assert hs.remote_identity == NODE_IDENTITY


@fuzz_settings(100)
@given(
    point=st.one_of(
        st.sampled_from(sorted(LOW_ORDER_POINTS)),
        st.binary(min_size=32, max_size=32),
        st.just(h(SIGNER["eph_x25519_pub_hex"])),  # our own key, reflected
    ),
    high_bit=st.booleans(),
)
def test_handshake_peer_ephemeral_keys(
    frame_kernel: ModuleType, point: bytes, high_bit: bool
) -> None:
    if high_bit:
        point = point[:31] + bytes((point[31] | 0x80,))
    hs = signer_handshake()
    kind, result = outcome(hs.receive, b"\x22\x0a\x20" + point)
    canonical = point[:31] + bytes((point[31] & 0x7F,))
    if canonical in LOW_ORDER_POINTS:
        assert result is LowOrderPointError
    elif kind == "error":
        assert issubclass(result, HandshakeError)
    else:
        assert len(result) == SEALED and hs.challenge is not None


@fuzz_settings(200)
@given(
    plaintext=AUTH_PLAINTEXT,
    extra=st.binary(max_size=50),
    frame_size=st.integers(1, CHUNK),
    tail=st.lists(FRAME, max_size=2),
    cuts=CUTS,
)
def test_handshake_authenticated_peer_plaintext(
    frame_kernel: ModuleType,
    plaintext: bytes,
    extra: bytes,
    frame_size: int,
    tail: list[tuple[int, bytes]],
    cuts: list[int],
) -> None:
    """The peer knows the keys: any AuthSigMessage plaintext, in frames of any size."""
    stream = plaintext + extra
    plan = [
        (len(c), c) for c in (stream[i : i + frame_size] for i in range(0, len(stream), frame_size))
    ]
    wire = NODE_KEY_MESSAGE + seal_stream(NODE_SEND_KEY, plan + tail)
    hs = signer_handshake()
    _, error = run_handshake(hs, wire, cuts)
    if not hs.done:
        return
    assert error is None
    assert hs.remote_identity == NODE_IDENTITY
    # Whatever followed the AuthSigMessage reaches the session: the rest of its frame(s)
    # first, then the frames the handshake did not need to open.
    size, pos = _read_uvarint(stream)
    expected = stream[pos + size :]
    expected_error = None
    for length, chunk in tail:
        if length > CHUNK:
            expected_error = FrameError
            break
        expected += chunk
    kind, result = outcome(hs.session().feed, b"")
    assert (kind, result) == (("error", expected_error) if expected_error else ("ok", expected))


def _read_uvarint(data: bytes) -> tuple[int, int]:
    value = 0
    for i, b in enumerate(data):
        value |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            return value, i + 1
    raise ValueError("no complete varint")


# ---- the session stream -----------------------------------------------------------------------

SESSION_KEY = h(SIGNER["recv_key_hex"])

# A segment of the incoming stream: an authentic frame, or a bad one.
SEGMENT = st.one_of(
    st.tuples(st.just("frame"), st.binary(max_size=CHUNK)),
    st.tuples(st.just("frame"), st.binary(max_size=30)),
    st.tuples(st.just("forged"), st.binary(min_size=SEALED, max_size=SEALED)),
    st.tuples(st.just("tampered"), st.integers(0, SEALED - 1)),
    st.tuples(st.just("too_long"), st.integers(CHUNK + 1, (1 << 32) - 1)),
    st.tuples(st.just("replayed"), st.just(b"")),
)


@fuzz_settings(200)
@given(
    segments=st.lists(SEGMENT, max_size=6),
    tail=st.binary(max_size=SEALED - 1),
    pending=st.binary(max_size=20),
    cuts=CUTS,
)
def test_session_feed_stream(
    frame_kernel: ModuleType,
    segments: list[tuple[str, object]],
    tail: bytes,
    pending: bytes,
    cuts: list[int],
) -> None:
    wire = bytearray()
    expected = bytearray(pending)
    error: type | None = None
    last_frame = seal_raw(SESSION_KEY, U64 - 2, 0, b"")  # not a frame this session accepts
    for counter, (kind, arg) in enumerate(segments):
        if kind == "frame":
            assert isinstance(arg, bytes)
            frame = seal_raw(SESSION_KEY, counter, len(arg), arg)
            last_frame = frame
            if error is None:
                expected += arg
        elif kind == "forged":
            assert isinstance(arg, bytes)
            frame = arg
            error = error or AuthenticationError
        elif kind == "tampered":
            assert isinstance(arg, int)
            frame = bytearray(seal_raw(SESSION_KEY, counter, 5, b"hello"))
            frame[arg] ^= 0x01
            error = error or AuthenticationError
        elif kind == "too_long":
            assert isinstance(arg, int)
            frame = seal_raw(SESSION_KEY, counter, arg, b"")
            error = error or FrameError
        else:  # an earlier authentic frame, sent again under the next counter
            frame = last_frame
            error = error or AuthenticationError
        wire += frame
    wire += tail

    sealer = frame_kernel.FrameSealer(bytes(32))
    session = Session(sealer, frame_kernel.FrameOpener(SESSION_KEY), b"peer", plaintext=pending)
    delivered = b""
    failed: type | None = None
    for piece in pieces(bytes(wire), cuts) or [b""]:
        kind, result = outcome(session.feed, piece)
        if kind == "error":
            failed = result
            break
        delivered += result
    assert failed is error
    if error is None:
        assert delivered == expected
    else:
        # the feed that fails returns nothing; everything before it was authentic
        assert expected.startswith(delivered)
        assert issubclass(outcome(session.feed, b"")[1], ProtocolError)
        assert issubclass(outcome(session.seal, b"x")[1], ProtocolError)


# ---- the frame opener -----------------------------------------------------------------------

FRAME_INPUT = st.one_of(
    st.tuples(st.integers(0, 3), st.integers(0, (1 << 32) - 1), st.binary(max_size=CHUNK)).map(
        lambda t: ("sealed", t)
    ),
    st.binary(min_size=SEALED, max_size=SEALED).map(lambda b: ("raw", b)),
    st.binary(max_size=2 * SEALED).map(lambda b: ("raw", b)),
    st.sampled_from(VECTOR_FRAMES).map(lambda b: ("raw", b)),
)
START = st.one_of(st.integers(0, 3), st.sampled_from([U64 - 2, U64 - 1]), st.integers(0, U64 - 1))
KEY = st.one_of(st.just(SESSION_KEY), st.binary(min_size=32, max_size=32))


def _frame_bytes(key: bytes, start: int, item: tuple[str, object]) -> bytes:
    kind, arg = item
    if kind == "raw":
        assert isinstance(arg, bytes)
        return arg
    offset, length, chunk = arg  # type: ignore[misc]
    return seal_raw(key, (start + offset) % U64, length, chunk)


@fuzz_settings(150)
@given(key=KEY, start=START, items=st.lists(FRAME_INPUT, min_size=1, max_size=4))
def test_frame_opener_only_protocol_errors(
    kernel_impl: str, key: bytes, start: int, items: list[tuple[str, object]]
) -> None:
    frame = kernel("frame", kernel_impl)
    opener = frame.FrameOpener(key, start)
    for item in items:
        data = _frame_bytes(key, start, item)
        before = opener.nonce
        kind, result = outcome(opener.open, data)
        if kind == "ok":
            length = int.from_bytes(
                ChaCha20Poly1305(key).decrypt(bytes(4) + before.to_bytes(8, "little"), data, None)[
                    :4
                ],
                "little",
            )
            assert len(result) == length <= CHUNK
            assert opener.nonce == before + 1
        else:
            assert issubclass(result, ProtocolError)
            # only an authentic frame with a bad length field consumes its counter
            assert opener.nonce in (before, before + 1)
            assert (opener.nonce == before + 1) == (result is FrameError and len(data) == SEALED)


@fuzz_settings(150)
@given(key=KEY, start=START, items=st.lists(FRAME_INPUT, min_size=1, max_size=4))
def test_frame_opener_twins_agree(key: bytes, start: int, items: list[tuple[str, object]]) -> None:
    compiled, pure = both_kernels("frame")
    a, b = compiled.FrameOpener(key, start), pure.FrameOpener(key, start)
    for item in items:
        data = _frame_bytes(key, start, item)
        assert outcome(a.open, data) == outcome(b.open, data)
        assert outcome(a.open, memoryview(data)) == outcome(b.open, memoryview(data))
        assert a.nonce == b.nonce
