"""The store interface: where signing decisions become durable.

A store owns the last sign state per chain and is the only authority on it
(design.md S2).  ``commit`` runs :func:`nebula.guard.apply` atomically and makes
an accepted record durable (fsync'ed file, or committed by a Raft majority whose
members fsync'ed it) **before** it returns; the caller releases a signature only
from the returned :class:`~nebula.guard.Decision`.

:class:`SignStore` says what every store offers, so that the daemon and the service
never ask a store what it can do:

==========================  =================================================================
``last`` / ``all``          the durable mark of one chain / of every chain
``commit``                  the check-and-set, durable before an ACCEPT returns
``raise_to``                raise a chain's mark (an import; never lowers it)
``is_authoritative``        may this node answer validators now (leader with quorum)
``on_role_change``          be told when authority is gained or lost
``status``                  a JSON-able description (``role``, ``chains``, Raft details)
``transfer_leadership``     move leadership; ``add_member`` / ``remove_member``: membership
``compact``                 compact the log (snapshot)
``replicated``              True when a decision is durable only once a majority holds it
``inline``                  True when ``commit`` completes without waiting, save for decisions
                            that share a loop pass's write (and needs no current task)
``begin_commit``            ``commit`` with a callback for its outcome instead of a coroutine
                            (``begins_commits``: the Raft store)
``close``                   release files, sockets and locks
==========================  =================================================================

:class:`SingleNodeStore` is the single-machine side of that contract (always
authoritative, no roles, and the cluster operations raise :class:`ConfigError` naming
the setting they need); the local file store and in-memory test stores build on it.
The Raft store implements every method itself.
"""

from __future__ import annotations

import base64
import binascii
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from nebula.errors import ConfigError, DecodeError, StateError
from nebula.guard import Decision, SignRecord
from nebula.proto import canonical_chain_id
from nebula.types import Resolver, Signed

#: ``sign_later(msgs, done)``: have ``msgs`` signed off the event loop thread and call
#: ``done`` on the loop (a backend's ``sign_later``, nebula.crypto.signworker).
SignLater = Callable[[tuple[bytes, ...], Signed], None]

COMMIT_TIMEOUT_MAX = 4.0
"""Longest a store may wait for one decision to become durable (seconds, exclusive).

CometBFT gives up on its signer after 5 s; the decision, the signature and the answer
must all fit in that.  ``raft.commit_timeout`` in the config and every store check
their value against this one bound (:func:`check_commit_timeout`)."""


def check_commit_timeout(value: float, where: str) -> float:
    """``value`` if it is in (0, :data:`COMMIT_TIMEOUT_MAX`); else ConfigError at ``where``."""
    if not 0 < value < COMMIT_TIMEOUT_MAX:  # NaN too
        raise ConfigError(
            f"{where} must be in (0, {COMMIT_TIMEOUT_MAX:g}) seconds, got {value} "
            "(CometBFT gives up on its signer after 5 s)"
        )
    return float(value)


