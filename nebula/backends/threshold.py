"""The threshold-BLS backend: this member's share of a t-of-n split BLS12-381 key.

It holds no whole key and signs nothing on its own: its public key is the group key
(what CometBFT knows), and the Raft store combines t members' shares after each decision
(:mod:`nebula.state.threshold`).  ``threshold = True`` tells the signing service so.
"""

from __future__ import annotations

from nebula.backends.base import Backend
from nebula.crypto.threshold import KeyShare
from nebula.errors import BackendError


class ThresholdBackend(Backend):
    """Member ``share.index``'s share; the public key is the group key."""

    threshold = True

    def __init__(self, share: KeyShare) -> None:
        self.share = share
        self.key_type = "bls12381"
        self.public_key = share.public.group_public_key

    @property
    def address(self) -> bytes:
        return self.share.public.address

    def verify(self, msg: bytes, sig: bytes) -> bool:
        return self.share.public.verify(msg, sig)  # (the group key, the share's BLS DST)

    async def sign(self, msg: bytes) -> bytes:
        raise BackendError(
            "threshold BLS: a signature is combined from t members' shares by the Raft "
            "store; this member alone cannot sign"
        )

    def __repr__(self) -> str:
        p = self.share.public
        return (
            f"<ThresholdBackend share {self.share.index} of {p.threshold}-of-{p.shares} "
            f"address={p.address.hex().upper()}>"
        )
