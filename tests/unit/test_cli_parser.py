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
