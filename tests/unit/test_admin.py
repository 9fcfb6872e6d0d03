"""The admin socket: in a private directory next to the node's state, never in /tmp."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from nebula import config
from nebula.aio import admin
from nebula.errors import NebulaError, StateError


def _cfg(tmp_path: Path, state_path: str) -> config.LoadedConfig:
    text = config.template("native").replace(
        'state_path = "./nebula_state.json"', f'state_path = "{state_path}"'
    )
    return config.loads(text, tmp_path / "nebula.toml")


def _serve_and_ask(path: Path) -> object:
    async def main() -> object:
        async def status(req: dict) -> dict:
            return {"pong": req.get("x")}

        server = admin.AdminServer(path, {"status": status})
        await server.start()
        try:
            return await asyncio.to_thread(admin.request, path, "status", x=7)
        finally:
            await server.close()

    return asyncio.run(main())


@pytest.mark.parametrize("length", ["short", "longer than sun_path"])
def test_socket_lives_in_a_private_directory_next_to_the_state(tmp_path: Path, length) -> None:
    base = tmp_path if length == "short" else tmp_path / ("d" * 60) / ("e" * 60)
    cfg = _cfg(tmp_path, f"{base}/state.json")
    path = admin.socket_path(cfg)
    assert path == base / "state.json.admin" / "admin.sock"
    assert (len(os.fsencode(path)) > 107) is (length != "short")
    assert _serve_and_ask(path) == {"pong": 7}
    st = os.lstat(path.parent)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()
    assert not path.exists()  # removed on close


def test_raft_socket_is_under_the_data_path(tmp_path: Path) -> None:
    text = config.template("native", persist="raft")
    cfg = config.loads(text, tmp_path / "nebula.toml")
    assert admin.socket_path(cfg) == tmp_path / "raft_data" / "admin" / "admin.sock"


def test_a_permissive_own_directory_is_made_private(tmp_path: Path) -> None:
    d = tmp_path / "state.json.admin"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    assert _serve_and_ask(d / "admin.sock") == {"pong": 7}
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    """Another account could point the directory at one it controls."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    d = tmp_path / "state.json.admin"
    d.symlink_to(elsewhere)
    with pytest.raises(StateError, match="not a directory"):
        _serve_and_ask(d / "admin.sock")
    assert list(elsewhere.iterdir()) == []
    with pytest.raises(NebulaError, match="refusing to talk"):
        admin.request(d / "admin.sock", "status")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's directory")
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "state.json.admin"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(StateError, match="belongs to uid 65534"):
        _serve_and_ask(d / "admin.sock")
    with pytest.raises(NebulaError, match="refusing to talk"):
        admin.request(d / "admin.sock", "status")


def test_no_node_running_is_a_clear_error(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 120) / "state.json.admin" / "admin.sock"
    for path in (tmp_path / "state.json.admin" / "admin.sock", long):
        with pytest.raises(NebulaError, match="node not running"):
            admin.request(path, "status")