class SignStore(ABC):
    """What every store offers (see the module docstring)."""

    #: True when a decision is durable only once a majority of a cluster holds it
    #: (Raft); False when this process's own fsync makes it durable.  A cluster store
    #: inherits True; :class:`SingleNodeStore` says False.
    replicated: ClassVar[bool] = True
    #: True when ``commit`` decides and makes the decision durable before it first waits
    #: (it waits only to share a write with decisions of the same loop pass) and never
    #: needs a current task (no ``asyncio.timeout``): the validator connection then
    #: answers inside its socket callback (``nebula.aio.conn``).  False for Raft.
    inline: ClassVar[bool] = False
    #: True when :meth:`begin_commit` starts a non-threshold decision without a coroutine
    #: (the Raft store): the validator connection then answers from the callback that
    #: ends the decision, with no task or future per request (``nebula.aio.conn``).
    begins_commits: ClassVar[bool] = False

    @abstractmethod
    def last(self, chain_id: str) -> SignRecord | None:
        """The last durable sign state of ``chain_id`` (None if never signed)."""

    def last_for_export(self, chain_id: str) -> SignRecord | None:
        """:meth:`last`, for an export that another signer will trust: raises
        :class:`~nebula.errors.Unavailable` while it may be lower than this store will
        hold (a Raft chain whose configured initial state is not applied yet)."""
        return self.last(chain_id)

    def combine_seconds(self, chain_id: str) -> float:
        """Of the last ``commit`` of ``chain_id``: the seconds that went into making its
        signature inside the store (threshold BLS: gathering, combining and verifying
        the members' shares after the decision; ``sign_later``: from the hand-over to
        the signatures' return, before it); 0 when the store only decides."""
        return 0.0

    @abstractmethod
    def all(self) -> dict[str, SignRecord]:
        """The last durable sign state of every chain this store knows."""

    @abstractmethod
    async def commit(
        self, chain_id: str, record: SignRecord, sign_later: SignLater | None = None
    ) -> Decision:
        """Check-and-set ``record``; durable before an ACCEPT returns.

        Raises a :class:`~nebula.errors.SigningRefused` subclass when the outcome is
        unknown (timeout, lost quorum, I/O error): the caller must release nothing.

        ``sign_later`` (a Raft store's only): ``record`` carries no signatures yet;
        the store has its sign bytes (and extension sign bytes) signed with it and
        decides the signed record (a failed signing is a refusal, nothing decided).
        """

    def begin_commit(
        self,
        chain_id: str,
        record: SignRecord,
        sign_later: SignLater | None,
        answer: Resolver,
    ) -> bool:
        """:meth:`commit` without a coroutine, where ``begins_commits``: ``answer(decision,
        None)`` or ``answer(None, error)`` follows once, from a later callback; raises
        like :meth:`commit` when nothing could be set on its way.  False: not offered
        for this chain (use :meth:`commit`); nothing was started."""
        return False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin serving (a replicated store binds its port here)."""

    @abstractmethod
    async def raise_to(self, chain_id: str, record: SignRecord) -> bool:
        """Raise the mark of ``chain_id`` to ``record`` if that is higher (an import).

        Never lowers it.  True if the mark moved.
        """

    @abstractmethod
    def is_authoritative(self) -> bool:
        """True if this node may answer validators now."""

    @abstractmethod
    def on_role_change(self, callback: Callable[[bool], Any]) -> Callable[[], None]:
        """Call ``callback(is_authoritative)`` whenever authority is gained or lost.

        Returns a function that unregisters the callback.
        """

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """A JSON-able description: at least ``role``, ``authoritative`` and ``chains``."""

    @abstractmethod
    async def transfer_leadership(self, to: int | None = None, timeout: float = 5.0) -> int:
        """Move leadership to node ``to`` (any up-to-date member if None); the new leader."""

    @abstractmethod
    async def add_member(self, node_id: int, address: str) -> None:
        """Add a cluster member."""

    @abstractmethod
    async def remove_member(self, node_id: int) -> None:
        """Remove a cluster member."""

    @abstractmethod
    def compact(self) -> None:
        """Compact the store's log now (a snapshot), where it keeps one."""

    @abstractmethod
    async def close(self) -> None:
        """Release files, sockets and locks; the store is unusable afterwards."""


def _needs_raft(what: str) -> ConfigError:
    return ConfigError(f"{what} needs persist = 'raft' (this node runs a single-node store)")


class SingleNodeStore(SignStore):
    """A store whose decisions are durable on this machine alone: always authoritative,
    no roles to change, no members to manage."""

    replicated: ClassVar[bool] = False

    def is_authoritative(self) -> bool:
        return True

    def on_role_change(self, callback: Callable[[bool], Any]) -> Callable[[], None]:
        # The role never changes: the callback is never called.
        return lambda: None

    def status(self) -> dict[str, Any]:
        return {
            "role": "standalone",
            "authoritative": True,
            "chains": {c: record_to_json(r) for c, r in sorted(self.all().items())},
        }

    async def transfer_leadership(self, to: int | None = None, timeout: float = 5.0) -> int:
        raise _needs_raft("leadership transfer")

    async def add_member(self, node_id: int, address: str) -> None:
        raise _needs_raft("membership changes")

    async def remove_member(self, node_id: int) -> None:
        raise _needs_raft("membership changes")

    def compact(self) -> None:
        return None  # no log to compact

    async def close(self) -> None:
        return None


# ---- CometBFT priv_validator_state.json compatibility ---------------------------------


def record_to_json(rec: SignRecord) -> dict[str, Any]:
    """CometBFT's priv_validator_state.json layout (plus Nebula's extension fields)."""
    out: dict[str, Any] = {"height": str(rec.height), "round": rec.round, "step": rec.step}
    if rec.signature:
        out["signature"] = base64.b64encode(rec.signature).decode()
    if rec.sign_bytes:
        out["signbytes"] = rec.sign_bytes.hex().upper()
    if rec.ext_signature:
        out["ext_signature"] = base64.b64encode(rec.ext_signature).decode()
    if rec.ext_sign_bytes:
        out["ext_signbytes"] = rec.ext_sign_bytes.hex().upper()
    return out


