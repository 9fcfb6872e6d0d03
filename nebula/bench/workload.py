"""The requests a bench sends: consensus on consecutive heights, as a validator would.

Per height (round 0): a proposal (every ``proposal_every`` heights; 1 = we are always
the proposer), a prevote and a precommit for the proposed block.  Precommits carry a
vote extension in the families that have them (v0.38, v1.0), so the signer signs it
too.  Every request is encoded, length-prefixed, ahead of the run; the expected sign
bytes come along so that each returned signature can be verified afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib

from nebula import proto
from nebula.errors import ConfigError
from nebula.types import (
    BlockID,
    PartSetHeader,
    Proposal,
    SignedMsgType,
    SignProposalRequest,
    SignVoteRequest,
    Timestamp,
    Vote,
    WireFamily,
    extension_signature_required,
)

__all__ = ["KINDS", "Item", "plan"]

KINDS = ("proposal", "prevote", "precommit")
_BASE_TIME = 1_700_000_000


@dataclasses.dataclass(slots=True)
class Item:
    """One planned request."""

    kind: str  # one of KINDS
    height: int
    request: SignVoteRequest | SignProposalRequest
    wire: bytes  # the length-delimited request message
    sign_bytes: bytes
    ext_sign_bytes: bytes  # b"" when no extension signature is expected


def _block(height: int) -> BlockID:
    digest = hashlib.sha256(height.to_bytes(8, "big")).digest()
    return BlockID(digest, PartSetHeader(1, hashlib.sha256(digest).digest()))


def _items_for_height(
    chain_id: str,
    family: WireFamily,
    height: int,
    validator_address: bytes,
    *,
    proposal: bool,
    extension: bytes,
) -> list[Item]:
    block = _block(height)
    ts = Timestamp(_BASE_TIME + height, 0)
    out: list[Item] = []
    if proposal:
        p = Proposal(
            type=SignedMsgType.PROPOSAL,
            height=height,
            round=0,
            pol_round=-1,
            block_id=block,
            timestamp=ts,
        )
        req_p = SignProposalRequest(p, chain_id)
        out.append(
            Item(
                "proposal",
                height,
                req_p,
                proto.encode_delimited(proto.encode_request(req_p, family)),
                proto.proposal_sign_bytes(chain_id, p),
                b"",
            )
        )
    for kind, typ in (("prevote", SignedMsgType.PREVOTE), ("precommit", SignedMsgType.PRECOMMIT)):
        v = Vote(
            type=typ,
            height=height,
            round=0,
            block_id=block,
            timestamp=Timestamp(ts.seconds, 1_000_000 * int(typ)),
            validator_address=validator_address,
            validator_index=0,
            extension=extension if typ == SignedMsgType.PRECOMMIT else b"",
        )
        req_v = SignVoteRequest(v, chain_id)
        ext_sb = (
            proto.vote_extension_sign_bytes(chain_id, v)
            if extension_signature_required(family, req_v)
            else b""
        )
        out.append(
            Item(
                kind,
                height,
                req_v,
                proto.encode_delimited(proto.encode_request(req_v, family)),
                proto.vote_sign_bytes(chain_id, v),
                ext_sb,
            )
        )
    return out


def plan(
    chain_id: str,
    family: WireFamily,
    *,
    start_height: int,
    count: int,
    validator_address: bytes,
    proposal_every: int = 1,
    extension_size: int = 64,
) -> list[Item]:
    """``count`` requests on consecutive heights from ``start_height``."""
    if start_height < 1:
        raise ConfigError(f"start height must be >= 1, got {start_height}")
    if count < 0:
        raise ConfigError(f"request count must be >= 0, got {count}")
    if proposal_every < 0:
        raise ConfigError(f"proposal_every must be >= 0, got {proposal_every}")
    if extension_size < 0 or extension_size > proto.MAX_VOTE_EXTENSION_SIZE:
        raise ConfigError(
            f"extension size must be in 0..{proto.MAX_VOTE_EXTENSION_SIZE}, got {extension_size}"
        )
    extension = b""
    if family is not WireFamily.V0_34:
        extension = (bytes(range(256)) * (extension_size // 256 + 1))[:extension_size]
    items: list[Item] = []
    height = start_height
    while len(items) < count:
        propose = proposal_every > 0 and (height - start_height) % proposal_every == 0
        items.extend(
            _items_for_height(
                chain_id, family, height, validator_address, proposal=propose, extension=extension
            )
        )
        height += 1
    del items[count:]
    return items
