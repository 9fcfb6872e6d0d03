"""One Nebula serves several chains (issue 12), with real `nebula start` processes.

* Two chains on different CometBFT lines, each with its own key and validator
  connection, sign concurrently; a request naming another chain is refused on that
  connection (with the refusal metric) and changes nothing.
* Each chain's sign state survives a restart and an export/import round trip without
  touching the other's (the local store, and a 3-node Raft cluster through its admin
  socket).
* A chain whose backend hangs (an OpenBao server behind a black-holed link) never
  stalls another chain.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from nebula import proto
from nebula.aio.validator_side import PrivvalListener
from nebula.crypto.keys import SigningKey, generate
from nebula.devnet.cluster import ChainDef, NebulaNode, write_node_dir
from nebula.errors import NebulaError
from nebula.types import (
    PubKeyRequest,
    SignVoteRequest,
    WireFamily,
)
from tests.support.cluster import Auditor, ProcCluster, driver
from tests.support.ports import free_port, free_ports
from tests.support.proxy import Proxy
from tests.support.votes import vote

A, B = "chain-a", "chain-b"


def _addrs(n: int) -> list[str]:
    return [f"tcp://127.0.0.1:{p}" for p in free_ports(n)]


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _node(home: Path, chains: list[ChainDef], extra: str = "") -> NebulaNode:
    d = write_node_dir(home, chains=chains, extra=extra)
    return NebulaNode(d.config_path, log_path=d.log_path, cwd=d.home)


def _node_with_vault_chain(
    tmp_path: Path, kb: SigningKey, ab: str, aa: str, port: int, token: str, extra: str = ""
) -> NebulaNode:
    """A signer serving chain B (native key ``kb``, validator at ``ab``) and chain A
    through Vault transit key "val" at 127.0.0.1:``port`` (validator at ``aa``);
    ``extra``: more lines for A's [chains.signing.vault_transit]."""
    (tmp_path / "token").write_text(token)
    (tmp_path / "token").chmod(0o600)
    node = _node(tmp_path / "neb", [ChainDef(B, "v0_38", kb, [ab])])
    with node.config_path.open("a") as f:
        f.write(f"""
[[chains]]
chain_id = "{A}"
version = "v0_38"
signing_mode = "vault_transit"
[chains.signing.vault_transit]
address = "http://127.0.0.1:{port}"
key_name = "val"
token_path = "{tmp_path / "token"}"
{extra}
[[chains.connections]]
address = "{aa}"
""")
    return node


async def _sign(conn, chain: str, key: SigningKey, h: int, r: int = 0) -> bytes:
    resp = await conn.request(SignVoteRequest(vote(h, r), chain), timeout=10)
    assert resp.error is None, resp.error
    sig = resp.vote.signature
    assert key.verify(proto.vote_sign_bytes(chain, vote(h, r)), sig)
    return sig


def test_two_chains_sign_concurrently_and_a_foreign_chain_id_is_refused(tmp_path) -> None:
    ka, kb = generate("ed25519"), generate("secp256k1")
    aa, ab = _addrs(2)
    mport = free_port()
    node = _node(
        tmp_path / "neb",
        [ChainDef(A, "v0_38", ka, [aa]), ChainDef(B, "v1_0", kb, [ab])],
        extra=f'[metrics]\nlisten = "127.0.0.1:{mport}"\n',
    )

    async def main() -> None:
        la, lb = PrivvalListener(aa, WireFamily.V0_38), PrivvalListener(ab, WireFamily.V1_0)
        await la.start()
        await lb.start()
        with node:
            ca, cb = await la.accept(timeout=20), await lb.accept(timeout=20)

            async def run(conn, chain, key, n):
                return [await _sign(conn, chain, key, h) for h in range(1, n + 1)]

            sa, sb = await asyncio.gather(run(ca, A, ka, 60), run(cb, B, kb, 60))
            assert len(set(sa)) == 60 and len(set(sb)) == 60
            # Each chain answers with its own key only.
            pa = await ca.request(PubKeyRequest(A))
            pb = await cb.request(PubKeyRequest(B))
            assert pa.pub_key == ka.public_key and pb.pub_key == kb.public_key
            # Chain B's id on chain A's connection: refused there, nothing changes.
            wrong = await ca.request(SignVoteRequest(vote(61), B), timeout=10)
            assert wrong.error is not None and wrong.vote.signature == b""
            assert "chain id" in wrong.error.description
            wrong_pk = await ca.request(PubKeyRequest(B))
            assert wrong_pk.error is not None and wrong_pk.pub_key == b""
            # B's state did not move: its next height signs, and its last one is a retry.
            assert await _sign(cb, B, kb, 60) == sb[-1]
            await _sign(cb, B, kb, 61)
            await _sign(ca, A, ka, 61)
            text = _metrics(mport)
            # Counted under the chain of the connection they came on: the id a request
            # names is the validator's input, never a label of its own (found in review).
            assert f'nebula_refusals_total{{chain_id="{A}",reason="chain_id_mismatch"}} 2.0' in text
            assert f'nebula_refusals_total{{chain_id="{B}",reason="chain_id_mismatch"}}' not in text
            assert f'nebula_last_signed_height{{chain_id="{A}"}} 61.0' in text
            assert f'nebula_last_signed_height{{chain_id="{B}"}} 61.0' in text
            # every request counted under the chain of the connection it came on
            assert f'nebula_requests_total{{chain_id="{A}",type="SignVoteRequest"}} 62.0' in text
            assert f'nebula_requests_total{{chain_id="{B}",type="SignVoteRequest"}} 62.0' in text
            st = json.loads(_cli("status", "-c", str(node.config_path), "--json").stdout)[0]
            assert set(st["served"]) == {A, B}
            assert st["served"][A]["version"] == "v0_38" and st["served"][B]["version"] == "v1_0"
            assert st["served"][B]["key_type"] == "secp256k1"
            assert st["served"][A]["state"]["height"] == "61"
        await la.close()
        await lb.close()

    asyncio.run(main())


