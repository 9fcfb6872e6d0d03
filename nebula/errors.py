"""The one exception tree of Nebula.

::

    NebulaError
    ├── ConfigError                 bad or unsafe configuration (names the key and the file)
    ├── KeyFileError                unreadable, malformed or over-permissive key/secret file
    │   └── DealRefused             a key generation deal that fails a check (names its dealer)
    ├── ProtocolError               bytes from the peer we cannot accept -> drop the connection
    │   ├── FrameError              uvarint/length/size problems in privval framing
    │   ├── DecodeError             malformed protobuf / unknown message
    │   └── HandshakeError          SecretConnection handshake failed
    │       └── LowOrderPointError  peer's ephemeral key is a low-order point
    │   └── AuthenticationError     a sealed frame failed to open (wrong MAC)
    └── SigningRefused              a request we answer with a RemoteSignerError, signing nothing
        ├── ChainIdMismatch
        ├── DoubleSignRefused       same HRS, conflicting data
        ├── RegressionRefused       height / round / step regression
        ├── InvalidRequest          well-formed protobuf that makes no sense (unknown type, bad ext)
        ├── Unavailable             "cannot decide right now": the connection is dropped
        │   ├── NotLeader           this node is not the Raft leader
        │   └── ReplicationError    Raft timeout, lost quorum, unknown outcome
        ├── StateError              the durable state could not be read or written
        └── BackendError            the signing backend failed (Vault down, wrong key, ...)

``SigningRefused.code`` is the RemoteSignerError code put on the wire; ``wire_error``
is the one place that maps an exception to (code, description).
"""

from __future__ import annotations

from collections.abc import Iterable


class NebulaError(Exception):
    """Root of every error Nebula raises on purpose."""


class ConfigError(NebulaError):
    """The configuration is invalid or unsafe."""


class CredentialRejected(ConfigError):
    """A credential (an HSM PIN) was rejected: retrying it could lock the device, so
    ``nebula start`` exits with status 3, which the systemd unit does not restart."""


class KeyFileError(NebulaError):
    """A key or secret file is missing, malformed or readable by others."""


class DealRefused(KeyFileError):
    """A deal of the dealerless key generation (:mod:`nebula.crypto.dkg`) failed a check;
    ``dealers`` lists the dealers (member indices) whose deals were refused."""

    def __init__(self, message: str, dealers: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.dealers: tuple[int, ...] = tuple(dealers)


class ProtocolError(NebulaError):
    """The peer sent bytes we refuse; the connection is dropped."""


class FrameError(ProtocolError):
    """Broken length-delimited framing (bad uvarint, oversized message)."""


class DecodeError(ProtocolError):
    """Malformed protobuf, or a message that is not a privval request."""


class HandshakeError(ProtocolError):
    """The SecretConnection handshake failed."""


class LowOrderPointError(HandshakeError):
    """The peer's ephemeral X25519 key is a low-order point."""


class AuthenticationError(ProtocolError):
    """A SecretConnection frame failed authentication (wrong MAC or key)."""


class SigningRefused(NebulaError):
    """A request answered with a RemoteSignerError; nothing was signed."""

    code: int = 0
    reason: str = "refused"


class ChainIdMismatch(SigningRefused):
    reason = "chain_id_mismatch"


class DoubleSignRefused(SigningRefused):
    # tmkms uses code 2 for double-sign refusals; we do the same.
    code = 2
    reason = "double_sign"


class RegressionRefused(SigningRefused):
    reason = "regression"


class InvalidRequest(SigningRefused):
    reason = "invalid_request"


class Unavailable(SigningRefused):
    """Nothing was decided and nothing was signed, but another attempt may succeed.

    CometBFT never retries a request answered with a RemoteSignerError (a single
    validator then waits forever for its own vote), but it retries transport errors
    with the identical request.  So these are not answered: the connection is dropped,
    the node retries, and whichever node leads then decides through the guard.
    """


class NotLeader(Unavailable):
    reason = "not_leader"


class ReplicationError(Unavailable):
    reason = "replication"


class StateError(SigningRefused):
    reason = "state"


class BackendError(SigningRefused):
    reason = "backend"


def wire_error(exc: SigningRefused) -> tuple[int, str]:
    """The RemoteSignerError (code, description) for a refusal."""
    return exc.code, str(exc) or exc.reason
