"""Keccak-f[1600], the FIPS 202 permutation (pure-Python twin of ``_keccak.pyx``).

The state is 200 bytes; lane (x, y) is the 64-bit little-endian word at byte offset
8 * (x + 5 * y).  The rotation offsets and round constants are computed below from
their definitions in FIPS 202 (sections 3.2.2 and 3.2.5) rather than typed in, so this
module is the specification the compiled kernel is tested against.
"""

from __future__ import annotations

__all__ = ["ROTATION_OFFSETS", "ROUND_CONSTANTS", "keccak_f1600"]

_MASK = (1 << 64) - 1
_ROUNDS = 24


def _rotation_offsets() -> tuple[int, ...]:
    """rho offsets r[x + 5y] (FIPS 202 Algorithm 2)."""
    offsets = [0] * 25
    x, y = 1, 0
    for t in range(24):
        offsets[x + 5 * y] = ((t + 1) * (t + 2) // 2) % 64
        x, y = y, (2 * x + 3 * y) % 5
    return tuple(offsets)


def _rc_bit(t: int) -> int:
    """rc(t): the output bit of the LFSR x^8 + x^6 + x^5 + x^4 + 1 (FIPS 202 Algorithm 5)."""
    if t % 255 == 0:
        return 1
    r = 0x01  # R[0] is the least significant bit
    for _ in range(t % 255):
        r <<= 1
        if r & 0x100:
            r ^= 0x171  # R[0] ^= R[8]; R[4] ^= R[8]; R[5] ^= R[8]; R[6] ^= R[8]; drop R[8]
    return r & 1


def _round_constants() -> tuple[int, ...]:
    """iota round constants RC[ir] (FIPS 202 Algorithm 6, w = 64)."""
    constants = []
    for ir in range(_ROUNDS):
        rc = 0
        for j in range(7):
            rc |= _rc_bit(j + 7 * ir) << ((1 << j) - 1)
        constants.append(rc)
    return tuple(constants)


ROTATION_OFFSETS = _rotation_offsets()
ROUND_CONSTANTS = _round_constants()

# pi: the lane at (x, y) moves to (y, 2x + 3y mod 5).
_PI_DEST = tuple(y + 5 * ((2 * x + 3 * y) % 5) for y in range(5) for x in range(5))


def _rotl(v: int, n: int) -> int:
    return ((v << n) | (v >> (64 - n))) & _MASK


def keccak_f1600(state: bytearray) -> None:
    """Apply Keccak-f[1600] to a 200-byte state, in place."""
    if not isinstance(state, bytearray):
        raise TypeError(f"keccak_f1600 needs a bytearray, not {type(state).__name__}")
    if len(state) != 200:
        raise ValueError("keccak_f1600 needs a bytearray of exactly 200 bytes")
    a = [int.from_bytes(state[8 * i : 8 * i + 8], "little") for i in range(25)]
    b = [0] * 25
    for rc in ROUND_CONSTANTS:
        # theta
        c = [a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20] for x in range(5)]
        d = [c[(x - 1) % 5] ^ _rotl(c[(x + 1) % 5], 1) for x in range(5)]
        # rho and pi
        for i in range(25):
            b[_PI_DEST[i]] = _rotl(a[i] ^ d[i % 5], ROTATION_OFFSETS[i])
        # chi
        for y in range(0, 25, 5):
            for x in range(5):
                a[y + x] = b[y + x] ^ (~b[y + (x + 1) % 5] & b[y + (x + 2) % 5])
        # iota
        a[0] ^= rc
    state[:] = b"".join(lane.to_bytes(8, "little") for lane in a)
