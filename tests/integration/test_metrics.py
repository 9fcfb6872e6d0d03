"""Prometheus metrics and health endpoints of a real `nebula start` process."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from nebula.aio.validator_side import PrivvalListener
from nebula.crypto.keys import generate
from nebula.types import SignVoteRequest, WireFamily
from tests.integration.test_single_node import CHAIN, vote
from tests.support.nebula_proc import NebulaProcess
from tests.support.ports import free_ports


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_health_and_ready(tmp_path) -> None:
    key = generate("ed25519")
    pv_port, m_port = free_ports(2)
    addr = f"tcp://127.0.0.1:{pv_port}"
    base = f"http://127.0.0.1:{m_port}"

    async def main() -> str:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        neb = NebulaProcess(
            tmp_path / "neb",
            chain_id=CHAIN,
            version="v0_38",
            key=key,
            connections=[addr],
            extra=f'[metrics]\nlisten = "127.0.0.1:{m_port}"',
        )
        with neb:
            conn = await lst.accept(timeout=15)
            for h in range(1, 6):
                assert (await conn.request(SignVoteRequest(vote(h), CHAIN))).error is None
            r = await conn.request(SignVoteRequest(vote(2), CHAIN))  # a regression
            assert r.error is not None
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, _get, base + "/healthz") == (200, "ok\n")
            status, text = await loop.run_in_executor(None, _get, base + "/readyz")
            assert status == 200 and "ready" in text
            status, body = await loop.run_in_executor(None, _get, base + "/metrics")
            assert status == 200
            missing = await loop.run_in_executor(None, _get, base + "/nope")
            assert missing[0] == 404
        await lst.close()
        return body

    body = asyncio.run(main())
    assert f'nebula_last_signed_height{{chain_id="{CHAIN}"}} 5.0' in body
    assert f'nebula_signatures_total{{chain_id="{CHAIN}",type="prevote"}} 5.0' in body
    assert f'nebula_refusals_total{{chain_id="{CHAIN}",reason="regression"}} 1.0' in body
    assert 'nebula_sign_phase_seconds_count{phase="replicate"} 5.0' in body
    assert 'nebula_sign_phase_seconds_count{phase="total"} 6.0' in body
    assert "nebula_validator_connections 1.0" in body
    assert f'nebula_requests_total{{chain_id="{CHAIN}",type="SignVoteRequest"}} 6.0' in body


def test_json_logs_one_line_per_refusal(tmp_path) -> None:
    import json

    key = generate("ed25519")
    (pv_port,) = free_ports(1)
    addr = f"tcp://127.0.0.1:{pv_port}"
    neb = NebulaProcess(
        tmp_path / "neb",
        chain_id=CHAIN,
        version="v0_38",
        key=key,
        connections=[addr],
        log_format="json",
    )

    async def main() -> None:
        lst = PrivvalListener(addr, WireFamily.V0_38)
        await lst.start()
        with neb:
            conn = await lst.accept(timeout=15)
            assert (await conn.request(SignVoteRequest(vote(7), CHAIN))).error is None
            assert (await conn.request(SignVoteRequest(vote(6), CHAIN))).error is not None
            await asyncio.sleep(0.3)
        await lst.close()

    asyncio.run(main())
    records = [json.loads(line) for line in neb.log_text().splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    refusals = [r for r in records if r.get("event") == "refused"]
    assert len(refusals) == 1
    r = refusals[0]
    assert (r["chain_id"], r["hrs"], r["reason"], r["last_signed"]) == (
        CHAIN,
        "6/0/2",
        "regression",
        "7/0/2",
    )
    assert "height regression" in r["msg"]
