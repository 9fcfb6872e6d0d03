"""`nebula bench` end to end: a real local node, every signature verified, sane JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nebula import proto
from nebula.bench.runner import Verifier
from nebula.bench.stats import parse_phase_histograms, percentile, phase_means, summarize
from nebula.bench.workload import plan
from nebula.crypto.keys import generate
from nebula.devnet.cluster import NebulaNode, write_node_dir
from nebula.devnet.ports import free_ports
from nebula.types import RemoteSignerError, SignedVoteResponse, Vote, WireFamily
from tests.support.nebula_proc import REPO_ROOT

_ORDER = ("min", "p50", "p90", "p99", "max")


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "bench", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _check_latency(block: dict, count: int) -> None:
    assert block["count"] == count
    values = [block[k] for k in _ORDER]
    assert all(v is not None and v > 0 for v in values), block
    assert values == sorted(values), block
    assert block["min"] <= block["mean"] <= block["max"]


def test_bench_local_single_node_json() -> None:
    p = _bench("--local", "1", "--requests", "200", "--warmup", "30", "--handshakes", "3", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    assert d["requests"] == 200
    assert d["errors"] == 0 and d["warmup_errors"] == 0 and d["error_samples"] == []
    assert d["setup"]["nodes"] == 1 and d["setup"]["persist"] == "local"
    disk = d["setup"]["disk_fdatasync_ms"]
    assert 0 < disk["p50"] <= disk["p99"]
    assert d["setup"]["version"] == "v1_0" and d["setup"]["key_type"] == "ed25519"
    lat = d["latency_ms"]
    _check_latency(lat["all"], 200)
    # per height: proposal, prevote, precommit -> 67 / 67 / 66 of 200
    assert {k: lat[k]["count"] for k in ("proposal", "prevote", "precommit")} == {
        "proposal": 67,
        "prevote": 67,
        "precommit": 66,
    }
    for k in ("proposal", "prevote", "precommit"):
        _check_latency(lat[k], lat[k]["count"])
    # one signature per request plus an extension signature per precommit (v1.0)
    assert d["signatures_verified"] == 200 + 66
    assert d["throughput_rps"] > 0 and d["duration_s"] > 0
    assert d["handshake_ms"] > 0
    hs = d["handshakes_ms"]
    assert hs["count"] == 3 and 0 < hs["min"] <= hs["p50"] <= hs["max"]
    cpu = d["cpu_ms_per_request"]
    assert set(cpu) == {"node 1", "bench client"}, cpu
    assert cpu["node 1"]["role"] == "signer" and cpu["bench client"]["role"] == "validator"
    for c in cpu.values():
        assert c["user"] >= 0 and c["system"] >= 0
        assert c["total"] == pytest.approx(c["user"] + c["system"], abs=1e-3)
    # the signer decodes, signs (Ed25519, ~40 us) and syncs every request: not free
    assert cpu["node 1"]["total"] > 0.02
    ph = d["phases_mean_ms"]
    assert ph is not None, d["phases_note"]
    for name in ("receive_decode", "guard", "sign", "replicate", "encode_send", "total"):
        assert ph[name] is not None and ph[name] >= 0, name
    server = sum(ph[n] for n in ("receive_decode", "guard", "sign", "replicate", "encode_send"))
    assert server <= ph["total"] * 1.05 + 0.01
    assert ph["network_framing"] == pytest.approx(lat["all"]["mean"] - ph["total"], abs=2e-3)


def test_bench_local_cluster_reports_cpu_per_member_role() -> None:
    """CPU time per member, labelled with the role the member held through the timed run.

    On a loaded machine leadership may move during the run (an election is the cluster
    working as designed, not a failure); the bench must then say so instead of labelling
    a member with a role it held for part of the run. Each outcome is checked for what
    it claims, so the test fails only when the report is wrong."""
    p = _bench("--local", "3", "--requests", "300", "--warmup", "20", "--handshakes", "0", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    assert d["errors"] == 0 and d["setup"]["persist"] == "raft"
    cpu = d["cpu_ms_per_request"]
    assert set(cpu) == {"node 1", "node 2", "node 3", "bench client"}, cpu
    assert cpu["bench client"]["role"] == "validator"
    roles = sorted(c["role"] for label, c in cpu.items() if label != "bench client")
    if d["roles_stable"]:
        # Same role and term at both ends of the run: one leader throughout.
        assert roles == ["follower", "follower", "leader"], cpu
        assert d["roles_note"] == ""
        leader = next(c for c in cpu.values() if c["role"] == "leader")
        # the leader also signs, frames and answers: it works more per request than a
        # follower (CPU time, about twice a follower's: not a race against the clock)
        assert leader["total"] > max(c["total"] for c in cpu.values() if c["role"] == "follower")
    else:
        assert d["roles_stable"] is False, d
        assert "changed" in roles and set(roles) <= {"leader", "follower", "candidate", "changed"}
        assert "leadership moved during the timed run" in d["roles_note"]


def test_roles_over_the_run_detect_a_leadership_change() -> None:
    """The role a member is reported with is the one it held from start to end of the
    timed run; any election in between (a new term) marks it as changed."""
    from nebula.bench.runner import roles_over_run
    from nebula.bench.stats import PhaseSnapshot

    def snap(roles: dict[str, int], terms: dict[str, int]) -> PhaseSnapshot:
        return PhaseSnapshot(raft_roles=roles, raft_terms=terms)

    a, b, c = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
    start = snap({a: 2, b: 0, c: 0}, {a: 4, b: 4, c: 4})
    assert roles_over_run(start, start) == (
        {a: "leader", b: "follower", c: "follower"},
        True,
        "",
    )
    # b took over: a and b changed; c is a follower at both ends but in a new term.
    moved = snap({a: 0, b: 2, c: 0}, {a: 5, b: 5, c: 5})
    roles, stable, note = roles_over_run(start, moved)
    assert roles == {a: "changed", b: "changed", c: "changed"} and stable is False
    assert "terms [4, 5]" in note and "3 member(s)" in note
    # a lost and regained leadership: the same role at both ends, but a new term.
    again = snap({a: 2, b: 0, c: 0}, {a: 6, b: 6, c: 6})
    assert set(roles_over_run(start, again)[0].values()) == {"changed"}
    # a single node (no Raft gauges): no roles, stability unknown
    assert roles_over_run(PhaseSnapshot(), PhaseSnapshot()) == ({}, None, "")


def test_bench_v0_34_unix_table_output() -> None:
    """The human report over a unix socket in the oldest family (no extensions)."""
    p = _bench("--local", "1", "--requests", "60", "--warmup", "0", "--version", "v0_34",
               "--transport", "unix")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "precommit" in out and "replicate" in out and "network + framing" in out
    assert "CPU time per request" in out and "bench client" in out
    assert "0 errors: every signature verified" in out
    assert "re-dials" not in out  # no handshake on a unix socket


def test_bench_against_a_running_signer_from_its_config(tmp_path) -> None:
    """-c CONFIG: listen on the config's address, scrape its metrics.listen; a second
    run starts above the signer's last signed height (from its metrics) without errors."""
    (pv_port, m_port) = free_ports(2)
    node = write_node_dir(
        tmp_path / "neb",
        chain_id="running-chain",
        version="v0_38",
        key=generate("ed25519"),
        connections=[f"tcp://127.0.0.1:{pv_port}"],
        extra=f'[metrics]\nlisten = "127.0.0.1:{m_port}"',
        log_level="info",
    )
    with NebulaNode(node.config_path, log_path=node.log_path, cwd=node.home):
        runs = []
        for _ in range(2):
            p = _bench("-c", str(node.config_path), "--requests", "40", "--warmup", "5", "--json")
            assert p.returncode == 0, p.stderr[-3000:] + node.log_path.read_text()[-3000:]
            runs.append(json.loads(p.stdout))
    first, second = runs
    for d in runs:
        assert d["errors"] == 0 and d["warmup_errors"] == 0
        assert d["setup"]["chain_id"] == "running-chain" and d["setup"]["version"] == "v0_38"
        assert d["phases_mean_ms"] is not None
        _check_latency(d["latency_ms"]["all"], 40)
    assert first["setup"]["start_height"] == 1
    # 45 requests = 15 heights of proposal + prevote + precommit
    assert second["setup"]["start_height"] == 16