def record_json_bytes(rec: SignRecord) -> bytes:
    """``json.dumps(record_to_json(rec), separators=(",", ":")).encode()``, without the
    dict and the JSON encoder (the local store writes one per decision)."""
    parts = [b'{"height":"%d","round":%d,"step":%d' % (rec.height, rec.round, rec.step)]
    if rec.signature:
        parts += (b',"signature":"', binascii.b2a_base64(rec.signature, newline=False), b'"')
    if rec.sign_bytes:
        parts += (b',"signbytes":"', rec.sign_bytes.hex().upper().encode(), b'"')
    if rec.ext_signature:
        parts += (
            b',"ext_signature":"',
            binascii.b2a_base64(rec.ext_signature, newline=False),
            b'"',
        )
    if rec.ext_sign_bytes:
        parts += (b',"ext_signbytes":"', rec.ext_sign_bytes.hex().upper().encode(), b'"')
    parts.append(b"}")
    return b"".join(parts)


#: CometBFT's bounds: a height is an int64, a round an int32, a step one of 0..3.
_FIELD_MAX = {"height": (1 << 63) - 1, "round": (1 << 31) - 1, "step": 3}


def _hrs_field(obj: dict[str, Any], key: str, where: str) -> int:
    """``obj[key]``: an integer or a string of decimal digits (CometBFT writes the height
    as a string), within CometBFT's bounds.  A missing key, a float, a bool or anything
    else is an error: a file that is not a sign state must not read as 0/0/0."""
    if key not in obj:
        raise StateError(f"{where}: not a sign state: no {key!r} field")
    v = obj[key]
    if isinstance(v, str) and v.isascii() and v.isdigit():
        # (past 4300 digits int() raises: any over 20 is out of range anyway)
        n = int(v) if len(v) <= 20 else _FIELD_MAX[key] + 1
    elif isinstance(v, int) and not isinstance(v, bool):
        n = v
    else:
        raise StateError(f"{where}: malformed sign state: {key} {v!r} is not an integer")
    if not 0 <= n <= _FIELD_MAX[key]:
        raise StateError(
            f"{where}: {key} {n} out of range (0 to {_FIELD_MAX[key]}, as in CometBFT)"
        )
    return n


def record_from_json(obj: Any, where: str) -> SignRecord | None:
    """Parse priv_validator_state.json content; None for the initial (0/0/0) state.

    ``height``, ``round`` and ``step`` must be there (CometBFT always writes them) and be
    integers within CometBFT's bounds; other fields (another signer's, e.g. a
    ``block_id``) are ignored."""
    if not isinstance(obj, dict):
        raise StateError(f"{where}: expected a JSON object")
    height = _hrs_field(obj, "height", where)
    rnd = _hrs_field(obj, "round", where)
    step = _hrs_field(obj, "step", where)
    try:
        sig = base64.b64decode(obj.get("signature") or "", validate=True)
        sb = bytes.fromhex(obj.get("signbytes") or "")
        esig = base64.b64decode(obj.get("ext_signature") or "", validate=True)
        esb = bytes.fromhex(obj.get("ext_signbytes") or "")
    except (TypeError, ValueError) as e:
        raise StateError(f"{where}: malformed sign state: {e}") from None
    if height == 0 and rnd == 0 and step == 0 and not sig and not sb:
        return None
    return SignRecord(height, rnd, step, sb, sig, esb, esig)


def check_state_chain(rec: SignRecord | None, chain_id: str, where: str) -> None:
    """A sign state about to be imported for ``chain_id`` must not be another chain's:
    the chain id inside its sign bytes (when it has any) is ``chain_id``.  (Another
    chain's mark would only ever raise this one's - no double sign - but it could stop
    the chain signing until it reaches that height, and this chain's own state would
    still be missing.)"""
    if rec is None or not rec.sign_bytes:
        return
    try:
        inside = canonical_chain_id(rec.sign_bytes)
    except DecodeError as e:
        raise StateError(f"{where}: signbytes are not canonical sign bytes: {e}") from None
    if inside != chain_id:
        raise StateError(
            f"{where}: a sign state of chain {inside!r} (the chain id in its signbytes), "
            f"not of {chain_id!r}"
        )


MAX_STATE_FILE = 1 << 20
"""Bytes read of a ``priv_validator_state.json`` at most (one is well under 4 KiB)."""


def load_priv_validator_state(path: str | Path, chain_id: str | None = None) -> SignRecord | None:
    """Read CometBFT's ``priv_validator_state.json``; with ``chain_id``, it must be that
    chain's (:func:`check_state_chain`)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_STATE_FILE + 1)
        if len(raw) > MAX_STATE_FILE:
            raise StateError(
                f"{p}: too large for a sign state (over {MAX_STATE_FILE} bytes): not a "
                "priv_validator_state.json?"
            )
        obj = json.loads(raw)
    except FileNotFoundError:
        raise StateError(f"{p}: initial state file not found") from None
    except (OSError, ValueError, RecursionError) as e:
        raise StateError(f"{p}: cannot read initial state: {e}") from None
    rec = record_from_json(obj, str(p))
    if chain_id is not None:
        check_state_chain(rec, chain_id, str(p))
    return rec