def _export(config: Path, chain: str) -> dict:
    r = _cli("state", "export", "-c", str(config), "--chain", chain)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_each_chains_state_survives_restart_and_import_export_local(tmp_path) -> None:
    ka, kb = generate("ed25519"), generate("ed25519")
    aa, ab = _addrs(2)
    node = _node(tmp_path / "neb", [ChainDef(A, "v0_38", ka, [aa]), ChainDef(B, "v0_38", kb, [ab])])
    cfg = node.config_path

    async def sign_some(hs_a: range, hs_b: range) -> None:
        la, lb = PrivvalListener(aa, WireFamily.V0_38), PrivvalListener(ab, WireFamily.V0_38)
        await la.start()
        await lb.start()
        with node:
            ca, cb = await la.accept(timeout=20), await lb.accept(timeout=20)
            for h in hs_a:
                await _sign(ca, A, ka, h)
            for h in hs_b:
                await _sign(cb, B, kb, h)
        await la.close()
        await lb.close()

    asyncio.run(sign_some(range(1, 11), range(1, 21)))
    before_b = _export(cfg, B)
    assert _export(cfg, A)["height"] == "10" and before_b["height"] == "20"

    # Without --chain a multi-chain config is ambiguous; an unknown chain names the file.
    r = _cli("state", "export", "-c", str(cfg))
    assert r.returncode != 0 and "--chain" in r.stderr
    r = _cli("state", "export", "-c", str(cfg), "--chain", "nope")
    assert r.returncode != 0 and str(cfg) in r.stderr and "'nope' is not configured" in r.stderr

    # Raise A's mark from a priv_validator_state.json: B is untouched.
    f = tmp_path / "a_state.json"
    f.write_text(json.dumps({"height": "50", "round": 0, "step": 0}))
    r = _cli("state", "import", "-c", str(cfg), "--chain", A, str(f))
    assert r.returncode == 0, r.stderr
    assert _export(cfg, A)["height"] == "50"
    assert _export(cfg, B) == before_b
    # A lower import never lowers it.
    f.write_text(json.dumps({"height": "5", "round": 0, "step": 0}))
    assert _cli("state", "import", "-c", str(cfg), "--chain", A, str(f)).returncode == 0
    assert _export(cfg, A)["height"] == "50"

    async def after_restart() -> None:
        la, lb = PrivvalListener(aa, WireFamily.V0_38), PrivvalListener(ab, WireFamily.V0_38)
        await la.start()
        await lb.start()
        with node:
            ca, cb = await la.accept(timeout=20), await lb.accept(timeout=20)
            low = await ca.request(SignVoteRequest(vote(40), A), timeout=10)
            assert low.error is not None and "height regression" in low.error.description
            await _sign(ca, A, ka, 51)
            low_b = await cb.request(SignVoteRequest(vote(19), B), timeout=10)
            assert low_b.error is not None and "height regression" in low_b.error.description
            await _sign(cb, B, kb, 21)
        await la.close()
        await lb.close()

    asyncio.run(after_restart())
    assert _export(cfg, A)["height"] == "51" and _export(cfg, B)["height"] == "21"