def test_bench_needs_a_target() -> None:
    p = _bench("--requests", "10")
    assert p.returncode == 2
    assert "--local N" in p.stderr


@pytest.mark.parametrize("target", [["--floor"], ["--local", "1"]])
def test_bench_refuses_a_missing_workdir(tmp_path, target: list[str]) -> None:
    p = _bench(*target, "--workdir", str(tmp_path / "missing"), "--requests", "10")
    assert p.returncode == 2
    assert "not an existing directory" in p.stderr and "Traceback" not in p.stderr
    p = _bench("--floor", "--local", "1")
    assert p.returncode == 2 and "--floor runs no Nebula" in p.stderr


# ---- the arithmetic behind the report --------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)
    s = summarize([0.001, 0.002, 0.003])
    assert (s.count, s.min, s.p50, s.max) == (3, 1.0, 2.0, 3.0)


def test_phase_means_from_scrapes() -> None:
    before = parse_phase_histograms(
        'nebula_sign_phase_seconds_sum{phase="sign"} 1.0\n'
        'nebula_sign_phase_seconds_count{phase="sign"} 10.0\n'
        'nebula_last_signed_height{chain_id="c"} 7.0\n'
    )
    after = parse_phase_histograms(
        'nebula_sign_phase_seconds_sum{phase="sign"} 1.5\n'
        'nebula_sign_phase_seconds_count{phase="sign"} 20.0\n'
        'nebula_sign_phase_seconds_sum{phase="guard"} 0.0\n'
        'nebula_sign_phase_seconds_count{phase="guard"} 0.0\n'
    )
    assert before.last_heights == {"c": 7}
    means = phase_means(before, after)
    assert means == {"sign": {"count": 10.0, "mean_ms": pytest.approx(50.0)}}


