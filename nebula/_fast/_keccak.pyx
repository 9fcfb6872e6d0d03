# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Keccak-f[1600] (FIPS 202), compiled twin of ``keccak_py.py``.

The permutation runs on 25 uint64 lanes in C; the only Python-level work per call is
the argument check.  Lane (x, y) is the little-endian word at byte 8 * (x + 5y).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* iota round constants (FIPS 202 Algorithm 6); keccak_py derives the same values. */
    static const uint64_t NEB_KECCAK_RC[24] = {
        0x0000000000000001ULL, 0x0000000000008082ULL, 0x800000000000808aULL, 0x8000000080008000ULL,
        0x000000000000808bULL, 0x0000000080000001ULL, 0x8000000080008081ULL, 0x8000000000008009ULL,
        0x000000000000008aULL, 0x0000000000000088ULL, 0x0000000080008009ULL, 0x000000008000000aULL,
        0x000000008000808bULL, 0x800000000000008bULL, 0x8000000000008089ULL, 0x8000000000008003ULL,
        0x8000000000008002ULL, 0x8000000000000080ULL, 0x000000000000800aULL, 0x800000008000000aULL,
        0x8000000080008081ULL, 0x8000000000008080ULL, 0x0000000080000001ULL, 0x8000000080008008ULL
    };

    static inline uint64_t neb_load64_le(const unsigned char *p) {
        uint64_t v;
        memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }

    static inline void neb_store64_le(unsigned char *p, uint64_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        memcpy(p, &v, 8);
    }
    """
    const uint64_t NEB_KECCAK_RC[24]
    uint64_t neb_load64_le(const unsigned char *p) nogil
    void neb_store64_le(unsigned char *p, uint64_t v) nogil


cdef inline uint64_t rotl(uint64_t v, unsigned int n) noexcept nogil:
    return (v << n) | (v >> (64 - n))  # n is 1..63 at every call site


cdef void _permute(uint64_t *a) noexcept nogil:
    cdef uint64_t c0, c1, c2, c3, c4, d0, d1, d2, d3, d4, b0, b1, b2, b3, b4
    cdef uint64_t b[25]
    cdef int rnd, y
    for rnd in range(24):
        # theta
        c0 = a[0] ^ a[5] ^ a[10] ^ a[15] ^ a[20]
        c1 = a[1] ^ a[6] ^ a[11] ^ a[16] ^ a[21]
        c2 = a[2] ^ a[7] ^ a[12] ^ a[17] ^ a[22]
        c3 = a[3] ^ a[8] ^ a[13] ^ a[18] ^ a[23]
        c4 = a[4] ^ a[9] ^ a[14] ^ a[19] ^ a[24]
        d0 = c4 ^ rotl(c1, 1)
        d1 = c0 ^ rotl(c2, 1)
        d2 = c1 ^ rotl(c3, 1)
        d3 = c2 ^ rotl(c4, 1)
        d4 = c3 ^ rotl(c0, 1)
        # rho and pi: lane i = x + 5y is rotated by r[x, y] and lands at y + 5 * ((2x + 3y) % 5)
        b[0] = a[0] ^ d0
        b[10] = rotl(a[1] ^ d1, 1)
        b[20] = rotl(a[2] ^ d2, 62)
        b[5] = rotl(a[3] ^ d3, 28)
        b[15] = rotl(a[4] ^ d4, 27)
        b[16] = rotl(a[5] ^ d0, 36)
        b[1] = rotl(a[6] ^ d1, 44)
        b[11] = rotl(a[7] ^ d2, 6)
        b[21] = rotl(a[8] ^ d3, 55)
        b[6] = rotl(a[9] ^ d4, 20)
        b[7] = rotl(a[10] ^ d0, 3)
        b[17] = rotl(a[11] ^ d1, 10)
        b[2] = rotl(a[12] ^ d2, 43)
        b[12] = rotl(a[13] ^ d3, 25)
        b[22] = rotl(a[14] ^ d4, 39)
        b[23] = rotl(a[15] ^ d0, 41)
        b[8] = rotl(a[16] ^ d1, 45)
        b[18] = rotl(a[17] ^ d2, 15)
        b[3] = rotl(a[18] ^ d3, 21)
        b[13] = rotl(a[19] ^ d4, 8)
        b[14] = rotl(a[20] ^ d0, 18)
        b[24] = rotl(a[21] ^ d1, 2)
        b[9] = rotl(a[22] ^ d2, 61)
        b[19] = rotl(a[23] ^ d3, 56)
        b[4] = rotl(a[24] ^ d4, 14)
        # chi, row by row
        for y in range(0, 25, 5):
            b0 = b[y]
            b1 = b[y + 1]
            b2 = b[y + 2]
            b3 = b[y + 3]
            b4 = b[y + 4]
            a[y] = b0 ^ (~b1 & b2)
            a[y + 1] = b1 ^ (~b2 & b3)
            a[y + 2] = b2 ^ (~b3 & b4)
            a[y + 3] = b3 ^ (~b4 & b0)
            a[y + 4] = b4 ^ (~b0 & b1)
        # iota
        a[0] ^= NEB_KECCAK_RC[rnd]


def keccak_f1600(bytearray state not None) -> None:
    """Apply Keccak-f[1600] to a 200-byte state, in place."""
    if PyByteArray_GET_SIZE(state) != 200:
        raise ValueError("keccak_f1600 needs a bytearray of exactly 200 bytes")
    cdef unsigned char *p = <unsigned char *>PyByteArray_AS_STRING(state)
    cdef uint64_t lanes[25]
    cdef int i
    for i in range(25):
        lanes[i] = neb_load64_le(p + 8 * i)
    _permute(lanes)
    for i in range(25):
        neb_store64_le(p + 8 * i, lanes[i])
