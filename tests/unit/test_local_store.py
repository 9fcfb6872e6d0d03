"""The fsync'ed single-node store."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from nebula.errors import StateError
from nebula.guard import SignRecord, Verdict
from nebula.state.base import load_priv_validator_state, record_to_json
from nebula.state.local import LocalStore


def r(h: int, s: int = 2, sb: bytes = b"\x01sb", sig: bytes = b"sig") -> SignRecord:
    return SignRecord(h, 0, s, sb + bytes([h % 256]), sig)


def test_state_survives_reopen(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    assert asyncio.run(s.commit("c", r(5))).verdict == Verdict.ACCEPT
    assert LocalStore(p).last("c") == r(5)
    assert oct(p.stat().st_mode & 0o777) == "0o600"


def test_refused_decision_does_not_write(tmp_path) -> None:
    p = tmp_path / "state.json"
    s = LocalStore(p)
    s.commit_sync("c", r(5))
    before = p.read_bytes()
    d = s.commit_sync("c", r(4))
    assert d.verdict == Verdict.REFUSE
    assert p.read_bytes() == before


def test_every_accept_is_fsynced_before_commit_returns(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    s = LocalStore(tmp_path / "state.json")
    calls.clear()
    s.commit_sync("c", r(1))
    assert len(calls) == 2  # the file and its directory
    calls.clear()
    s.commit_sync("c", r(1))  # identical retry: nothing new to persist
    assert calls == []


def test_write_failure_refuses(tmp_path, monkeypatch) -> None:
    s = LocalStore(tmp_path / "state.json")

    def boom(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(StateError):
        s.commit_sync("c", r(1))
    assert s.last("c") is None  # nothing was released, the in-memory mark did not move


def test_initial_state_only_raises_the_mark(tmp_path) -> None:
    p = tmp_path / "state.json"
    LocalStore(p).commit_sync("c", r(10))
    assert LocalStore(p, {"c": r(3)}).last("c") == r(10)
    assert LocalStore(p, {"c": r(20)}).last("c") == r(20)


def test_corrupted_state_file_refuses_to_start(tmp_path) -> None:
    p = tmp_path / "state.json"
    p.write_text("{not json")
    with pytest.raises(StateError, match="corrupted"):
        LocalStore(p)


def test_priv_validator_state_json_round_trip(tmp_path) -> None:
    rec = SignRecord(36, 0, 3, bytes.fromhex("7608"), b"\x01" * 64)
    f = tmp_path / "priv_validator_state.json"
    f.write_text(json.dumps(record_to_json(rec)))
    assert load_priv_validator_state(f) == rec
    f.write_text('{"height": "0", "round": 0, "step": 0}')
    assert load_priv_validator_state(f) is None
    f.write_text('{"height": "x"}')
    with pytest.raises(StateError):
        load_priv_validator_state(f)