def test_each_chains_state_survives_a_cluster_restart_and_import_raft(tmp_path) -> None:
    ka, kb = generate("ed25519"), generate("ed25519")
    aa, ab = _addrs(2)
    chains = [ChainDef(A, "v0_38", ka, [aa]), ChainDef(B, "v1_0", kb, [ab])]
    cl = ProcCluster(tmp_path, 3, chains=chains)
    aud_a, aud_b = Auditor(ka.key_type, ka.public_key), Auditor(kb.key_type, kb.public_key)

    async def sign(da, db, hs_a, hs_b) -> None:
        async def one(d, chain, hs):
            for h in hs:
                await d.sign(SignVoteRequest(vote(h), chain), deadline=30)

        await asyncio.gather(one(da, A, hs_a), one(db, B, hs_b))

    async def main() -> None:
        async with (
            driver([aa], WireFamily.V0_38, A, aud_a) as da,
            driver([ab], WireFamily.V1_0, B, aud_b) as db,
        ):
            with cl:
                await cl.wait_leader()
                await sign(da, db, range(1, 31), range(1, 11))
                leader = await cl.wait_leader()
                cfg = cl.dirs[leader - 1].config_path  # an import goes through the leader
                b_before = _export(cfg, B)
                assert _export(cfg, A)["height"] == "30" and b_before["height"] == "10"
                # A first leader with no mark for a chain (no initial state) says so.
                text = cl.nodes[leader].log_tail(400_000)
                assert f"NO SIGN STATE for chain {A}" in text
                assert f"NO SIGN STATE for chain {B}" in text
                # A follower's applied state may trail: it refuses and names the leader.
                follower = next(d for d in cl.dirs if d.node_id != leader)
                r = _cli("state", "export", "-c", str(follower.config_path), "--chain", A)
                assert r.returncode == 2 and f"export through the leader (node {leader})" in (
                    r.stderr
                ), r.stderr
                f = tmp_path / "a.json"
                f.write_text(json.dumps({"height": "100", "round": 0, "step": 0}))
                r = _cli("state", "import", "-c", str(cfg), "--chain", A, str(f))
                assert r.returncode == 0, r.stderr
                assert _export(cfg, A)["height"] == "100"
                assert _export(cfg, B) == b_before
            # Every member stopped; start them all again.
            with cl:
                # the leader: it has applied every committed entry before it serves
                leader = await cl.wait_leader()
                cfg = cl.dirs[leader - 1].config_path
                assert _export(cfg, A)["height"] == "100"
                assert _export(cfg, B) == b_before
                low = await da.answer(SignVoteRequest(vote(99), A))
                assert low.error is not None and "height regression" in low.error.description
                await sign(da, db, range(101, 106), range(11, 16))
                r = _cli("state", "export", "-c", str(cfg), "--chain", A, "--offline")
                assert r.returncode == 2 and "in use" in r.stderr, r.stderr
            # A cluster that lost its majority has no leader to export through: each
            # stopped member's data is read offline; the highest is the last commit.
            heights = {A: [], B: []}
            for d in cl.dirs:
                for chain in (A, B):
                    r = _cli(
                        "state", "export", "-c", str(d.config_path), "--chain", chain, "--offline"
                    )
                    assert r.returncode == 0 and "one member's view" in r.stderr, r.stderr
                    heights[chain].append(int(json.loads(r.stdout)["height"]))
            assert max(heights[A]) == 105 and max(heights[B]) == 15, heights
        aud_a.check()
        aud_b.check()

    asyncio.run(main())
    assert aud_a.count >= 35 and aud_b.count >= 15