# ---- the verifier: every kind of bad answer is an error ---------------------------------


def _answers():
    key = generate("ed25519")
    fam = WireFamily.V1_0
    items = plan("c", fam, start_height=3, count=3, validator_address=key.address)
    verifier = Verifier("c", fam, key.key_type, key.public_key)

    def vote_answer(item, *, sig=None, ext_sig=None, error=None) -> bytes:
        v = item.request.vote
        out = Vote(
            type=v.type,
            height=v.height,
            round=v.round,
            block_id=v.block_id,
            timestamp=v.timestamp,
            validator_address=v.validator_address,
            signature=key.sign(item.sign_bytes) if sig is None else sig,
            extension_signature=(
                (key.sign(item.ext_sign_bytes) if item.ext_sign_bytes else b"")
                if ext_sig is None
                else ext_sig
            ),
        )
        if error is not None:
            return proto.encode_response(SignedVoteResponse(Vote(), error), fam)
        return proto.encode_response(SignedVoteResponse(out), fam)

    return items, verifier, vote_answer


def test_verifier_accepts_good_answers_and_counts_extension_signatures() -> None:
    items, verifier, answer = _answers()
    _, prevote, precommit = items
    assert verifier.check(prevote, answer(prevote)) == (1, None)
    assert precommit.ext_sign_bytes  # v1.0 non-nil precommit
    assert verifier.check(precommit, answer(precommit)) == (2, None)


def test_verifier_reports_bad_answers() -> None:
    items, verifier, answer = _answers()
    proposal, prevote, precommit = items
    n, err = verifier.check(prevote, answer(prevote, sig=bytes(64)))
    assert n == 0 and "does not verify" in err
    n, err = verifier.check(prevote, answer(prevote, error=RemoteSignerError(2, "double sign")))
    assert n == 0 and "refused (2) double sign" in err
    n, err = verifier.check(precommit, answer(precommit, ext_sig=b""))
    assert "extension signature missing" in err
    n, err = verifier.check(precommit, answer(precommit, ext_sig=bytes(64)))
    assert "extension signature does not verify" in err
    n, err = verifier.check(proposal, answer(prevote))  # a vote answer to a proposal
    assert n == 0 and "got SignedVoteResponse" in err
    n, err = verifier.check(prevote, b"\xff\xff")
    assert n == 0 and "undecodable" in err


