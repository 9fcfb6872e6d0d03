"""Merlin transcripts over the STROBE-128 subset they need (protocol.md §6.3, §6.4).

Only the operations Merlin uses are implemented: meta-AD, AD and PRF.  The Keccak-f[1600]
permutation is the ``keccak`` kernel (compiled, or its pure twin).  Bytes are XORed into
and read out of the sponge a slice at a time, never byte by byte.
"""

from __future__ import annotations

from nebula import _fast

__all__ = ["Strobe128", "Transcript"]

_keccak_f1600 = _fast.load("keccak").keccak_f1600

_R = 166  # STROBE-128 rate: 200 - 2 * 128 / 8 - 2

_FLAG_I = 0x01
_FLAG_A = 0x02
_FLAG_C = 0x04
_FLAG_T = 0x08
_FLAG_M = 0x10
_FLAG_K = 0x20

_MERLIN_PROTOCOL_LABEL = b"Merlin v1.0"
_U32_MAX = 0xFFFFFFFF


class Strobe128:
    """The STROBE-128 duplex, restricted to meta-AD, AD and PRF."""

    __slots__ = ("_cur_flags", "_pending", "_pos", "_pos_begin", "_state")

    def __init__(self, protocol_label: bytes) -> None:
        state = bytearray(200)
        state[0:6] = bytes((1, _R + 2, 1, 0, 1, 96))
        state[6:18] = b"STROBEv1.0.2"
        _keccak_f1600(state)
        self._state = state
        self._pending = bytearray()
        self._pos = 0
        self._pos_begin = 0
        self._cur_flags = 0
        self.meta_ad(protocol_label, more=False)

    # -- operations used by Merlin ---------------------------------------------------

    def meta_ad(self, data: bytes, more: bool) -> None:
        self._begin_op(_FLAG_M | _FLAG_A, more)
        self._absorb(data)

    def ad(self, data: bytes, more: bool) -> None:
        self._begin_op(_FLAG_A, more)
        self._absorb(data)

    def prf(self, n: int, more: bool) -> bytes:
        self._begin_op(_FLAG_I | _FLAG_A | _FLAG_C, more)
        return self._squeeze(n)

    # -- the duplex ------------------------------------------------------------------
    #
    # Absorbed bytes are XORed into the state lazily: ``_pending`` holds bytes that
    # logically sit at state[_pos : _pos + len(_pending)] and are mixed in with one
    # big-integer XOR when the block fills, before a squeeze, or before F runs.  The
    # logical STROBE position is therefore ``_pos + len(_pending)``.

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        state = self._state
        pos = self._pos
        end = pos + len(pending)
        mixed = int.from_bytes(state[pos:end], "little") ^ int.from_bytes(pending, "little")
        state[pos:end] = mixed.to_bytes(end - pos, "little")
        self._pos = end
        pending.clear()

    def _run_f(self) -> None:
        self._flush()
        state = self._state
        state[self._pos] ^= self._pos_begin
        state[self._pos + 1] ^= 0x04
        state[_R + 1] ^= 0x80
        _keccak_f1600(state)
        self._pos = 0
        self._pos_begin = 0

    def _absorb(self, data: bytes) -> None:
        pending = self._pending
        pending += data
        while self._pos + len(pending) >= _R:
            take = _R - self._pos
            rest = pending[take:]
            del pending[take:]
            self._run_f()  # flushes the first `take` bytes, so pos reached R
            pending += rest

    def _squeeze(self, n: int) -> bytes:
        self._flush()
        state = self._state
        out = bytearray()
        while n:
            pos = self._pos
            take = min(_R - pos, n)
            end = pos + take
            out += state[pos:end]
            state[pos:end] = bytes(take)
            n -= take
            self._pos = end
            if end == _R:
                self._run_f()
        return bytes(out)

    def _begin_op(self, flags: int, more: bool) -> None:
        if more:
            if flags != self._cur_flags:
                raise ValueError(
                    f"STROBE: cannot continue operation {self._cur_flags:#x} with flags {flags:#x}"
                )
            return
        if flags & _FLAG_T:
            raise ValueError("STROBE: transport operations are not supported")
        old_begin = self._pos_begin
        self._pos_begin = self._pos + len(self._pending) + 1
        self._cur_flags = flags
        self._absorb(bytes((old_begin, flags)))
        if flags & (_FLAG_C | _FLAG_K) and self._pos + len(self._pending) != 0:
            self._run_f()


def _le32(n: int, what: str) -> bytes:
    if not 0 <= n <= _U32_MAX:
        raise ValueError(f"merlin: {what} length {n} does not fit in 32 bits")
    return n.to_bytes(4, "little")


class Transcript:
    """A Merlin transcript: ``Transcript(label)``, ``append_message``, ``challenge_bytes``."""

    __slots__ = ("_strobe",)

    def __init__(self, label: bytes) -> None:
        self._strobe = Strobe128(_MERLIN_PROTOCOL_LABEL)
        self.append_message(b"dom-sep", label)

    def append_message(self, label: bytes, message: bytes) -> None:
        strobe = self._strobe
        strobe.meta_ad(label, more=False)
        strobe.meta_ad(_le32(len(message), "message"), more=True)
        strobe.ad(message, more=False)

    def challenge_bytes(self, label: bytes, n: int) -> bytes:
        strobe = self._strobe
        strobe.meta_ad(label, more=False)
        strobe.meta_ad(_le32(n, "challenge"), more=True)
        return strobe.prf(n, more=False)
