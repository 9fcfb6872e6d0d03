"""Bad admin requests get an answer, and the CLI turns a node that does not answer into a
clear error (found in review).

* A handler's unexpected exception (a KeyError for a missing argument, a RuntimeError of
  a store that is closing) and a request line over the reader's 64 KiB limit used to be
  logged with a traceback and answered with nothing: the CLI then said only "malformed
  admin response".
* A node that accepts the connection but does not answer (paused with SIGSTOP, wedged)
  made `nebula state export|import`, `leader transfer` and `cluster add|remove` die with
  a Python traceback (socket.timeout is not a NebulaError).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from nebula import config
from nebula.aio import admin
from nebula.cli import main as cli
from nebula.errors import NebulaError


def _serve(path: Path, handlers: dict, ask) -> object:
    async def main() -> object:
        server = admin.AdminServer(path, handlers)
        await server.start()
        try:
            return await asyncio.to_thread(ask)
        finally:
            await server.close()

    return asyncio.run(main())


def _raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf


def test_an_unexpected_handler_error_is_answered(tmp_path: Path) -> None:
    path = tmp_path / "a" / admin.SOCKET_NAME

    async def needs_id(req: dict) -> dict:
        return {"id": req["id"]}  # KeyError without it

    def ask() -> str:
        with pytest.raises(NebulaError) as e:
            admin.request(path, "add", timeout=5)
        return str(e.value)

    msg = _serve(path, {"add": needs_id}, ask)
    assert "malformed admin response" not in msg
    assert "internal error" in msg and "KeyError" in msg


def test_an_oversized_request_is_answered(tmp_path: Path) -> None:
    path = tmp_path / "a" / admin.SOCKET_NAME

    async def status(req: dict) -> dict:
        return {}

    out = _serve(
        path,
        {"status": status},
        lambda: _raw(path, b'{"cmd":"status","pad":"' + b"x" * 70_000 + b'"}\n'),
    )
    assert out.startswith(b'{"ok": false') and b"too large" in out, out


def _local_cfg(tmp_path: Path) -> Path:
    p = tmp_path / "nebula.toml"
    p.write_text(config.template("native"))
    return p


@pytest.mark.parametrize(
    "argv",
    [["state", "export"], ["state", "import", "pvs.json"]],
)
def test_a_node_that_never_answers_is_a_clear_cli_error(tmp_path: Path, argv, capsys) -> None:
    cfg_path = _local_cfg(tmp_path)
    (tmp_path / "pvs.json").write_text('{"height": "5", "round": 0, "step": 1}')
    cfg = config.load(cfg_path)
    sock_path = admin.socket_path(cfg)
    admin.ensure_private_dir(sock_path.parent)
    # A wedged node: the socket accepts (the kernel's backlog), nobody answers.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(sock_path))
        srv.listen(8)
        # Hold the state's lock as the wedged node would.
        from nebula.state.local import LocalStore

        store = LocalStore(cfg.resolve(cfg.raw.state_path))
        try:
            args = [argv[0], argv[1], "-c", str(cfg_path), *[str(tmp_path / a) for a in argv[2:]]]
            code = cli.main(args)  # must not raise
        finally:
            store.close_sync()
    err = capsys.readouterr().err
    if argv[1] == "export":
        # The node's admin channel is silent: the durable state file is read instead.
        assert code == 0, err
    else:  # the state file is the wedged node's (its lock): a clear refusal
        assert code != 0 and "nebula: error:" in err and "Traceback" not in err


def test_request_to_a_silent_node_raises_a_nebula_error(tmp_path: Path) -> None:
    d = tmp_path / "a"
    admin.ensure_private_dir(d)
    path = d / admin.SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(8)
        with pytest.raises(admin.AdminUnreachable, match="no answer"):
            admin.request(path, "transfer", timeout=0.5)