# ---- the histogram ----------------------------------------------------------------------


def _result_with(rtts: list[float]):
    from nebula.bench.runner import BenchResult, RunOptions

    res = BenchResult(options=RunOptions("c", WireFamily.V1_0))
    res.rtts = rtts
    res.kinds = [("proposal", "prevote", "precommit")[i % 3] for i in range(len(rtts))]
    return res


def test_histogram_without_matplotlib_says_so(tmp_path, monkeypatch) -> None:
    from nebula.bench.report import write_histogram

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    why = write_histogram(_result_with([0.001] * 30), tmp_path / "h.png", "t")
    assert why is not None and "matplotlib is not installed" in why
    assert not (tmp_path / "h.png").exists()


def test_histogram_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from nebula.bench.report import write_histogram

    rtts = [0.0004 + 0.00001 * (i % 50) for i in range(300)] + [0.05]  # one far outlier
    assert write_histogram(_result_with(rtts), tmp_path / "h.png", "t") is None
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _floor(tmp_path, *extra: str, env: dict[str, str] | None = None) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "bench", "--floor", "--requests", "150",
         "--warmup", "10", "--workdir", str(tmp_path), "--json", *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


_FLOOR_SCENARIOS = {
    "loopback": (0, 0),
    "1 node, 1 fdatasync": (0, 1),
    "1 node, 2 fdatasyncs": (0, 2),
    "3 nodes, majority durable": (2, 1),
    "5 nodes, majority durable": (4, 1),
}


def test_bench_floor_json(tmp_path) -> None:
    d = _floor(tmp_path)
    assert d["setup"]["mode"] == "floor" and d["setup"]["requests"] == 150
    assert set(d["scenarios"]) == set(_FLOOR_SCENARIOS)
    assert d["chains_comparison"] == []  # no --chains: nothing at once to compare
    for name, (followers, syncs) in _FLOOR_SCENARIOS.items():
        sc = d["scenarios"][name]
        assert (sc["followers"], sc["fdatasyncs_per_node"]) == (followers, syncs)
        _check_latency(sc["latency_ms"], 150)
        assert sc["throughput_rps"] > 0
        # CPU per request of every process, by role (the follower: the busiest one)
        cpu = sc["cpu_ms_per_request"]
        assert set(cpu) == ({"leader", "follower"} if followers else {"server"}), cpu
        assert all(0 < v < 50 for v in cpu.values()), cpu
    assert list(tmp_path.iterdir()) == []  # the scratch files are removed


def _slow_fsync(tmp_path, delay_ms: float) -> tuple:
    """(a work directory, the environment of a process whose every fsync and fdatasync
    first sleeps ``delay_ms``: the chaos fault hook)."""
    from tests.support.chaos import FAULTS_PATH

    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "fsync_delay_ms").write_text(f"{delay_ms:g}")
    work = tmp_path / "work"
    work.mkdir()
    return work, dict(os.environ, PYTHONPATH=FAULTS_PATH, NEBULA_FAULTS_DIR=str(faults))


def test_bench_floor_chains_adds_a_group_commit_scenario(tmp_path) -> None:
    """--floor --chains 1,8: the usual scenarios plus 8 clients at once on 3 nodes; every
    client's timed requests are counted, with CPU per request by role."""
    d = _floor(tmp_path, "--chains", "1,8")
    name = "3 nodes, 8 at once, group commit"
    assert set(d["scenarios"]) == set(_FLOOR_SCENARIOS) | {name}
    sc = d["scenarios"][name]
    assert (sc["followers"], sc["fdatasyncs_per_node"], sc["connections"]) == (2, 1, 8)
    _check_latency(sc["latency_ms"], 8 * 150)
    assert set(sc["cpu_ms_per_request"]) == {"leader", "follower"}
    one = d["scenarios"]["3 nodes, majority durable"]
    assert one["connections"] == 1
    # the ratios --local 3 --chains 1,8 reports for Nebula, here for the floor: from the
    # two scenarios' own numbers
    (cmp,) = d["chains_comparison"]
    assert cmp["connections"] == 8
    want_rps = sc["throughput_rps"] / one["throughput_rps"]
    want_p50 = sc["latency_ms"]["p50"] / one["latency_ms"]["p50"]
    assert cmp["throughput_ratio"] == pytest.approx(want_rps, rel=0.01)
    assert cmp["p50_ratio"] == pytest.approx(want_p50, rel=0.01)


