"""Seeded fault injection with real processes and a real CometBFT chain.

* The fault hooks (tests/support/faults/sitecustomize.py) really slow fsync and jump the
  wall clock in a child process, and do nothing without NEBULA_FAULTS_DIR.
* The auditing relay catches a double sign and a bad signature, and -- between a driver
  playing the node and one real Nebula process -- survives garbage and mid-request
  disconnects toward Nebula with every request still signed correctly and seen.
* The chaos run: a 3-node cluster signs a real chain through a seeded random schedule
  of kills, pauses, partitions, slow fsync, clock jumps and a hostile validator.
  ``NEBULA_CHAOS_SEED`` (default 1) and ``NEBULA_CHAOS_SECONDS`` (default 100) choose
  the schedule; the long run is ``python -m tests.support.chaos --seed N --minutes 30``.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from nebula.crypto.keys import generate
from nebula.types import (
    PubKeyRequest,
    SignedMsgType,
    SignedVoteResponse,
    Timestamp,
    Vote,
    WireFamily,
)
from tests.support.chaos import FAULTS_PATH, run_chaos
from tests.support.cluster import Auditor, driver, vote_req
from tests.support.cometbft import GoToolchainMissing
from tests.support.nebula_proc import NebulaProcess
from tests.support.ports import free_port
from tests.support.relay import GARBAGE_KINDS, AuditingRelay

pytestmark = pytest.mark.e2e

CHAIN = "relay-chain"
FAMILY = WireFamily.V0_38


def test_fault_hooks_slow_fsync_and_jump_the_clock(tmp_path) -> None:
    (tmp_path / "fsync_delay_ms").write_text("150\n")
    (tmp_path / "clock_offset_s").write_text("86400\n")
    script = textwrap.dedent(
        """
        import os, sys, time
        d = os.environ["NEBULA_FAULTS_DIR"]
        t = time.time(); tn = time.time_ns()
        fd = os.open(os.path.join(d, "f"), os.O_CREAT | os.O_WRONLY)
        a = time.monotonic(); os.fsync(fd); b = time.monotonic(); os.fdatasync(fd)
        c = time.monotonic()
        with open(os.path.join(d, "clock_offset_s"), "w") as f:
            f.write("0")
        with open(os.path.join(d, "fsync_delay_ms"), "w") as f:
            f.write("0")
        time.sleep(0.15)
        e = time.monotonic(); os.fsync(fd); g = time.monotonic()
        print(t, tn / 1e9, b - a, c - b, time.time(), g - e)
        """
    )
    env = {**os.environ, "PYTHONPATH": FAULTS_PATH, "NEBULA_FAULTS_DIR": str(tmp_path)}
    before = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    after = time.time()
    assert proc.returncode == 0, proc.stderr
    t, tn, fsync_s, fdatasync_s, t_after, fsync_after = map(float, proc.stdout.split())
    assert before + 86400 - 1 <= t <= after + 86400 + 1
    assert before + 86400 - 1 <= tn <= after + 86400 + 1
    assert fsync_s >= 0.14 and fdatasync_s >= 0.14
    assert before - 1 <= t_after <= after + 1  # re-read: the jump was undone
    assert fsync_after < 0.1
    assert (tmp_path / "active").read_text() != ""
    # Without NEBULA_FAULTS_DIR the hooks stay out of the way.
    env.pop("NEBULA_FAULTS_DIR")
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert abs(float(out.stdout) - time.time()) < 5


def test_relay_auditor_catches_double_sign_and_bad_signature() -> None:
    from nebula import proto

    key = generate("ed25519")
    other = generate("ed25519")
    relay = AuditingRelay(
        f"tcp://127.0.0.1:{free_port()}", Auditor("ed25519", key.public_key), FAMILY
    )

    def signed(req, signer, ts):  # type: ignore[no-untyped-def]
        v = req.vote
        vote = Vote(type=v.type, height=v.height, round=v.round, block_id=v.block_id, timestamp=ts)
        sig = signer.sign(proto.vote_sign_bytes(CHAIN, vote))
        return SignedVoteResponse(
            Vote(
                type=v.type,
                height=v.height,
                round=v.round,
                block_id=v.block_id,
                timestamp=ts,
                signature=sig,
            )
        )

    req = vote_req(CHAIN, 5, SignedMsgType.PREVOTE)
    relay._audit(req, signed(req, key, Timestamp(1, 0)))
    relay._audit(req, signed(req, key, Timestamp(1, 0)))  # the same signature again: fine
    assert relay.violations == []
    relay._audit(req, signed(req, key, Timestamp(2, 0)))  # same HRS, another signature
    assert len(relay.violations) == 1 and "DOUBLE SIGN" in relay.violations[0]
    req6 = vote_req(CHAIN, 6, SignedMsgType.PREVOTE)
    relay._audit(req6, signed(req6, other, Timestamp(1, 0)))
    assert "does not verify" in relay.violations[1]
    bad = signed(req6, key, Timestamp(1, 0))
    bad.vote.height = 7  # a response that does not match its request
    relay._audit(req6, bad)
    assert "does not match" in relay.violations[2]
    assert relay.snapshot()["signatures"] == 3


def test_relay_garbage_and_mid_request_disconnects_toward_one_nebula(tmp_path) -> None:
    """Every validator-side fault breaks Nebula's connection; every request is still
    signed (identically when retried), and the relay sees exactly what the node gets."""
    key = generate("ed25519")
    node_addr = f"tcp://127.0.0.1:{free_port()}"
    node_auditor = Auditor("ed25519", key.public_key)
    relay_auditor = Auditor("ed25519", key.public_key)
    lines: list[str] = []
    faults = [(k, p) for k in GARBAGE_KINDS for p in ("before", "after")]
    faults += [("disconnect", d) for d in (0.0, 0.0005, 0.002, 0.01)]

    async def main() -> AuditingRelay:
        async with driver([node_addr], FAMILY, CHAIN, node_auditor) as d:
            relay = AuditingRelay(
                node_addr,
                relay_auditor,
                FAMILY,
                rng=random.Random(3),
                request_deadline=2.5,
                log=lines.append,
            ).start()
            nebula = NebulaProcess(
                tmp_path / "nebula",
                chain_id=CHAIN,
                version="v0_38",
                key=key,
                connections=[relay.listen_address],
            )
            try:
                with nebula:
                    pk = await d.request_once(PubKeyRequest(CHAIN), timeout=15)
                    assert pk.pub_key == key.public_key
                    h = 1
                    for fault in [None, *faults]:
                        if fault is not None and fault[0] == "disconnect":
                            f = relay.inject_disconnect(fault[1])
                        elif fault is not None:
                            f = relay.inject_garbage(*fault)
                        await d.sign(vote_req(CHAIN, h, SignedMsgType.PREVOTE))
                        await d.sign(vote_req(CHAIN, h, SignedMsgType.PRECOMMIT))
                        if fault is not None:
                            assert f.fired_at is not None, f.describe()
                            assert "answered after" in f.outcome, f.describe()
                        h += 1
                    log = nebula.log_text()
            finally:
                relay.stop()
        assert d.refusals == []
        assert log.count("dropped") >= len(faults), log
        return relay

    relay = asyncio.run(main())
    print("\n" + "\n".join(f.describe() for f in relay.faults))
    assert relay.violations == [], relay.violations
    # The relay saw every signature the node got (and nothing else).
    assert relay_auditor.seen == node_auditor.seen
    assert node_auditor.count == 2 * (len(faults) + 1)
    assert relay.extension_signatures == len(faults) + 1  # one per non-nil precommit
    assert relay.nebula_connections >= 1 + len(faults)
    # A disconnect after Nebula answered would not test a retry: most must cut mid-request.
    cuts = [f for f in relay.faults if f.kind == "disconnect" and "cut mid-request" in f.outcome]
    assert cuts, [f.describe() for f in relay.faults]


def test_chaos_short_run(tmp_path) -> None:
    seed = int(os.environ.get("NEBULA_CHAOS_SEED", "1"))
    seconds = float(os.environ.get("NEBULA_CHAOS_SECONDS", "100"))
    t0 = time.monotonic()
    try:
        report = run_chaos(seed, seconds, tmp_path / "chaos", "v0.38.25")
    except GoToolchainMissing as e:
        pytest.skip(str(e))
    print(f"\n{report.format()}\n(total {time.monotonic() - t0:.0f}s)")
    assert report.ok, report.format()
    assert report.faults, "no fault was applied"
    assert report.conflicts == []
    assert report.blocks >= 10
    assert report.signatures > 0
    if any(f.kind == "withhold_restart" for f in report.faults):
        # The node asked twice for one step at least once: the run could have caught a
        # double sign (with the default seed it does; checked with the guard disabled).
        assert report.asked_again >= 1, report.format()
