"""The `nebula` command line, as an operator uses it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nebula import __version__, proto
from nebula.aio.validator_side import PrivvalListener
from nebula.guard import SignRecord
from nebula.state.base import record_to_json
from nebula.types import SignVoteRequest, WireFamily
from tests.integration.test_single_node import vote
from tests.support import vectors
from tests.support.nebula_proc import REPO_ROOT, run_cli
from tests.support.ports import free_ports


def nebula(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, check=check)


def test_version() -> None:
    assert nebula("--version").stdout.strip() == f"nebula {__version__}"


@pytest.mark.parametrize("key_type", ["ed25519", "secp256k1", "bls12381"])
def test_init_generate_show(tmp_path, key_type) -> None:
    cfg = tmp_path / "nebula.toml"
    nebula("init", "--output-path", str(cfg), "--backend", "native", "--key-type", key_type)
    assert 'signing_mode = "native"' in cfg.read_text()
    nebula("keys", "generate", "-c", str(cfg))
    key_file = tmp_path / "privkey"
    assert key_file.stat().st_mode & 0o777 == 0o600
    shown = json.loads(nebula("keys", "show", "-c", str(cfg), "--json").stdout)
    assert shown["key_type"] == key_type and len(shown["address"]) == 40
    # An explicit key file with a config takes the config's key type (the file is a bare
    # secret): the same key, the same address (it used to be read as Ed25519).
    for args in (
        ("keys", "show", "--key-file", str(key_file)),
        ("keys", "generate", "--output", str(tmp_path / "other")),
    ):
        text = nebula(*args, "-c", str(cfg), "--json").stdout
        out = json.loads(text[text.index("{") :])  # (generate says what it wrote first)
        assert out["key_type"] == key_type
    assert (
        json.loads(
            nebula("keys", "show", "--key-file", str(key_file), "-c", str(cfg), "--json").stdout
        )
        == shown
    )
    # A second generate never silently replaces a key.
    r = nebula("keys", "generate", "-c", str(cfg), check=False)
    assert r.returncode != 0 and "exists" in r.stderr
    key_file.chmod(0o640)
    r = nebula("keys", "show", "-c", str(cfg), check=False)
    assert r.returncode == 2 and "chmod 600" in r.stderr


def test_init_refuses_overwrite_and_writes_vault_templates(tmp_path) -> None:
    for backend in ("vault-transit", "vault-signer-plugin"):
        cfg = tmp_path / f"{backend}.toml"
        nebula("init", "--output-path", str(cfg), "--backend", backend)
        assert nebula("init", "--output-path", str(cfg), check=False).returncode == 2


def test_import_priv_validator_key_json(tmp_path) -> None:
    doc = vectors.load("signatures_and_keys")["ed25519_docs_example"]
    pv = tmp_path / "priv_validator_key.json"
    pv.write_text(
        json.dumps(
            {
                "address": doc["address"],
                "pub_key": {"type": "tendermint/PubKeyEd25519", "value": doc["pub_key_b64"]},
                "priv_key": {"type": "tendermint/PrivKeyEd25519", "value": doc["priv_key_b64"]},
            }
        )
    )
    pv.chmod(0o600)
    cfg = tmp_path / "nebula.toml"
    nebula("init", "--output-path", str(cfg))
    nebula("keys", "import", str(pv), "-c", str(cfg))
    shown = json.loads(nebula("keys", "show", "-c", str(cfg), "--json").stdout)
    assert shown["address"] == doc["address"]
    assert shown["pub_key_base64"] == doc["pub_key_b64"]
    assert (
        base64.b64decode((tmp_path / "privkey").read_text())
        == base64.b64decode(doc["priv_key_b64"])[:32]
    )


def test_start_status_and_state_export_import(tmp_path) -> None:
    (port,) = free_ports(1)
    cfg = tmp_path / "nebula.toml"
    nebula(
        "init", "--output-path", str(cfg), "--chain-id", "cli-chain", "--cometbft-version", "v0_38"
    )
    text = cfg.read_text().replace("port = 26659", f"port = {port}")
    cfg.write_text(text)
    nebula("keys", "generate", "-c", str(cfg))
    pvs = tmp_path / "priv_validator_state.json"
    pvs.write_text(json.dumps({"height": "7", "round": 0, "step": 3}))
    # No state file yet: an export is an error, not zeros a migration would trust.
    r = nebula("state", "export", "-c", str(cfg), check=False)
    assert r.returncode != 0 and "no state file" in r.stderr and r.stdout == ""
    # Not running: import goes straight to the state file.
    assert "raised to 7/0/3" in nebula("state", "import", "-c", str(cfg), str(pvs)).stdout
    assert json.loads(nebula("state", "export", "-c", str(cfg)).stdout)["height"] == "7"
    older = tmp_path / "older.json"
    older.write_text(json.dumps({"height": "5", "round": 0, "step": 3}))
    out = nebula("state", "import", "-c", str(cfg), str(older)).stdout
    assert "unchanged at 7/0/3" in out and "holds 5/0/3, not higher" in out
    # A file that is not a sign state (a key file given by mistake) is an error, and so
    # is another chain's (the chain id in its sign bytes).
    r = nebula("state", "import", "-c", str(cfg), str(tmp_path / "privkey"), check=False)
    assert r.returncode != 0 and "privkey" in r.stderr
    other = tmp_path / "other.json"
    sb = proto.vote_sign_bytes("other-chain", vote(9))
    other.write_text(json.dumps(record_to_json(SignRecord(9, 0, 2, sb, b"s" * 64))))
    r = nebula("state", "import", "-c", str(cfg), str(other), check=False)
    assert r.returncode != 0 and "of chain 'other-chain'" in r.stderr
    # A file far larger than any sign state is refused before it is read whole.
    huge = tmp_path / "huge.json"
    huge.write_text('{"height": "8", "round": 0, "step": 3, "pad": "' + "x" * (2 << 20) + '"}')
    r = nebula("state", "import", "-c", str(cfg), str(huge), check=False)
    assert r.returncode == 2 and "too large" in r.stderr and "huge.json" in r.stderr, r.stderr
    assert json.loads(nebula("state", "export", "-c", str(cfg)).stdout)["height"] == "7"
    # --output replaces a file whole (0600, as CometBFT writes its state), and a path that
    # cannot be written is an error naming it, not a traceback.
    exported = tmp_path / "exported.json"
    exported.write_text("old content that is longer than the export will be" * 100)
    nebula("state", "export", "-c", str(cfg), "--output", str(exported))
    assert json.loads(exported.read_text())["height"] == "7"
    assert exported.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    r = nebula(
        "state", "export", "-c", str(cfg), "-o", str(tmp_path / "no" / "x.json"), check=False
    )
    assert r.returncode == 2 and "x.json" in r.stderr and "Traceback" not in r.stderr, r.stderr

    async def main() -> None:
        lst = PrivvalListener(f"tcp://127.0.0.1:{port}", WireFamily.V0_38)
        await lst.start()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nebula.cli.main",
            "start",
            "-c",
            str(cfg),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            conn = await lst.accept(timeout=15)
            r = await conn.request(SignVoteRequest(vote(5), "cli-chain"))
            assert r.error is not None and "height regression" in r.error.description
            r = await conn.request(SignVoteRequest(vote(8), "cli-chain"))
            assert r.error is None
            loop = asyncio.get_running_loop()
            st = json.loads(
                (
                    await loop.run_in_executor(
                        None, lambda: nebula("status", "-c", str(cfg), "--json")
                    )
                ).stdout
            )[0]
            assert st["role"] == "standalone"
            assert st["chains"]["cli-chain"]["height"] == "8"
            assert st["validators"][0]["connected"] is True
            table = (
                await loop.run_in_executor(None, lambda: nebula("status", "-c", str(cfg)))
            ).stdout
            assert "standalone" in table and "cli-chain 8/0/prevote" in table
            # Running: export and import go through the node.
            pvs.write_text(json.dumps({"height": "20", "round": 1, "step": 2}))
            await loop.run_in_executor(
                None, lambda: nebula("state", "import", "-c", str(cfg), str(pvs))
            )
            exp = json.loads(
                (
                    await loop.run_in_executor(
                        None, lambda: nebula("state", "export", "-c", str(cfg))
                    )
                ).stdout
            )
            assert (exp["height"], exp["round"], exp["step"]) == ("20", 1, 2)
            r = await conn.request(SignVoteRequest(vote(19), "cli-chain"))
            assert r.error is not None
        finally:
            proc.terminate()
            await proc.wait()
            await lst.close()

    asyncio.run(main())
    r = nebula("status", "-c", str(cfg), "--json", check=False)
    assert r.returncode == 1 and json.loads(r.stdout)[0]["role"] == "down"


def test_cluster_secret_writes_a_fresh_0600_secret_and_never_overwrites_silently(
    tmp_path,
) -> None:
    out = tmp_path / "cluster_secret"
    r = nebula("cluster", "secret", "-o", str(out))
    assert "copy it to every member" in r.stdout
    first = out.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o600
    assert len(first) == 65 and first.endswith(b"\n") and bytes.fromhex(first[:-1].decode())
    r = nebula("cluster", "secret", "-o", str(out), check=False)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert out.read_bytes() == first
    nebula("cluster", "secret", "-o", str(out), "--force")
    assert out.read_bytes() != first and len(out.read_bytes()) == 65
    assert out.stat().st_mode & 0o777 == 0o600


def test_offline_export_is_for_raft_members_only(tmp_path) -> None:
    cfg = tmp_path / "nebula.toml"
    nebula("init", "--output-path", str(cfg), "--backend", "native")
    r = nebula("state", "export", "-c", str(cfg), "--offline", check=False)
    assert r.returncode == 2 and "keeps a local state file" in r.stderr, r.stderr
