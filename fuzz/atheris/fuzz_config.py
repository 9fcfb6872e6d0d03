#!/usr/bin/env python3
"""atheris harness: the config loader (nebula.config.loads / load).

Input: one selector byte, then the document.  ``sel % 2 == 0``: the payload, decoded as
UTF-8 (invalid bytes replaced), goes to ``config.loads``; ``sel % 2 == 1``: the raw
payload is written to a file and read with ``config.load`` (invalid UTF-8 included).
The answer must be a ConfigError naming the file, or a LoadedConfig that obeys the
loader's rules (non-empty chain_id, one valid endpoint per connection, positive dial
timings in order, a section for the signing mode, vault timeouts in (0, 4)).  Seeds are
every ``nebula init`` template.  tomllib is instrumented along with nebula.config.

Run: ``python fuzz/atheris/fuzz_config.py -max_total_time=300``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris
from _common import outcome, run

with atheris.instrument_imports(include=["nebula.config", "tomllib"]):
    from nebula import config

from nebula.errors import ConfigError

# One scratch file, rewritten for every input (libFuzzer exits without running cleanups).
FILE = Path(tempfile.gettempdir()) / f"nebula-fuzz-config-{os.getuid()}.toml"
NAME = Path("/etc/nebula/fuzz.toml")


def check(cfg: config.LoadedConfig) -> None:
    raw = cfg.raw
    problems = []
    if not raw.chain_id.strip():
        problems.append("empty chain_id")
    if len(cfg.endpoints) != len(raw.connections) or len(set(cfg.endpoints)) != len(cfg.endpoints):
        problems.append("endpoints do not match connections")
    for e in cfg.endpoints:
        if e.scheme == "tcp" and not (e.host and 1 <= e.port <= 65535):
            problems.append(f"bad endpoint {e}")
        if e.scheme == "unix" and not e.path:
            problems.append("empty unix path")
    d = raw.dial
    for name in ("handshake_timeout", "backoff_min", "backoff_max", "idle_timeout"):
        if not getattr(d, name) > 0:
            problems.append(f"dial.{name} = {getattr(d, name)}")
    if not d.backoff_min <= d.backoff_max:
        problems.append("backoff_min > backoff_max")
    mode = getattr(raw.signing, raw.signing_mode)
    if mode is None:
        problems.append(f"no [signing.{raw.signing_mode}]")
    elif raw.signing_mode != "native" and not 0 < mode.timeout < 4.0:
        problems.append(f"signing timeout {mode.timeout}")
    if raw.persist == "raft" and (
        raw.raft is None or raw.raft.node_id not in [p.id for p in raw.raft.peers]
    ):
        problems.append("raft persistence without a valid [raft]")
    if problems:
        raise AssertionError(f"accepted an invalid config: {', '.join(problems)}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    sel, payload = data[0], data[1:]
    if sel % 2 == 0:
        path = NAME
        kind, result = outcome(config.loads, payload.decode("utf-8", "replace"), NAME)
    else:
        path = FILE
        FILE.write_bytes(payload)
        kind, result = outcome(config.load, FILE)
    if kind == "ok":
        check(result)
        return
    if result is not ConfigError:
        raise AssertionError(f"{result.__name__} instead of ConfigError")
    try:
        config.loads(payload.decode("utf-8", "replace"), path) if sel % 2 == 0 else config.load(
            FILE
        )
    except ConfigError as exc:
        if not str(exc).startswith(f"{path}:"):
            raise AssertionError(f"error does not name the file: {exc}") from None


def seeds() -> list[bytes]:
    out = []
    for mode in ("native", "vault_transit", "vault_signer_plugin"):
        for version in ("v0_34", "v0_38", "v1_0"):
            for persist in ("local", "raft"):
                text = config.template(mode, version=version, persist=persist).encode()
                out += [b"\x00" + text, b"\x01" + text]
    return out


if __name__ == "__main__":
    run("config", test_one_input, seeds())
    sys.exit(0)
