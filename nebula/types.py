"""Plain data types shared by the protocol core, the guard and the service.

These mirror CometBFT's protobuf messages (protocol.md §2-§3) without any
encoding concerns; ``nebula.proto`` turns bytes into these and back.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class SignedMsgType(enum.IntEnum):
    UNKNOWN = 0
    PREVOTE = 1
    PRECOMMIT = 2
    PROPOSAL = 32


class Step(enum.IntEnum):
    """FilePV step numbering (protocol.md §5.1)."""

    NONE = 0
    PROPOSE = 1
    PREVOTE = 2
    PRECOMMIT = 3


class WireFamily(enum.Enum):
    """privval wire families (protocol.md §9)."""

    V0_34 = "v0_34"  # v0.34 and v0.37
    V0_38 = "v0_38"  # v0.38, v0.39, v0.40
    V1_0 = "v1_0"

    @classmethod
    def from_config(cls, version: str) -> WireFamily:
        v = version.strip().lower().replace(".", "_")
        if v.startswith("v") is False:
            v = "v" + v
        table = {
            "v0_34": cls.V0_34,
            "v0_37": cls.V0_34,
            "v0_38": cls.V0_38,
            "v0_39": cls.V0_38,
            "v0_40": cls.V0_38,
            "v1_0": cls.V1_0,
            "v1": cls.V1_0,
        }
        try:
            return table[v]
        except KeyError:
            raise ValueError(
                f"unknown CometBFT version {version!r}; expected one of "
                "v0_34, v0_37, v0_38, v0_39, v0_40, v1_0"
            ) from None


# Go's zero time.Time: what a Go node decodes when the timestamp field is absent.
GO_ZERO_TIME_SECONDS = -62135596800


@dataclass(slots=True)
class Timestamp:
    seconds: int = GO_ZERO_TIME_SECONDS
    nanos: int = 0


@dataclass(slots=True)
class PartSetHeader:
    total: int = 0
    hash: bytes = b""


@dataclass(slots=True)
class BlockID:
    hash: bytes = b""
    part_set_header: PartSetHeader = field(default_factory=PartSetHeader)

    def is_zero(self) -> bool:
        """Nil block (protocol.md §4.3)."""
        return not self.hash and self.part_set_header.total == 0 and not self.part_set_header.hash


@dataclass(slots=True)
class Vote:
    type: int = 0
    height: int = 0
    round: int = 0
    block_id: BlockID = field(default_factory=BlockID)
    timestamp: Timestamp = field(default_factory=Timestamp)
    validator_address: bytes = b""
    validator_index: int = 0
    signature: bytes = b""
    extension: bytes = b""
    extension_signature: bytes = b""


@dataclass(slots=True)
class Proposal:
    type: int = SignedMsgType.PROPOSAL
    height: int = 0
    round: int = 0
    pol_round: int = 0
    block_id: BlockID = field(default_factory=BlockID)
    timestamp: Timestamp = field(default_factory=Timestamp)
    signature: bytes = b""


@dataclass(slots=True)
class RemoteSignerError:
    code: int = 0
    description: str = ""


# ---- requests (node -> signer) -------------------------------------------------------


@dataclass(slots=True)
class PubKeyRequest:
    chain_id: str = ""


@dataclass(slots=True)
class SignVoteRequest:
    vote: Vote = field(default_factory=Vote)
    chain_id: str = ""
    skip_extension_signing: bool = False  # v1.0 only


@dataclass(slots=True)
class SignProposalRequest:
    proposal: Proposal = field(default_factory=Proposal)
    chain_id: str = ""


@dataclass(slots=True)
class PingRequest:
    pass


@dataclass(slots=True)
class SignBytesRequest:
    value: bytes = b""


# ---- responses (signer -> node) ------------------------------------------------------


@dataclass(slots=True)
class PubKeyResponse:
    key_type: str = ""  # "ed25519" | "secp256k1" | "bls12381"
    pub_key: bytes = b""
    error: RemoteSignerError | None = None


@dataclass(slots=True)
class SignedVoteResponse:
    vote: Vote = field(default_factory=Vote)
    error: RemoteSignerError | None = None


@dataclass(slots=True)
class SignedProposalResponse:
    proposal: Proposal = field(default_factory=Proposal)
    error: RemoteSignerError | None = None


@dataclass(slots=True)
class PingResponse:
    pass


@dataclass(slots=True)
class SignBytesResponse:
    signature: bytes = b""
    error: RemoteSignerError | None = None


Request = PubKeyRequest | SignVoteRequest | SignProposalRequest | PingRequest | SignBytesRequest
Response = (
    PubKeyResponse | SignedVoteResponse | SignedProposalResponse | PingResponse | SignBytesResponse
)


def extension_signature_required(family: WireFamily, req: SignVoteRequest) -> bool:
    """Whether the signer must sign the vote's extension (protocol.md §8).

    The one place this rule is written (the protobuf kernels, the signing service and
    the bench workload ask here): only a non-nil precommit, only from v0.38 on; on the
    v0.38 line every one (v0.38.0-v0.38.10 require it and the line has no way to say
    otherwise); on v1.0 unless the node set ``skip_extension_signing``.
    """
    vote = req.vote
    if (
        family is WireFamily.V0_34
        or vote.type != SignedMsgType.PRECOMMIT
        or vote.block_id.is_zero()
    ):
        return False
    return not (family is WireFamily.V1_0 and req.skip_extension_signing)


#: ``done(signatures, None)`` or ``done(None, error)``: how signatures made off the event
#: loop thread come back (a backend's ``sign_later``, nebula.crypto.signworker).
Signed = Callable[[list[bytes] | None, BaseException | None], None]

#: ``resolve(result, None)`` once a decision or proposal is settled, or ``resolve(None,
#: error)`` when it is lost: a store's ``begin_commit`` answer, a Raft proposal's callback.
Resolver = Callable[[Any, BaseException | None], None]
