"""Single-node signers side by side: tmkms softsign and Nebula (``persist = "local"``).

    python benches/compare_tmkms.py [--rounds 3] [--requests 3000] [--warmup 300]
                                    [--other /path/to/another/nebula/checkout]

Each round runs every signer in turn, alternating, against the same validator-side client
(``nebula bench --listen``, v0.34 wire: the protocol tmkms 0.14 speaks), one request in
flight, every signature verified.  It prints one JSON line per run: p50/p99 in ms and the
signer process's CPU time per request (from ``/proc``: every thread's ``schedstat``, in ns;
over the whole bench: warm-up included).  ``--other`` adds a second Nebula checkout (its
compiled extensions built in place), e.g. the commit before a change, for a before/after
in the same minutes.

tmkms is not installed by CI; build it with
``cargo install tmkms --version 0.14.0 --features softsign --root /tmp/tmkms-install``
and give ``--tmkms /tmp/tmkms-install/bin/tmkms`` (or put it on PATH).  tmkms softsign
writes its state file without ``fsync``; Nebula's decision is durable before its
signature leaves.  Not collected by pytest (a tool, not a test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nebula.bench.stats import cpu_time

HERE = Path(__file__).resolve().parents[1]
CHAIN = "bench-chain"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of ``pid`` so far (``schedstat``, in ns)."""
    t = cpu_time(pid)
    if t is None:
        raise SystemExit(f"process {pid} is gone: no CPU time to read")
    return t


def _bench(addr: str, requests: int, warmup: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable, "-m", "nebula.cli.main", "bench", "--listen", addr,
            "--version", "v0_34", "--chain-id", CHAIN, "--requests", str(requests),
            "--warmup", str(warmup), "--handshakes", "0", "--json", "--no-progress",
        ],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"bench failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def _tmkms(tmkms: str, home: Path, addr: str) -> subprocess.Popen[bytes]:
    shutil.rmtree(home, ignore_errors=True)
    subprocess.run([tmkms, "init", str(home)], capture_output=True, check=True)
    key = home / "secrets" / "consensus.key"
    subprocess.run([tmkms, "softsign", "keygen", str(key)], capture_output=True, check=True)
    (home / "tmkms.toml").write_text(
        f"""[[chain]]
id = "{CHAIN}"
key_format = {{ type = "bech32", account_key_prefix = "cosmospub", consensus_key_prefix = "cosmosvalconspub" }}
state_file = "{home}/state/consensus.json"
[[providers.softsign]]
chain_ids = ["{CHAIN}"]
key_type = "consensus"
path = "{key}"
[[validator]]
chain_id = "{CHAIN}"
addr = "{addr}"
secret_key = "{home}/secrets/kms-identity.key"
protocol_version = "v0.34"
reconnect = true
"""
    )
    return subprocess.Popen(
        [tmkms, "start", "-c", str(home / "tmkms.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _nebula(root: Path, home: Path, addr: str) -> subprocess.Popen[bytes]:
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    write = (
        "from pathlib import Path\n"
        "from nebula.devnet.cluster import write_node_dir\n"
        "from nebula.crypto.keys import generate\n"
        f"write_node_dir(Path({str(home)!r}), chain_id={CHAIN!r}, version='v0_34', "
        f"key=generate('ed25519'), connections=[{addr!r}], log_level='warn')\n"
    )
    subprocess.run([sys.executable, "-c", write], env=env, check=True)
    return subprocess.Popen(
        [sys.executable, "-m", "nebula.cli.main", "start", "-c", str(home / "nebula.toml")],
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--tmkms", default=shutil.which("tmkms") or "/tmp/tmkms-install/bin/tmkms")
    ap.add_argument("--other", type=Path, help="another Nebula checkout to compare")
    args = ap.parse_args()
    if not Path(args.tmkms).exists():
        raise SystemExit(f"tmkms not found at {args.tmkms} (see this file's docstring)")
    signers: list[tuple[str, Path | None]] = [("tmkms", None), ("nebula", HERE)]
    if args.other:
        signers.append((f"nebula@{args.other}", args.other.resolve()))
    work = Path(tempfile.mkdtemp(prefix="nebula-vs-tmkms-"))
    try:
        for rnd in range(1, args.rounds + 1):
            for name, root in signers:
                addr = f"tcp://127.0.0.1:{_port()}"
                home = work / name.replace("/", "_")
                proc = _tmkms(args.tmkms, home, addr) if root is None else _nebula(root, home, addr)
                try:
                    time.sleep(0.5)
                    c0 = _cpu_seconds(proc.pid)
                    res = _bench(addr, args.requests, args.warmup)
                    c1 = _cpu_seconds(proc.pid)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                lat = res["latency_ms"]["all"]
                line = {
                    "round": rnd,
                    "signer": name,
                    "p50_ms": lat["p50"],
                    "p99_ms": lat["p99"],
                    "cpu_ms_per_request": round(
                        (c1 - c0) * 1000 / (args.requests + args.warmup), 3
                    ),
                    "errors": res["errors"],
                    "load": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
