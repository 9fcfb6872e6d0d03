"""The store interface: where signing decisions become durable.

A store owns the last sign state per chain and is the only authority on it
(design.md S2).  ``commit`` runs :func:`nebula.guard.apply` atomically and makes
an accepted record durable (fsync'ed file, or committed by a Raft majority whose
members fsync'ed it) **before** it returns; the caller releases a signature only
from the returned :class:`~nebula.guard.Decision`.
"""

from __future__ import annotations

import base64
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from nebula.errors import StateError
from nebula.guard import Decision, SignRecord


class SignStore(ABC):
    @abstractmethod
    def last(self, chain_id: str) -> SignRecord | None:
        """The last durable sign state of ``chain_id`` (None if never signed)."""

    @abstractmethod
    async def commit(self, chain_id: str, record: SignRecord) -> Decision:
        """Check-and-set ``record``; durable before an ACCEPT returns.

        Raises a :class:`~nebula.errors.SigningRefused` subclass when the outcome is
        unknown (timeout, lost quorum, I/O error): the caller must release nothing.
        """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin serving (a replicated store binds its port here)."""

    def is_authoritative(self) -> bool:
        """True if this node may answer validators now (always for a local store)."""
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


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


def record_from_json(obj: Any, where: str) -> SignRecord | None:
    """Parse priv_validator_state.json content; None for the initial (0/0/0) state."""
    if not isinstance(obj, dict):
        raise StateError(f"{where}: expected a JSON object")
    try:
        height = int(obj.get("height", 0))
        rnd = int(obj.get("round", 0))
        step = int(obj.get("step", 0))
        sig = base64.b64decode(obj.get("signature") or "", validate=True)
        sb = bytes.fromhex(obj.get("signbytes") or "")
        esig = base64.b64decode(obj.get("ext_signature") or "", validate=True)
        esb = bytes.fromhex(obj.get("ext_signbytes") or "")
    except (TypeError, ValueError) as e:
        raise StateError(f"{where}: malformed sign state: {e}") from None
    if height < 0 or rnd < 0 or not 0 <= step <= 3:
        raise StateError(f"{where}: height/round/step out of range: {height}/{rnd}/{step}")
    if height == 0 and rnd == 0 and step == 0 and not sig and not sb:
        return None
    return SignRecord(height, rnd, step, sb, sig, esb, esig)


def load_priv_validator_state(path: str | Path) -> SignRecord | None:
    """Read CometBFT's ``priv_validator_state.json``."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise StateError(f"{p}: initial state file not found") from None
    except (OSError, ValueError) as e:
        raise StateError(f"{p}: cannot read initial state: {e}") from None
    return record_from_json(obj, str(p))
