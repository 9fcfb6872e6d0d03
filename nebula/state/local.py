"""Single-node durable state (``persist = "local"``).

The state file holds the last sign state of every chain.  Each accepted decision
is written to a temporary file, fsync'ed, renamed over the state file, and the
directory is fsync'ed — all before ``commit`` returns, so before any signature
leaves (S1).  A crash at any point leaves either the old or the new file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nebula.errors import StateError
from nebula.guard import Decision, SignRecord, Verdict, apply
from nebula.state.base import SignStore, record_from_json, record_to_json

FORMAT_VERSION = 1


class LocalStore(SignStore):
    def __init__(self, path: str | Path, initial: dict[str, SignRecord | None] | None = None):
        self.path = Path(path)
        self._states: dict[str, SignRecord] = {}
        self._load()
        # An imported initial state only ever raises the high-water mark (S4).
        changed = False
        for chain_id, rec in (initial or {}).items():
            if rec is None:
                continue
            cur = self._states.get(chain_id)
            if cur is None or rec.hrs > cur.hrs:
                self._states[chain_id] = rec
                changed = True
        if changed or not self.path.exists():
            self._write(self._states)

    # -- persistence -------------------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StateError(f"{self.path}: cannot read state file: {e}") from None
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise StateError(
                f"{self.path}: state file is corrupted ({e}); refusing to start. Restore it "
                "from a backup or import the last known state with `nebula state import`."
            ) from None
        if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
            raise StateError(f"{self.path}: not a Nebula state file (version {FORMAT_VERSION})")
        chains = obj.get("chains")
        if not isinstance(chains, dict):
            raise StateError(f"{self.path}: 'chains' must be an object")
        for chain_id, st in chains.items():
            rec = record_from_json(st, f"{self.path} chain {chain_id!r}")
            if rec is not None:
                self._states[chain_id] = rec

    def _write(self, states: dict[str, SignRecord]) -> None:
        data = json.dumps(
            {
                "version": FORMAT_VERSION,
                "chains": {c: record_to_json(r) for c, r in sorted(states.items())},
            },
            indent=1,
        ).encode()
        d = self.path.parent
        tmp = d / f".{self.path.name}.tmp"
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise StateError(f"{self.path}: cannot persist sign state: {e}") from None

    # -- SignStore ---------------------------------------------------------------------

    def last(self, chain_id: str) -> SignRecord | None:
        return self._states.get(chain_id)

    def all(self) -> dict[str, SignRecord]:
        return dict(self._states)

    async def commit(self, chain_id: str, record: SignRecord) -> Decision:
        return self.commit_sync(chain_id, record)

    def commit_sync(self, chain_id: str, record: SignRecord) -> Decision:
        cur = self._states.get(chain_id)
        new, decision = apply(cur, record)
        if decision.verdict == Verdict.ACCEPT and new is not None:
            states = dict(self._states)
            states[chain_id] = new
            self._write(states)  # raises StateError: nothing is released
            self._states = states
        return decision

    async def raise_to(self, chain_id: str, rec: SignRecord) -> None:
        self.force_import(chain_id, rec)

    def force_import(self, chain_id: str, rec: SignRecord | None) -> None:
        """Raise the high-water mark to ``rec`` (never lowers it)."""
        if rec is None:
            return
        cur = self._states.get(chain_id)
        if cur is not None and rec.hrs <= cur.hrs:
            return
        states = dict(self._states)
        states[chain_id] = rec
        self._write(states)
        self._states = states
