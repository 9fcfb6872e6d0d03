"""Every `nebula` subcommand is registered, and a broken one is an error, not a gap."""

from __future__ import annotations

import argparse
import sys

import pytest

import nebula.cli
from nebula.cli import main

SUBCOMMANDS = {
    "init", "keys", "start", "state", "status", "leader", "cluster", "vault", "demo", "bench", "hsm"
}  # fmt: skip


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_subcommand_is_registered() -> None:
    assert _subcommands(main.build_parser()) == SUBCOMMANDS


@pytest.mark.parametrize("module", ["bench", "cluster", "demo", "dkg", "hsm", "vault"])
def test_a_subcommand_module_that_fails_to_import_is_an_error(monkeypatch, module) -> None:
    # As if the module were broken: importing it raises ImportError.
    monkeypatch.delattr(nebula.cli, module, raising=False)
    monkeypatch.setitem(sys.modules, f"nebula.cli.{module}", None)
    with pytest.raises(ImportError):
        main.build_parser()


@pytest.mark.parametrize(
    ("roles", "code"),
    [
        (["leader", "follower", "follower"], 0),
        (["leader", "follower", "down"], 1),
        (["leader", "follower", "unreachable"], 1),
        (["leader", "follower", "stopped"], 1),  # failed closed, or removed: needs a look
    ],
)
def test_status_exit_code_says_whether_every_member_runs(monkeypatch, capsys, roles, code) -> None:
    from nebula.cli import cluster

    sts = [{"config": f"n{i}.toml", "node_id": i, "role": r} for i, r in enumerate(roles, 1)]
    monkeypatch.setattr(cluster, "_statuses", lambda paths, timeout=2.0: sts)
    for extra in ([], ["--json"]):
        args = main.build_parser().parse_args(["status", "-c", "x", *extra])
        assert args.func(args) == code
    capsys.readouterr()