def test_a_hanging_backend_never_stalls_another_chain(tmp_path) -> None:
    from tests.support.openbao import OpenBao

    kb = generate("ed25519")
    aa, ab = _addrs(2)
    with OpenBao() as bao:
        bao.client().secrets.transit.create_key("val", key_type="ed25519", mount_point="transit")
        proxy = Proxy(free_port(), bao.port).start()
        try:
            node = _node_with_vault_chain(
                tmp_path,
                kb,
                ab,
                aa,
                proxy.listen_port,
                bao.root_token,
                'mount = "transit"\ntimeout = 2.0',
            )

            async def main() -> None:
                la = PrivvalListener(aa, WireFamily.V0_38)
                lb = PrivvalListener(ab, WireFamily.V0_38)
                await la.start()
                await lb.start()
                with node:
                    ca, cb = await la.accept(timeout=30), await lb.accept(timeout=30)
                    r = await ca.request(SignVoteRequest(vote(1), A), timeout=10)
                    assert r.error is None and r.vote.signature
                    proxy.blackhole()  # Vault now accepts bytes and never answers
                    hung = asyncio.ensure_future(
                        ca.request(SignVoteRequest(vote(2), A), timeout=30)
                    )
                    await asyncio.sleep(0.2)  # A's decision is waiting on Vault now
                    assert not hung.done()
                    # B signs a run of heights while A's request is still waiting.
                    for h in range(1, 41):
                        await _sign(cb, B, kb, h)
                    assert not hung.done(), "chain B waited for chain A's hanging backend"
                    # A's request ends as a refusal or a dropped connection, never a
                    # signature.
                    try:
                        resp = await hung
                    except (NebulaError, OSError, asyncio.IncompleteReadError):
                        pass
                    else:
                        assert resp.error is not None and resp.vote.signature == b""
                    proxy.heal()
                    await _sign(cb, B, kb, 41)
                await la.close()
                await lb.close()

            asyncio.run(main())
        finally:
            proxy.stop()


def test_a_backend_down_at_start_keeps_only_its_own_chain_waiting(tmp_path) -> None:
    """Chain A's Vault is unreachable when the signer starts: chain B is served at once
    (it used to exit, and systemd's restarts kept every chain down), A is shown as
    waiting on its backend, and once Vault answers A connects and signs - no restart
    (found in review)."""
    from tests.support.openbao import OpenBao

    kb = generate("ed25519")
    aa, ab = _addrs(2)
    with OpenBao() as bao:
        bao.client().secrets.transit.create_key("val", key_type="ed25519", mount_point="transit")
        proxy = Proxy(free_port(), bao.port)  # not started: the address refuses connections
        try:
            node = _node_with_vault_chain(tmp_path, kb, ab, aa, proxy.listen_port, bao.root_token)

            async def main() -> None:
                la = PrivvalListener(aa, WireFamily.V0_38)
                lb = PrivvalListener(ab, WireFamily.V0_38)
                await la.start()
                await lb.start()
                with node:
                    cb = await lb.accept(timeout=30)
                    for h in range(1, 6):
                        await _sign(cb, B, kb, h)
                    st = json.loads(_cli("status", "-c", str(node.config_path), "--json").stdout)
                    served = st[0]["served"]
                    assert "cannot reach Vault" in served[A]["backend_unavailable"], served
                    assert served[B]["validators_connected"] == 1
                    proxy.start()  # Vault reachable now
                    ca = await la.accept(timeout=40)
                    r = await ca.request(SignVoteRequest(vote(1), A), timeout=10)
                    assert r.error is None and r.vote.signature
                    await _sign(cb, B, kb, 6)
                    assert "backend connected" in node.log_tail(200_000)
                await la.close()
                await lb.close()

            asyncio.run(main())
        finally:
            proxy.stop()