def test_the_group_commit_floor_shares_one_sync_among_the_clients(tmp_path) -> None:
    """With every fdatasync slowed by D ms, 8 clients at once still get a round trip in
    about one or two D (their requests share the leader's and the followers' syncs), where
    a sync per request would take 8 D; and the throughput is several times one client's."""
    from nebula.bench import floor

    delay = 10.0
    work, env = _slow_fsync(tmp_path, delay)
    code = (
        "import json, sys; from nebula.bench import floor as f; "
        "r = f.run_floor(30, 2, sys.argv[1], scenarios=(f.SCENARIOS[3], f.group_scenario(8))); "
        "print(json.dumps([(x.latency.p50, x.throughput_rps) for x in r]))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(work)], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=240, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    (one_p50, one_rps), (grp_p50, grp_rps) = json.loads(p.stdout)
    assert delay <= one_p50 < 2 * delay, one_p50
    assert delay <= grp_p50 < 3.5 * delay, grp_p50  # 8 syncs in turn would be >= 8 D
    assert grp_rps > 2.5 * one_rps, (grp_rps, one_rps)
    assert floor.group_scenario(8).connections == 8


def test_cpu_time_counts_every_thread_in_nanoseconds() -> None:
    """A second thread's busy loop shows in the process's CPU time (schedstat sums the
    live threads); a process that is gone has none."""
    import threading
    import time

    from nebula.bench.stats import cpu_time

    before = cpu_time(os.getpid())
    assert before is not None
    spun, done = threading.Event(), threading.Event()

    def spin() -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        spun.set()
        done.wait(10)

    t = threading.Thread(target=spin)
    t.start()
    try:
        assert spun.wait(10)
        after = cpu_time(os.getpid())
    finally:
        done.set()
        t.join()
    assert after is not None and after - before >= 0.05
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_time(gone.pid) is None


def test_bench_floor_scenarios_really_sync(tmp_path) -> None:
    """With every fdatasync slowed by D ms (fault hook), each scenario's latency shows
    exactly the durable writes it claims on its critical path: none for loopback, one for
    a single sync and for a majority of nodes, two in sequence for the mirrored file.

    D is chosen to dwarf what a loaded machine adds to a median round trip (a 4 ms delay
    was within reach of scheduling noise on two busy cores), so the bands below separate
    0, 1 and 2 syncs by the delay itself, not by the machine being quiet."""
    delay = 25.0
    work, env = _slow_fsync(tmp_path, delay)
    d = _floor(work, "--requests", "40", env=env)
    p50 = {name: sc["latency_ms"]["p50"] for name, sc in d["scenarios"].items()}
    assert p50["loopback"] < delay, p50
    for name in ("1 node, 1 fdatasync", "3 nodes, majority durable", "5 nodes, majority durable"):
        assert delay <= p50[name] < 2 * delay, (name, p50)
    assert p50["1 node, 2 fdatasyncs"] >= 2 * delay, p50
    assert (tmp_path / "faults" / "active").exists()  # the hook announced itself


# ---- several chains at once (--chains) -------------------------------------------------


def _check_chains_run(d: dict, chains: int, requests: int, *, nodes: int) -> None:
    """What every multi-chain run must show: each chain answered every request, every
    signature verified against that chain's own key, aggregates add up."""
    assert d["errors"] == 0 and d["warmup_errors"] == 0 and d["error_samples"] == [], d
    assert d["chains"] == chains and d["setup"]["chains"] == chains
    ids = [f"bench-chain-{i}" for i in range(1, chains + 1)]
    assert d["setup"]["chain_ids"] == ids
    assert d["setup"]["nodes"] == nodes and d["setup"]["requests_per_chain"] == requests
    assert "after the timed window" in d["setup"]["verified"]
    per = d["per_chain"]
    assert [c["chain_id"] for c in per] == ids
    # v1_0: one signature per request, plus the extension signature of each precommit
    # (the warm-up is a multiple of 3: the timed requests start with a proposal)
    precommits = requests // 3
    for c in per:
        assert c["requests"] == requests and c["errors"] == 0 and c["warmup_errors"] == 0, c
        assert c["signatures_verified"] == requests + precommits, c
        assert c["start_height"] == 1
        _check_latency(c["latency_ms"], requests)
        assert c["p50_ms"] == c["latency_ms"]["p50"] and c["p99_ms"] == c["latency_ms"]["p99"]
        assert c["throughput_rps"] > 0 and c["signatures_per_s"] > 0
    # each chain has its own fresh key
    assert len({c["pub_key"] for c in per}) == chains
    assert d["requests"] == chains * requests
    assert d["signatures_verified"] == sum(c["signatures_verified"] for c in per)
    _check_latency(d["latency_ms"]["all"], chains * requests)
    assert d["throughput_rps"] == pytest.approx(d["requests"] / d["duration_s"], rel=0.01)
    assert d["signatures_per_s"] == pytest.approx(
        d["signatures_verified"] / d["duration_s"], rel=0.01
    )
    worst = max(per, key=lambda c: c["p50_ms"])
    assert d["worst_chain"] == worst["chain_id"] and d["worst_chain_p50_ms"] == worst["p50_ms"]
    cpu = d["cpu_ms_per_request"]
    assert set(cpu) == {*(f"node {i}" for i in range(1, nodes + 1)), "bench client"}, cpu
    assert cpu["bench client"]["role"] == "validator"
    for c in cpu.values():
        assert c["user"] >= 0 and c["system"] >= 0
    ph = d["phases_mean_ms"]
    assert ph is not None, d["phases_note"]
    assert ph["replicate"] is not None and ph["replicate"] > 0


def test_bench_local_four_chains_json() -> None:
    """--local 1 --chains 4: four chains with their own keys and validators, driven at
    once; every chain answered, every signature verified against its own key."""
    p = _bench("--local", "1", "--chains", "4", "--requests", "200", "--warmup", "21",
               "--handshakes", "2", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    _check_chains_run(d, 4, 200, nodes=1)
    assert d["setup"]["persist"] == "local" and d["setup"]["client"] == "loop"
    assert d["cpu_ms_per_request"]["node 1"]["role"] == "signer"
    # the signer did the work of all four chains: not free
    assert d["cpu_ms_per_request"]["node 1"]["total"] > 0.02
    assert d["handshakes_ms"]["count"] == 2


def test_bench_local_cluster_two_chains_json() -> None:
    p = _bench("--local", "3", "--chains", "2", "--requests", "150", "--warmup", "15",
               "--handshakes", "0", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    _check_chains_run(d, 2, 150, nodes=3)
    assert d["setup"]["persist"] == "raft"
    roles = sorted(
        c["role"] for label, c in d["cpu_ms_per_request"].items() if label != "bench client"
    )
    if d["roles_stable"]:
        assert roles == ["follower", "follower", "leader"]
    else:
        assert "leadership moved during the timed run" in d["roles_note"]


def test_bench_chains_comparison_threads_unix() -> None:
    """--chains 1,2 runs each count on fresh nodes and compares them with the 1-chain run
    of the same round (here with the thread-per-chain client over unix sockets)."""
    p = _bench("--local", "1", "--chains", "1,2", "--requests", "90", "--warmup", "9",
               "--handshakes", "0", "--client", "threads", "--transport", "unix",
               "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    one, two = d["runs"]
    _check_chains_run(one, 1, 90, nodes=1)
    _check_chains_run(two, 2, 90, nodes=1)
    for r in (one, two):
        assert r["setup"]["client"] == "threads" and r["setup"]["transport"] == "unix"
        assert r["setup"]["round"] == 1
    base, many = d["comparison"]
    assert (base["chains"], many["chains"]) == (1, 2)
    assert base["aggregate_ratio"] == 1.0 and base["worst_p50_ratio"] == 1.0
    assert many["baseline_chains"] == 1 and many["errors"] == 0
    assert many["aggregate_ratio"] == pytest.approx(
        two["signatures_per_s"] / one["signatures_per_s"], abs=2e-3
    )
    assert many["worst_p50_ratio"] == pytest.approx(
        two["worst_chain_p50_ms"] / one["latency_ms"]["all"]["p50"], abs=2e-3
    )


def test_bench_chains_1_is_the_single_chain_report() -> None:
    """--chains 1 (the default) keeps the single-chain run and JSON."""
    p = _bench("--local", "1", "--chains", "1", "--requests", "30", "--warmup", "3",
               "--handshakes", "0", "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    assert "per_chain" not in d and "chains" not in d["setup"]
    assert d["setup"]["chain_id"] == "bench-chain" and d["requests"] == 30


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--local", "1", "--chains", "0"], "each count must be in 1..64"),
        (["--local", "1", "--chains", "2,x"], "--chains takes a number or a list"),
        (["--listen", "tcp://127.0.0.1:1", "--chains", "2"], "are for --local runs"),
        (["--local", "1", "--chains", "2", "--histogram", "h.png"], "single-chain runs"),
    ],
)
def test_bench_chains_refuses_bad_arguments(args: list[str], why: str) -> None:
    p = _bench(*args, "--requests", "10")
    assert p.returncode == 2, p.stderr
    assert why in p.stderr and "Traceback" not in p.stderr


def test_run_chains_asks_each_validator_for_its_own_chain() -> None:
    """Each chain's requests go to that chain's validator connection: paired with the
    other chain's listener, the signer refuses the chain id (no silent cross-signing)."""
    from nebula.bench.client import BlockingListener
    from nebula.bench.local import LocalSigners
    from nebula.bench.multi import run_chains
    from nebula.bench.runner import RunOptions
    from nebula.errors import NebulaError

    fam = WireFamily.V1_0
    with LocalSigners(1, chain_id="x", version=fam.value, chains=2) as signers:
        assert signers.chain_ids == ["x-1", "x-2"]
        assert signers.keys[0].public_key != signers.keys[1].public_key
        listeners = [BlockingListener(a, fam) for a in signers.listen_addresses]
        for li in listeners:
            li.start()
        try:
            opts = [
                RunOptions(chain_id=c, family=fam, requests=3, warmup=0, accept_timeout=20)
                for c in reversed(signers.chain_ids)
            ]
            with pytest.raises(NebulaError, match=r"refused PubKeyRequest.*is not"):
                run_chains(listeners, opts)
        finally:
            for li in listeners:
                li.close()


@pytest.mark.parametrize(
    ("nodes", "key_type"), [("1", "ed25519"), ("1", "secp256k1"), ("3", "ed25519")]
)
def test_bench_local_pkcs11_signs_from_a_softhsm_token(nodes: str, key_type: str) -> None:
    """--backend pkcs11: the nodes sign with a key generated in a SoftHSM2 token (each node
    of a cluster from its own clone); every signature verifies against the public key the
    token reported."""
    p = _bench(
        "--local", nodes, "--backend", "pkcs11", "--key-type", key_type,
        "--requests", "150", "--warmup", "20", "--handshakes", "0", "--json",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    assert d["errors"] == 0 and d["warmup_errors"] == 0, d["error_samples"]
    assert d["setup"]["backend"] == "pkcs11" and d["setup"]["key_type"] == key_type
    assert "SoftHSM2 token (PKCS#11)" in d["setup"]["mode"]
    assert d["signatures_verified"] == 150 + 50  # + an extension signature per precommit
    _check_latency(d["latency_ms"]["all"], 150)
    assert d["phases_mean_ms"]["sign"] > 0


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--local", "1", "--backend", "pkcs11", "--chains", "2"], "runs one chain"),
        (["--local", "1", "--backend", "pkcs11", "--key-type", "bls12381"], "ed25519 or secp256k1"),
        (["--listen", "tcp://127.0.0.1:1", "--backend", "pkcs11"], "for --local runs"),
        (
            ["--local", "3", "--key-type", "bls12381", "--threshold", "2", "--chains", "2"],
            "--threshold runs one chain",
        ),
    ],
)
def test_bench_pkcs11_refuses_what_it_cannot_run(args: list[str], why: str) -> None:
    p = _bench(*args)
    assert p.returncode == 2, p.stderr
    assert why in p.stderr and "Traceback" not in p.stderr
