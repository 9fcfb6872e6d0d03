"""Keccak-f[1600] (both twins) and the merlin transcript built on it."""

from __future__ import annotations

import hashlib
import random

import pytest

from nebula._fast import keccak_py
from nebula.crypto import merlin
from tests.conftest import kernel
from tests.support.vectors import h, load


@pytest.fixture
def keccak(kernel_impl: str, monkeypatch: pytest.MonkeyPatch):
    """The keccak kernel under test, also wired into the merlin module."""
    mod = kernel("keccak", kernel_impl)
    monkeypatch.setattr(merlin, "_keccak_f1600", mod.keccak_f1600)
    return mod


def _sha3_256(permute, message: bytes) -> bytes:
    """SHA3-256 as a plain sponge over ``permute`` (rate 136, pad 0x06 ... 0x80)."""
    rate = 136
    padded = bytearray(message) + b"\x06" + bytes(-(len(message) + 1) % rate)
    padded[-1] |= 0x80
    state = bytearray(200)
    for off in range(0, len(padded), rate):
        for i, byte in enumerate(padded[off : off + rate]):
            state[i] ^= byte
        permute(state)
    return bytes(state[:32])


def test_sha3_256_of_empty_string_self_test(keccak) -> None:
    state = bytearray(200)
    state[0] ^= 0x06
    state[135] ^= 0x80
    keccak.keccak_f1600(state)
    assert bytes(state[:32]) == hashlib.sha3_256(b"").digest()


@pytest.mark.parametrize("size", [0, 1, 135, 136, 137, 300, 1000])
def test_sha3_256_sponge_matches_hashlib(keccak, size: int) -> None:
    message = random.Random(size).randbytes(size)
    assert _sha3_256(keccak.keccak_f1600, message) == hashlib.sha3_256(message).digest()


def test_permutation_matches_pure_twin_on_random_states(keccak) -> None:
    rng = random.Random(1600)
    for _ in range(50):
        a = bytearray(rng.randbytes(200))
        b = bytearray(a)
        keccak.keccak_f1600(a)
        keccak_py.keccak_f1600(b)
        assert a == b


def test_permutation_is_in_place_and_changes_state(keccak) -> None:
    state = bytearray(200)
    same = state
    keccak.keccak_f1600(state)
    assert state is same
    assert state != bytearray(200)


@pytest.mark.parametrize("size", [0, 199, 201])
def test_permutation_rejects_wrong_size(keccak, size: int) -> None:
    with pytest.raises(ValueError, match="200 bytes"):
        keccak.keccak_f1600(bytearray(size))


def test_permutation_rejects_immutable_state(keccak) -> None:
    with pytest.raises(TypeError):
        keccak.keccak_f1600(bytes(200))


def test_derived_constants_match_fips202_first_values() -> None:
    # FIPS 202 Table 2 (rho offsets r[x, y]) and the first iota constants.
    assert keccak_py.ROTATION_OFFSETS[1] == 1  # (1, 0)
    assert keccak_py.ROTATION_OFFSETS[5] == 36  # (0, 1)
    assert keccak_py.ROTATION_OFFSETS[24] == 14  # (4, 4)
    assert keccak_py.ROUND_CONSTANTS[:2] == (0x1, 0x8082)
    assert keccak_py.ROUND_CONSTANTS[23] == 0x8000000080008008


def _vector(name: str) -> dict:
    return next(v for v in load("merlin")["vectors"] if v["name"] == name)


def test_merlin_simple_vector(keccak) -> None:
    t = merlin.Transcript(b"test protocol")
    t.append_message(b"some label", b"some data")
    assert t.challenge_bytes(b"challenge", 32) == h(_vector("simple")["expected_hex"])


def test_merlin_complex_vector(keccak) -> None:
    t = merlin.Transcript(b"test protocol")
    t.append_message(b"step1", b"some data")
    data = b"\x63" * 1024
    challenge = b""
    for _ in range(32):
        challenge = t.challenge_bytes(b"challenge", 32)
        t.append_message(b"bigdata", data)
        t.append_message(b"challengedata", challenge)
    assert challenge == h(_vector("complex")["expected_hex"])


def test_transcript_depends_on_every_input(keccak) -> None:
    def run(label: bytes, msg_label: bytes, msg: bytes) -> bytes:
        t = merlin.Transcript(label)
        t.append_message(msg_label, msg)
        return t.challenge_bytes(b"c", 32)

    base = run(b"proto", b"l", b"m")
    assert (
        len(
            {base, run(b"proto2", b"l", b"m"), run(b"proto", b"L", b"m"), run(b"proto", b"l", b"M")}
        )
        == 4
    )
    # Label/message boundaries are framed by the length, so shifting bytes changes the output.
    assert run(b"proto", b"lm", b"") != run(b"proto", b"l", b"m")


def test_long_challenge_spans_several_blocks_consistently(keccak) -> None:
    t1 = merlin.Transcript(b"x")
    t2 = merlin.Transcript(b"x")
    long = t1.challenge_bytes(b"c", 400)
    assert len(long) == 400
    assert t2.challenge_bytes(b"c", 400) == long
    assert merlin.Transcript(b"x").challenge_bytes(b"c", 32) != long[:32]  # length is bound in


def test_challenge_length_must_fit_u32() -> None:
    with pytest.raises(ValueError, match="32 bits"):
        merlin.Transcript(b"x").challenge_bytes(b"c", 1 << 32)


def test_strobe_refuses_to_continue_a_different_operation() -> None:
    s = merlin.Strobe128(b"p")
    s.meta_ad(b"a", more=False)
    with pytest.raises(ValueError, match="cannot continue"):
        s.ad(b"b", more=True)