class _DripServer:
    """Accepts HTTP requests and answers one header byte every ``interval`` seconds,
    forever: each read of a client with a per-read timeout succeeds, so the call never
    times out (a Vault behind a broken proxy, or a slowloris in reverse)."""

    def __init__(self, interval: float = 0.3) -> None:
        import socket
        import threading

        self.interval = interval
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn) -> None:  # type: ignore[no-untyped-def]
        data = b"HTTP/1.1 200 OK\r\n" + b"X-Drip: " + b"a" * 100_000
        with conn:
            for i in range(len(data)):
                if self._stop.wait(self.interval):
                    return
                try:
                    conn.sendall(data[i : i + 1])
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def test_a_backend_that_answers_a_byte_at_a_time_at_start_holds_only_its_chain(
    tmp_path,
) -> None:
    """Chain A's Vault answers the start-up calls one byte every 0.3 s (each read is
    within the client's timeout, so the call never ends): chain B is served after at most
    the start's wait for backends, A is shown waiting, and the signer still stops at
    once on SIGTERM (found in review: the start-up calls ran on the loop and held every
    chain for as long as the drip lasted)."""
    import time

    from nebula.aio.daemon import Daemon

    kb = generate("ed25519")
    aa, ab = _addrs(2)
    drip = _DripServer()
    try:
        node = _node_with_vault_chain(
            tmp_path, kb, ab, aa, drip.port, "s.not-a-real-token", "timeout = 1.0"
        )

        async def main() -> None:
            lb = PrivvalListener(ab, WireFamily.V0_38)
            await lb.start()
            t0 = time.monotonic()
            with node:
                cb = await lb.accept(timeout=Daemon.BACKEND_START_WAIT + 20)
                assert time.monotonic() - t0 < Daemon.BACKEND_START_WAIT + 15
                for h in range(1, 6):
                    await _sign(cb, B, kb, h)
                assert drip.accepted >= 1  # A's start-up call is still dripping
                st = json.loads(_cli("status", "-c", str(node.config_path), "--json").stdout)
                served = st[0]["served"]
                assert "no answer within" in served[A]["backend_unavailable"], served
                t1 = time.monotonic()
                assert node.stop(timeout=15) == 0
                assert time.monotonic() - t1 < 10, "the dripping call held the shutdown"
            # A SIGTERM during the start's wait for that backend ends the start at once.
            seen = drip.accepted
            with node:
                deadline = time.monotonic() + 30
                while drip.accepted == seen and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert drip.accepted > seen, "the restarted signer never tried Vault"
                t2 = time.monotonic()
                assert node.stop(timeout=15) == 0
                stopped = time.monotonic() - t2
                assert stopped < Daemon.BACKEND_START_WAIT / 2, f"held {stopped:.1f}s"
            await lb.close()

        asyncio.run(main())
    finally:
        drip.close()


def test_adding_a_chain_with_a_rolling_restart_leaves_the_other_chains_state(tmp_path) -> None:
    """A config change and a restart of one member at a time adds chain B to a cluster
    that signs chain A: A keeps its mark and keeps signing, B starts from its import."""
    from nebula.crypto.keys import write_key_file

    ka, kb = generate("ed25519"), generate("ed25519")
    aa, ab = _addrs(2)
    cl = ProcCluster(tmp_path, 3, chains=[ChainDef(A, "v0_38", ka, [aa])])
    aud_a, aud_b = Auditor(ka.key_type, ka.public_key), Auditor(kb.key_type, kb.public_key)
    b_state = tmp_path / "b_state.json"
    b_state.write_text(json.dumps({"height": "500", "round": 0, "step": 3}))

    async def main() -> None:
        async with (
            driver([aa], WireFamily.V0_38, A, aud_a) as da,
            driver([ab], WireFamily.V1_0, B, aud_b) as db,
        ):
            with cl:
                await cl.wait_leader()
                for h in range(1, 21):
                    await da.sign(SignVoteRequest(vote(h), A), deadline=30)
                leader = await cl.wait_leader()  # an export goes through the leader
                a_before = _export(cl.dirs[leader - 1].config_path, A)
                h = 21
                for d in cl.dirs:  # followers and the leader alike, one at a time
                    node = cl.nodes[d.node_id]
                    node.stop()
                    write_key_file(d.home / "privkey-b", kb, overwrite=True)
                    with d.config_path.open("a") as f:
                        f.write(
                            f'\n[[chains]]\nchain_id = "{B}"\nversion = "v1_0"\n'
                            f'initial_state_path = "{b_state}"\n'
                            '[chains.signing.native]\nprivate_key_path = "./privkey-b"\n'
                            f'[[chains.connections]]\naddress = "{ab}"\n'
                        )
                    node.start()
                    await cl.wait_leader()
                    # A keeps signing through every restart.
                    await da.sign(SignVoteRequest(vote(h), A), deadline=30)
                    h += 1
                leader = await cl.wait_leader()
                cfg = cl.dirs[leader - 1].config_path
                # B's mark is its import; it signs above it and refuses below.
                assert _export(cfg, B)["height"] == "500"
                low = await db.answer(SignVoteRequest(vote(400), B))
                assert low.error is not None and "height regression" in low.error.description
                await db.sign(SignVoteRequest(vote(501), B), deadline=30)
                # B came with its initial state: no leader warned about it.
                for d in cl.dirs:
                    assert f"NO SIGN STATE for chain {B}" not in cl.nodes[d.node_id].log_tail(
                        400_000
                    )
                # A's state only moved by its own signatures.
                a_after = _export(cfg, A)
                assert int(a_after["height"]) == h - 1 > int(a_before["height"]) == 20
        aud_a.check()
        aud_b.check()

    asyncio.run(main())
