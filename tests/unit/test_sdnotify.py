"""sd_notify over a real AF_UNIX datagram socket: paths and abstract names."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from nebula.aio import sdnotify


def test_addresses() -> None:
    assert sdnotify.notify_address(None) is None
    assert sdnotify.notify_address("") is None
    assert sdnotify.notify_address("@abc") == b"\0abc"
    assert sdnotify.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.notify_address("relative/path") is None


def test_not_under_systemd_sends_nothing(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_reaches_the_socket(tmp_path: Path, monkeypatch, kind) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        if kind == "path":
            s.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        else:
            name = f"nebula-unit-notify-{os.getpid()}"
            s.bind(b"\0" + name.encode())
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        s.settimeout(5)
        assert sdnotify.notify("READY=1", "STATUS=serving") is True
        assert s.recv(4096) == b"READY=1\nSTATUS=serving"


def test_a_dead_socket_is_logged_not_raised(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert sdnotify.notify("READY=1") is False
    assert "cannot notify systemd" in caplog.text
