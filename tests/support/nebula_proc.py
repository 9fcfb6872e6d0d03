"""Run real `nebula start` processes from tests: write config and key, start, stop.

The config writing and the process control live in :mod:`nebula.devnet.cluster` (shared
with ``nebula demo``); :class:`NebulaProcess` keeps the tests' constructor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from nebula.crypto.keys import SigningKey
from nebula.devnet.cluster import NebulaNode, write_node_dir

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["REPO_ROOT", "NebulaProcess", "run_cli"]


def run_cli(
    *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m nebula.cli.main``) from this checkout; with ``check``
    a non-zero exit fails the test with the command, its code and its output."""
    r = subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"nebula {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        )
    return r


class NebulaProcess(NebulaNode):
    """One `nebula start` process with its own directory (config written at construction)."""

    def __init__(
        self,
        home: Path,
        *,
        chain_id: str,
        version: str,
        key: SigningKey | None,
        connections: list[str],
        persist: str = "local",
        raft: dict[str, Any] | None = None,
        extra: str = "",
        signing: str | None = None,
        log_format: str = "text",
    ) -> None:
        node = write_node_dir(
            Path(home),
            chain_id=chain_id,
            version=version,
            key=key,
            connections=connections,
            persist=persist,
            raft=raft,
            extra=extra,
            signing=signing,
            log_format=log_format,
        )
        super().__init__(node.config_path, log_path=node.log_path, cwd=node.home)

    def start(self) -> NebulaProcess:
        super().start()
        return self

    def __enter__(self) -> NebulaProcess:
        return self.start()
