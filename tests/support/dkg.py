"""The dealerless key ceremony as an operator runs it: real `nebula keys dkg` processes,
one directory per member (its machine), public files carried between them by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.nebula_proc import run_cli


def nebula(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, check=check)


@dataclass
class CliCeremony:
    base: Path
    threshold: int
    n: int
    #: member -> its directory (its machine), and what the operator carries
    dirs: dict[int, Path] = field(default_factory=dict)
    operator: Path = field(init=False)
    #: the --json output of each step, per member
    init: dict[int, dict[str, Any]] = field(default_factory=dict)
    deal: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.operator = self.base / "operator"
        self.operator.mkdir(parents=True)
        self.dirs = {i: self.base / f"member{i}" for i in range(1, self.n + 1)}

    def _carry(self, pattern: str) -> None:
        """The operator collects every member's public file and gives each member the
        others'."""
        for d in self.dirs.values():
            for f in d.glob(pattern):
                shutil.copy(f, self.operator / f.name)
        for d in self.dirs.values():
            for f in self.operator.glob(pattern):
                if not (d / f.name).exists():
                    shutil.copy(f, d / f.name)

    def members(self, i: int) -> list[str]:
        return [str(self.dirs[i] / f"member-{j}.pub.json") for j in range(1, self.n + 1)]

    def deals(self, i: int) -> list[str]:
        return [str(self.dirs[i] / f"deal-{j}.json") for j in range(1, self.n + 1)]

    def run_init(self) -> None:
        for i, d in self.dirs.items():
            out = nebula("keys", "dkg", "init", "--index", str(i), "--dir", str(d), "--json")
            self.init[i] = json.loads(out.stdout)
        self._carry("member-*.pub.json")

    def run_deal(self) -> None:
        for i, d in self.dirs.items():
            t = str(self.threshold)
            args = ["--members", *self.members(i), "--dir", str(d), "--json"]
            out = nebula("keys", "dkg", "deal", "--index", str(i), "-t", t, *args)
            self.deal[i] = json.loads(out.stdout)
        self._carry("deal-*.json")

    def finish_args(self, i: int) -> list[str]:
        return [
            "keys", "dkg", "finish", "--index", str(i), "-t", str(self.threshold),
            "--members", *self.members(i), "--deals", *self.deals(i),
            "--dir", str(self.dirs[i]), "--json",
        ]  # fmt: skip

    def run_finish(self) -> None:
        for i in self.dirs:
            self.finish[i] = json.loads(nebula(*self.finish_args(i)).stdout)

    def share(self, i: int) -> Path:
        return self.dirs[i] / f"share-{i}.json"


def cli_ceremony(base: Path, threshold: int, n: int) -> CliCeremony:
    """All three rounds for members 1..n; each member's share file stays in its directory."""
    c = CliCeremony(base, threshold, n)
    c.run_init()
    c.run_deal()
    c.run_finish()
    return c
