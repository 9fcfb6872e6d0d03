"""`nebula demo` end to end: a real chain signed by real Nebula processes, no edits.

Every test runs the command as a user would (a subprocess, in a fresh directory), checks
its exit code and its per-block lines, and then checks that no process it started is left:
no process on this machine mentions the demo directory on its command line, and no pid
the demo printed is alive.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nebula.config import load as load_config
from nebula.devnet.cometbft import cached_cometbft
from tests.support.nebula_proc import REPO_ROOT

pytestmark = pytest.mark.e2e

VERSION = "v0.38.25"
SECOND_VERSION = "v1.0.1"  # --chains 2 adds this line
_HEIGHT_RE = re.compile(r"^height\s+(\d+)\s.*\bleader (node\d|none)\b.*signature verified", re.M)
# --chains N: every block line starts with its chain id
_CHAIN_HEIGHT_RE = re.compile(
    r"^(nebula-demo-\d)\s+height\s+(\d+)\s.*\bleader (node\d|none)\b.*signature verified", re.M
)
_CHAIN_HEADER_RE = re.compile(
    r"^chain\s+(nebula-demo-\d) on CometBFT (v[\d.]+) .*\n^validator\s+ed25519 key, address ([0-9A-F]{40})$",
    re.M,
)
_PID_RE = re.compile(r"\bnode(\d): pid (\d+)")


@pytest.fixture(autouse=True)
def _need_cometbft() -> None:
    if cached_cometbft(VERSION) is None and shutil.which("go") is None:
        pytest.skip(f"CometBFT {VERSION} is not built and Go is not installed")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    return env


def _cmd(demo_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nebula.cli.main", "demo", "--dir", str(demo_dir), *args]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive; only the demo could reap it, and the demo is gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _assert_nothing_left(demo_dir: Path, output: str) -> None:
    pids = [int(pid) for _, pid in _PID_RE.findall(output)]
    assert pids, f"the demo printed no node pids:\n{output}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = _processes_mentioning(str(demo_dir))
        alive = [p for p in pids if _pid_alive(p)]
        if not left and not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes left over: {left}, live node pids {alive}")


def _heights(output: str) -> list[int]:
    return [int(h) for h, _ in _HEIGHT_RE.findall(output)]


def _leaders(output: str) -> list[str]:
    return [leader for _, leader in _HEIGHT_RE.findall(output)]


def _run(demo_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cmd(demo_dir, *args),
        cwd=demo_dir.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class _Running:
    """A demo without --blocks, its output collected line by line by a thread."""

    def __init__(self, demo_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            _cmd(demo_dir, *args),
            cwd=demo_dir.parent,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pred: Callable[[str], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.output):
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"demo exited ({self.proc.returncode}):\n{self.output}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output}")

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_one_node_five_blocks(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    res = _run(demo_dir, "--nodes", "1", "--blocks", "5", "--timeout-commit", "200ms")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert _heights(out) == [1, 2, 3, 4, 5], out
    assert set(_leaders(out)) == {"node1"}, out
    assert "5 block(s) committed, every signature verified" in out
    assert "all processes stopped" in out
    for log in (demo_dir / "cometbft" / "cometbft.log", demo_dir / "nebula/node1/nebula.log"):
        assert str(log) in out and log.stat().st_size > 0
    _assert_nothing_left(demo_dir, out)

    # The directory is the demo's: a second run wipes it and starts a new chain.
    res = _run(demo_dir, "--nodes", "1", "--blocks", "2", "--timeout-commit", "200ms")
    out2 = res.stdout + res.stderr
    assert res.returncode == 0, out2
    assert _heights(out2) == [1, 2], out2
    _assert_nothing_left(demo_dir, out2)


def test_raft_cluster_of_three(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    res = _run(demo_dir, "--nodes", "3", "--blocks", "5", "--timeout-commit", "300ms")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert _heights(out) == [1, 2, 3, 4, 5], out
    # Exactly one Raft leader signs; it is one of the three nodes.
    assert all(leader in ("node1", "node2", "node3") for leader in _leaders(out)), out
    assert len(_PID_RE.findall(out)) == 3
    for n in (1, 2, 3):
        assert (demo_dir / f"nebula/node{n}/raft_data").is_dir()
        assert (demo_dir / f"nebula/node{n}/cluster_secret").stat().st_mode & 0o077 == 0
    _assert_nothing_left(demo_dir, out)


def test_two_chains_signed_by_one_cluster(tmp_path: Path) -> None:
    """--chains 2: a v0.38 and a v1.0 chain, each with its own key, one 3-node cluster."""
    if cached_cometbft(SECOND_VERSION) is None and shutil.which("go") is None:
        pytest.skip(f"CometBFT {SECOND_VERSION} is not built and Go is not installed")
    demo_dir = tmp_path / "demo"
    res = _run(demo_dir, "--chains", "2", "--blocks", "4", "--timeout-commit", "300ms")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "2 single-validator chains" in out and "signing both chains" in out, out
    header = {cid: (version, addr) for cid, version, addr in _CHAIN_HEADER_RE.findall(out)}
    assert {cid: v for cid, (v, _) in header.items()} == {
        "nebula-demo-1": VERSION,
        "nebula-demo-2": SECOND_VERSION,
    }, out
    assert len({addr for _, addr in header.values()}) == 2, out  # a key per chain
    lines = _CHAIN_HEIGHT_RE.findall(out)
    for cid in header:
        assert [int(h) for c, h, _ in lines if c == cid] == [1, 2, 3, 4], out
    assert all(leader in ("node1", "node2", "node3") for _, _, leader in lines), out
    assert _heights(out) == []  # no block line without its chain
    assert "8 block(s) committed on 2 chains" in out, out
    # Each chain ran on its own line with the validator key the header names, and every
    # node of the one cluster serves both, each with its own key file.
    for cid, (version, addr) in header.items():
        home = demo_dir / "cometbft" / cid
        assert version in (home / "cometbft.log").read_text(), cid
        genesis = json.loads((home / "config" / "genesis.json").read_text())
        assert genesis["chain_id"] == cid
        assert [v["address"] for v in genesis["validators"]] == [addr]
    assert len(_PID_RE.findall(out)) == 3
    for n in (1, 2, 3):
        cfg = load_config(demo_dir / f"nebula/node{n}/nebula.toml")
        assert cfg.chain_ids == ("nebula-demo-1", "nebula-demo-2")
        assert [c.version for c in cfg.chains] == ["v0_38", "v1_0"]
        key_paths = {c.signing.native.private_key_path for c in cfg.chains}
        assert len(key_paths) == 2
    _assert_nothing_left(demo_dir, out)


def test_ctrl_c_after_leader_failover(tmp_path: Path) -> None:
    """Kill the leader mid-run: another node signs on; then Ctrl-C stops everything."""
    demo_dir = tmp_path / "demo"
    run = _Running(demo_dir, "--nodes", "3", "--timeout-commit", "300ms")
    try:
        run.wait_for(lambda out: len(_heights(out)) >= 3, "three verified blocks")
        pids = {f"node{n}": int(pid) for n, pid in _PID_RE.findall(run.output)}
        leader = _leaders(run.output)[-1]
        assert leader in pids, run.output
        os.kill(pids[leader], signal.SIGKILL)
        seen = len(_heights(run.output))
        run.wait_for(
            lambda out: (
                len(_heights(out)) >= seen + 3 and _leaders(out)[-1] not in (leader, "none")
            ),
            "blocks signed by a new leader",
        )
        assert f"leader changed: {leader} -> " in run.output
        run.proc.send_signal(signal.SIGINT)
        code = run.finish()
    finally:
        run.kill()
    out = run.output
    assert code == 0, out
    heights = _heights(out)
    assert heights == list(range(1, len(heights) + 1)), out
    assert "stopping (interrupted)" in out
    assert f"{len(heights)} block(s) committed, every signature verified" in out
    _assert_nothing_left(demo_dir, out)


def test_refuses_bad_options_and_foreign_directories(tmp_path: Path) -> None:
    res = _run(tmp_path / "d", "--key-type", "bls12381", "--cometbft-version", VERSION)
    assert res.returncode == 2
    assert "bls12381 needs --cometbft-version v1.0.1" in res.stdout + res.stderr
    assert not (tmp_path / "d").exists()

    res = _run(tmp_path / "d", "--key-type", "bls12381", "--chains", "2")
    assert res.returncode == 2
    assert "--key-type bls12381 runs one chain" in res.stdout + res.stderr
    assert not (tmp_path / "d").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    res = _run(foreign, "--nodes", "1", "--blocks", "1")
    assert res.returncode == 1
    assert "refusing to wipe it" in res.stdout + res.stderr
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert _processes_mentioning(str(foreign)) == []


_VALIDATOR_RE = re.compile(r"^validator\s+(\w+) key, address ([0-9A-F]{40})$", re.M)


def test_pkcs11_backend_signs_from_a_softhsm_token(tmp_path: Path) -> None:
    """--backend pkcs11: the key is generated in a SoftHSM2 token under the demo directory,
    nodes 2 and 3 get clones of it (an installation each); no node has a key file."""
    demo_dir = tmp_path / "demo"
    res = _run(demo_dir, "--backend", "pkcs11", "--blocks", "4", "--timeout-commit", "300ms")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    first = demo_dir / "softhsm" / "node1"
    assert f"generated inside SoftHSM2 token 'nebula-demo' (PKCS#11, {first})" in out, out
    assert "nodes 2-3 sign from clones of that token" in out, out
    assert "signing through PKCS#11" in out, out
    assert _heights(out) == [1, 2, 3, 4], out
    ((key_type, address),) = _VALIDATOR_RE.findall(out)
    assert key_type == "ed25519"
    genesis = json.loads((demo_dir / "cometbft" / "config" / "genesis.json").read_text())
    assert [v["address"] for v in genesis["validators"]] == [address]
    for n in (1, 2, 3):
        assert any((demo_dir / f"softhsm/node{n}/tokens").iterdir())
        cfg = load_config(demo_dir / f"nebula/node{n}/nebula.toml")
        assert cfg.chains[0].signing_mode == "pkcs11"
        assert (demo_dir / f"nebula/node{n}/hsm_pin").stat().st_mode & 0o077 == 0
        assert not (demo_dir / f"nebula/node{n}/privkey").exists()
    _assert_nothing_left(demo_dir, out)


def test_pkcs11_backend_without_softhsm_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    res = subprocess.run(
        _cmd(tmp_path / "d", "--backend", "pkcs11"),
        env={**_env(), "PATH": str(empty)},  # no softhsm2-util on PATH
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "SoftHSM2 is not installed" in out, out
    assert "apt-get install softhsm2" in out and "brew install softhsm" in out, out
    assert not (tmp_path / "d").exists()
