"""A Raft data directory is bound to the cluster secret it was created under
(nebula/raft/binding.py): the file's format, a mismatch refused, a missing file bound."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

import pytest

from nebula.errors import StateError
from nebula.raft import binding
from nebula.raft.binding import BINDING_NAME, check_binding

A = b"cluster-secret-of-incarnation-A"
B = b"cluster-secret-of-incarnation-B"


def test_a_fresh_directory_is_bound_and_reopens_under_its_secret(tmp_path: Path) -> None:
    assert check_binding(tmp_path, A) is True
    f = tmp_path / BINDING_NAME
    raw = f.read_bytes()
    want = hmac.new(A, b"nebula raft data directory binding v1", hashlib.sha256).hexdigest()
    assert raw == f"nebula-raft-binding 1 {want}\n".encode()
    assert A not in raw and A.hex().encode() not in raw  # names the secret, never holds it
    assert os.stat(f).st_mode & 0o777 == 0o600
    assert check_binding(tmp_path, A) is False  # already bound: nothing written
    assert f.read_bytes() == raw


def test_another_secret_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    check_binding(tmp_path, A)
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "raft.log").write_bytes(b"old incarnation")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(StateError) as ei:
        check_binding(tmp_path, B)
    msg = str(ei.value)
    assert str(tmp_path / BINDING_NAME) in msg and "different secret" in msg
    assert "wipe" in msg and "delete" in msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_directory_from_before_bindings_is_bound_to_the_configured_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "raft.lock").write_bytes(b"123")
    (tmp_path / "log").mkdir()
    with caplog.at_level(logging.INFO, logger="nebula.raft.binding"):
        assert check_binding(tmp_path, A) is True
    assert "written before cluster bindings (log)" in caplog.text
    with pytest.raises(StateError, match="different secret"):
        check_binding(tmp_path, B)
    caplog.clear()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "raft.lock").write_bytes(b"123")  # the directory's own lock is not data
    with caplog.at_level(logging.INFO, logger="nebula.raft.binding"):
        assert check_binding(fresh, A) is True
    assert "before cluster bindings" not in caplog.text


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a Nebula cluster binding"),
        (b"nebula-raft-binding 1\n", "not a Nebula cluster binding"),
        (b"something-else 1 " + b"a" * 64 + b"\n", "not a Nebula cluster binding"),
        (b"nebula-raft-binding 2 " + b"a" * 64 + b"\n", "format '2'"),
        (b"nebula-raft-binding 1 " + b"A" * 64 + b"\n", "64-digit hex"),
        (b"nebula-raft-binding 1 " + b"a" * 63 + b"\n", "64-digit hex"),
        (b"nebula-raft-binding 1 " + b"a" * 64 + b" x\n", "not a Nebula cluster binding"),
        (b"nebula-raft-binding 1 " + b"a" * 600 + b"\n", "not a Nebula cluster binding"),
        (b"\xff\xfe\x00", "not a Nebula cluster binding"),
    ],
)
def test_a_damaged_binding_is_refused_not_rewritten(
    tmp_path: Path, content: bytes, match: str
) -> None:
    f = tmp_path / BINDING_NAME
    f.write_bytes(content)
    with pytest.raises(StateError, match=match):
        check_binding(tmp_path, A)
    assert f.read_bytes() == content


def test_an_unreadable_binding_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / BINDING_NAME).mkdir()  # reading it raises IsADirectoryError
    with pytest.raises(StateError, match="cannot read the cluster binding"):
        check_binding(tmp_path, A)


def test_the_fingerprint_depends_on_every_byte_of_the_secret() -> None:
    fps = {binding.fingerprint(A[:i] + bytes([A[i] ^ 1]) + A[i + 1 :]) for i in range(len(A))}
    assert len(fps) == len(A) and binding.fingerprint(A) not in fps
