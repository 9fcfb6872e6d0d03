"""`nebula demo --threshold 2-of-3`: a local CometBFT v1.0.1 BLS chain signed by a 3-node
cluster holding a 2-of-3 split key; the header says so and no node has the whole key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nebula.config import load as load_config
from tests.support.nebula_proc import REPO_ROOT

pytestmark = pytest.mark.e2e

_HEIGHT_RE = re.compile(r"^height\s+(\d+)\s.*signature verified \(bls12381", re.M)


def _run(demo_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "demo", "--dir", str(demo_dir), *args],
        cwd=demo_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_demo_threshold_2_of_3(tmp_path) -> None:
    res = _run(tmp_path / "d", "--threshold", "2-of-3", "--blocks", "4")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "CometBFT v1.0.1" in out and "v1.0.1-bls" in out
    assert "Raft cluster of 3, 2-of-3 threshold BLS (each node holds one key share" in out
    assert [int(h) for h in _HEIGHT_RE.findall(out)][:4] == [1, 2, 3, 4]
    assert "4 block(s) committed, every signature verified" in out
    for i in (1, 2, 3):
        home = tmp_path / "d" / "nebula" / f"node{i}"
        cfg = load_config(home / "nebula.toml")
        assert cfg.chain().signing_mode == "threshold_bls"
        assert not (home / "privkey").exists()
        share = json.loads((home / "share.json").read_text())
        assert share["index"] == i and share["threshold"] == 2 and share["shares"] == 3


def test_demo_threshold_refuses_what_it_cannot_run(tmp_path) -> None:
    for args, why in (
        (["--threshold", "1-of-3"], "Raft quorum"),
        (["--threshold", "2-of-3", "--nodes", "5"], "runs 3 nodes"),
        (["--threshold", "2-of-3", "--key-type", "secp256k1"], "splits a bls12381 key"),
        (["--threshold", "two"], "T-of-N"),
    ):
        res = _run(tmp_path / "d", *args)
        assert res.returncode == 2, res.stdout + res.stderr
        assert why in res.stdout + res.stderr
