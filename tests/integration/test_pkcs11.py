"""The PKCS#11 backend against a real SoftHSM2 (issue 14).

In-process: generate / import / show / sign for Ed25519 and secp256k1, non-extractable
keys, every signature verified and low-S, a wrong PIN (never retried), a missing token or
key, a key deleted while running (refused, then recovered when it is back; a different
key under the same label is refused), a PIN file readable by others, a call that does not
return within the timeout.  Real processes: ``nebula start`` exits 3 on a wrong PIN; one
node serving an HSM chain and a native chain keeps signing the native one while the HSM
key is gone; a 3-node cluster whose members each sign from their own token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nebula import proto
from nebula.aio.validator_side import PrivvalListener
from nebula.backends import pkcs11 as hsm
from nebula.crypto.keys import (
    SECP256K1_N,
    generate,
    signature_verifier,
    write_priv_validator_key_json,
)
from nebula.errors import BackendError, ConfigError, CredentialRejected, KeyFileError
from nebula.types import SignVoteRequest, WireFamily
from tests.support.cluster import Auditor, ProcCluster, driver, vote_req
from tests.support.ports import free_ports
from tests.support.softhsm import USER_PIN, SoftHSM

pytestmark = pytest.mark.timeout(180)

_TOKENS = iter(range(1_000_000))


@pytest.fixture(scope="module")
def softhsm() -> Iterator[SoftHSM]:
    h = SoftHSM()
    h.activate()  # one PKCS#11 module per process: every in-process test uses this one
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def token(softhsm: SoftHSM) -> str:
    label = f"tok{next(_TOKENS)}"
    softhsm.init_token(label)
    return label


def settings(
    softhsm: SoftHSM, tmp_path: Path, label: str, key_type: str = "ed25519", **kw
) -> hsm.Pkcs11Settings:
    pin_path = kw.pop("pin_path", None) or softhsm.pin_file(tmp_path, kw.pop("pin", USER_PIN))
    return hsm.Pkcs11Settings.create(
        module_path=softhsm.module,
        token_label=label,
        pin_path=pin_path,
        key_type=key_type,
        key_label=kw.pop("key_label", "validator"),
        key_id=kw.pop("key_id", None),
        **kw,
    )


def sign_attempts(backend: hsm.Pkcs11Backend, n: int, between=lambda: None) -> list[str]:
    """``n`` signing attempts in a row: "signed" or the error of each; ``between`` runs
    after every attempt."""

    async def go() -> list[str]:
        out = []
        for _ in range(n):
            try:
                await backend.sign(b"x")
                out.append("signed")
            except BackendError as e:
                out.append(str(e))
            between()
        return out

    return run(go())


def run(coro):
    return asyncio.run(coro)


SECP256K1_HALF_N = SECP256K1_N // 2


@pytest.mark.parametrize("key_type", ["ed25519", "secp256k1"])
def test_generate_show_and_sign(softhsm, token, tmp_path, key_type) -> None:
    s = settings(softhsm, tmp_path, token, key_type)
    pub = hsm.generate_key(s)
    backend = hsm.Pkcs11Backend.connect(s)
    assert backend.public_key == pub and backend.key_type == key_type
    assert len(pub) == (32 if key_type == "ed25519" else 33)
    verify = signature_verifier(key_type, pub)

    async def go() -> list[bytes]:
        return [await backend.sign(b"vote %d" % i) for i in range(40)]

    sigs = run(go())
    for i, sig in enumerate(sigs):
        assert len(sig) == 64 and verify(b"vote %d" % i, sig)
        if key_type == "secp256k1":
            assert int.from_bytes(sig[32:], "big") <= SECP256K1_HALF_N  # low-S
    # Generated inside the token: sensitive and never extractable.
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    lib = hsm.load_module(softhsm.module)
    with lib.get_token(token_label=token).open() as session:
        # (this process is logged in already: the backend's session)
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="validator")
        assert priv[Attribute.EXTRACTABLE] is False and priv[Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.PKCS11Error):
            priv[Attribute.VALUE]
    backend.release()
    # Generating again under the same label is refused, nothing is overwritten.
    with pytest.raises(BackendError, match="already holds a key"):
        hsm.generate_key(s)


@pytest.mark.parametrize("key_type", ["ed25519", "secp256k1"])
def test_import_keeps_the_address_and_signs_like_the_key(softhsm, token, tmp_path, key_type):
    key = generate(key_type)
    s = settings(softhsm, tmp_path, token, key_type)
    assert hsm.import_key(s, key.secret_bytes(), key.public_key) == key.public_key
    backend = hsm.Pkcs11Backend.connect(s)
    assert backend.address == key.address

    async def go() -> bytes:
        return await backend.sign(b"proposal")

    sig = run(go())
    assert key.verify(b"proposal", sig)
    if key_type == "ed25519":
        assert sig == key.sign(b"proposal")  # Ed25519 is deterministic
    backend.release()


def test_cli_generate_import_show(softhsm, tmp_path) -> None:
    cfg = tmp_path / "nebula.toml"
    env = {**softhsm.env}
    t1, t2 = f"cli{next(_TOKENS)}", f"cli{next(_TOKENS)}"
    softhsm.init_token(t1)
    softhsm.init_token(t2)
    softhsm.pin_file(tmp_path)
    cfg.write_text(
        f"""chain_id = "c"
signing_mode = "pkcs11"
[signing.pkcs11]
module_path = "{softhsm.module}"
token_label = "{t1}"
pin_path = "./hsm_pin"
key_label = "validator"
key_type = "ed25519"
"""
    )

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        import os

        return subprocess.run(
            [sys.executable, "-m", "nebula.cli.main", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )

    r = cli("hsm", "generate", "-c", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    gen = json.loads(r.stdout)
    assert "cannot be extracted" in r.stderr
    r = cli("hsm", "show", "-c", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["address"] == gen["address"]
    # Import a CometBFT key file into the second token, secp256k1, with a warning.
    key = generate("secp256k1")
    kf = tmp_path / "priv_validator_key.json"
    write_priv_validator_key_json(kf, key)
    r = cli("hsm", "import", str(kf), "-c", str(cfg), "--token-label", t2, "--json")
    assert r.returncode == 0, r.stderr
    assert "WARNING: this key existed outside the HSM" in r.stderr
    out = json.loads(r.stdout)
    assert out["address"] == key.address.hex().upper() and out["key_type"] == "secp256k1"
    r = cli("hsm", "show", "-c", str(cfg), "--token-label", t2, "--key-type", "secp256k1")
    assert r.returncode == 0 and key.address.hex().upper() in r.stdout
    # Clear errors: a missing token, a missing key.
    r = cli("hsm", "show", "-c", str(cfg), "--token-label", "absent")
    assert r.returncode == 2 and "no PKCS#11 token labelled 'absent'" in r.stderr
    assert t1 in r.stderr  # the tokens present are listed
    r = cli("hsm", "show", "-c", str(cfg), "--key-label", "other")
    assert r.returncode == 2 and "no private key with label 'other'" in r.stderr


def test_wrong_pin_is_refused_clearly_and_not_retried(softhsm, token, tmp_path) -> None:
    good = settings(softhsm, tmp_path, token)
    hsm.generate_key(good)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = settings(softhsm, bad_dir, token, pin="000000")
    with pytest.raises(CredentialRejected, match=r"PIN was rejected .* does not retry"):
        hsm.Pkcs11Backend.connect(bad)
    # A PIN file readable by others is refused before the token is touched.
    loose = tmp_path / "loose"
    loose.mkdir()
    with pytest.raises(KeyFileError, match="hsm_pin"):
        settings(softhsm, loose, token, pin_path=softhsm.pin_file(loose, mode=0o644))
    # While running: the session breaks and the token now wants another PIN -> the backend
    # stops for good (no second attempt), even once the right PIN would work again.
    backend = hsm.Pkcs11Backend.connect(good)
    backend._drop_session()  # as after a device error
    object.__setattr__(backend.settings, "pin", "000000")

    # fixed after the first attempt: still refused
    errs = sign_attempts(backend, 3, lambda: object.__setattr__(backend.settings, "pin", USER_PIN))
    assert all("PIN was rejected" in e and "restart Nebula" in e for e in errs), errs
    assert backend.reconnects == 0
    backend.release()


def _two_chains_on_one_token(softhsm, token, tmp_path):
    ka, kb = generate("ed25519"), generate("ed25519")
    sa = settings(softhsm, tmp_path, token, key_label="chain-a")
    sb = settings(softhsm, tmp_path, token, key_label="chain-b")
    hsm.import_key(sa, ka.secret_bytes(), ka.public_key)
    hsm.import_key(sb, kb.secret_bytes(), kb.public_key)
    return sa, sb, hsm.Pkcs11Backend.connect(sa), hsm.Pkcs11Backend.connect(sb)


def test_one_chains_key_failure_leaves_another_chain_on_the_token_signing(
    softhsm, token, tmp_path
) -> None:
    """Two chains' keys on one token.  A login belongs to the process: the session that
    logged in used to be a backend's own, and closing it (chain A's key deleted, its
    session dropped) logged chain B out too (found in review)."""
    sa, _sb, a, b = _two_chains_on_one_token(softhsm, token, tmp_path)
    try:
        assert sign_attempts(a, 1) == sign_attempts(b, 1) == ["signed"]
        hsm.delete_key(sa)
        (err,) = sign_attempts(a, 1)
        assert "failed to sign" in err, err
        assert sign_attempts(b, 5) == ["signed"] * 5
        a._next_attempt = 0.0  # A reconnects (and fails: its key is gone) ...
        assert sign_attempts(a, 1) != ["signed"]
        assert sign_attempts(b, 5) == ["signed"] * 5  # ... and B signs on
    finally:
        a.release()
        b.release()


def _open_sessions(module: str, upto: int = 5000) -> int:
    """Sessions open in this process (C_GetSessionInfo on every handle; SoftHSM numbers
    them from 1)."""
    import ctypes

    lib = ctypes.CDLL(module)  # the library already loaded: the same state
    info = (ctypes.c_ulong * 4)()
    return sum(
        1
        for h in range(1, upto)
        if lib.C_GetSessionInfo(ctypes.c_ulong(h), ctypes.byref(info)) == 0
    )


def test_reconnects_do_not_leak_sessions_while_another_chain_is_logged_in(
    softhsm, token, tmp_path
) -> None:
    """Each reconnect used to open a session whose login failed with "already logged in",
    and python-pkcs11 left it open: one leaked per try (found in review)."""
    _sa, sb, a, b = _two_chains_on_one_token(softhsm, token, tmp_path)
    try:
        before = _open_sessions(softhsm.module)
        hsm.delete_key(sb)  # B's key is gone: B reconnects (and fails) again and again

        def no_backoff() -> None:
            b._next_attempt = 0.0  # 40 reconnects in a row, not over minutes

        errs = sign_attempts(b, 40, no_backoff)
        assert all("signed" != e for e in errs)
        assert _open_sessions(softhsm.module) <= before + 1
        assert sign_attempts(a, 3) == ["signed"] * 3
    finally:
        a.release()
        b.release()


def test_another_token_removed_does_not_stop_this_chains_reconnect(softhsm, tmp_path) -> None:
    """Chains on two tokens of one module: one token is deleted while running.  Its chain
    is refused; the other chain, after its own session ends, reconnects and signs (the
    token lookup gave up on the first slot that failed; found in review)."""
    import os

    ta, tb = f"tok{next(_TOKENS)}", f"tok{next(_TOKENS)}"
    softhsm.init_token(ta)
    softhsm.init_token(tb)
    ka, kb = generate("ed25519"), generate("ed25519")
    sa, sb = settings(softhsm, tmp_path, ta), settings(softhsm, tmp_path, tb)
    hsm.import_key(sa, ka.secret_bytes(), ka.public_key)
    hsm.import_key(sb, kb.secret_bytes(), kb.public_key)
    a, b = hsm.Pkcs11Backend.connect(sa), hsm.Pkcs11Backend.connect(sb)
    try:
        assert sign_attempts(b, 1) == ["signed"]
        subprocess.run(
            ["softhsm2-util", "--delete-token", "--token", ta],
            env={**os.environ, **softhsm.env},
            check=True,
            capture_output=True,
        )
        assert sign_attempts(a, 1) != ["signed"]
        b._drop_session()  # B's session ends for a reason of its own
        b._next_attempt = 0.0
        assert sign_attempts(b, 3) == ["signed"] * 3
        assert b.reconnects == 1
    finally:
        a.release()
        b.release()


def test_missing_token_and_missing_key(softhsm, token, tmp_path) -> None:
    with pytest.raises(BackendError, match=r"no PKCS#11 token labelled 'nope-\d'"):
        hsm.Pkcs11Backend.connect(settings(softhsm, tmp_path, "nope-1"))
    with pytest.raises(BackendError, match="no private key with label 'validator'"):
        hsm.Pkcs11Backend.connect(settings(softhsm, tmp_path, token))
    with pytest.raises(ConfigError, match="does not exist"):
        hsm.Pkcs11Settings.create(
            module_path="/nonexistent/libpkcs11.so",
            token_label=token,
            pin_path=softhsm.pin_file(tmp_path),
            key_type="ed25519",
            key_label="v",
            key_id=None,
        ) and hsm.load_module("/nonexistent/libpkcs11.so")
    with pytest.raises(ConfigError, match="key_type"):
        settings(softhsm, tmp_path, token, "bls12381")
    with pytest.raises(ConfigError, match="timeout"):
        settings(softhsm, tmp_path, token, timeout=5.0)


def test_a_key_deleted_while_running_is_refused_then_recovers(softhsm, token, tmp_path) -> None:
    key = generate("ed25519")
    s = settings(softhsm, tmp_path, token)
    hsm.import_key(s, key.secret_bytes(), key.public_key)
    backend = hsm.Pkcs11Backend.connect(s)

    async def attempt() -> str:
        try:
            sig = await backend.sign(b"m")
        except BackendError as e:
            return str(e)
        assert key.verify(b"m", sig)
        return "signed"

    async def until_signed(timeout: float = 15.0) -> list[str]:
        seen = []
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            r = await attempt()
            seen.append(r)
            if r == "signed":
                return seen
            await asyncio.sleep(0.05)
        raise AssertionError(f"never signed again: {seen[-3:]}")

    async def go() -> None:
        assert await attempt() == "signed"
        assert hsm.delete_key(s) == 2  # the private and the public key object
        first = await attempt()
        assert "failed to sign" in first, first
        again = await attempt()
        assert "no private key with label 'validator'" in again or "unavailable" in again
        # A different key under the same label: never used (not the pinned key).
        other = generate("ed25519")
        hsm.import_key(s, other.secret_bytes(), other.public_key)
        await asyncio.sleep(hsm.BACKOFF_MAX + 0.2)
        changed = await attempt()
        assert "no longer the pinned public key" in changed, changed
        # The right key back: signing resumes after the backoff.
        hsm.delete_key(s)
        hsm.import_key(s, key.secret_bytes(), key.public_key)
        seen = await until_signed()
        assert seen[-1] == "signed"

    run(go())
    assert backend.reconnects >= 1
    backend.release()


def test_a_call_that_does_not_return_is_refused_at_the_timeout(softhsm, token, tmp_path):
    """The module is real; one call into it is held (fault injection on the worker
    thread) to stand for an HSM that stops answering."""
    s = settings(softhsm, tmp_path, token, timeout=0.3)
    hsm.generate_key(s)
    backend = hsm.Pkcs11Backend.connect(s)
    release = threading.Event()
    real = backend._sign_raw

    def held(msg: bytes) -> bytes:
        release.wait(30)
        return real(msg)

    backend._sign_raw = held  # type: ignore[method-assign]

    async def go() -> None:
        with pytest.raises(BackendError, match=r"did not sign within 0\.3s"):
            await backend.sign(b"a")
        # Still inside the module: refused at once, not queued behind it.
        with pytest.raises(BackendError, match="still inside a call that timed out"):
            await backend.sign(b"b")
        release.set()
        backend._sign_raw = real  # type: ignore[method-assign]
        await asyncio.sleep(0.2)
        sig = await backend.sign(b"c")
        assert signature_verifier("ed25519", backend.public_key)(b"c", sig)

    run(go())
    backend.release()


def test_low_s_normalisation() -> None:
    r, s_high = 5, SECP256K1_N - 7
    sig = hsm.normalize_secp256k1(r.to_bytes(32, "big") + s_high.to_bytes(32, "big"))
    assert int.from_bytes(sig[32:], "big") == 7
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    der = encode_dss_signature(r, s_high)
    assert hsm.normalize_secp256k1(der) == sig
    with pytest.raises(BackendError):
        hsm.normalize_secp256k1(b"\x00" * 64)


# ---- real processes ---------------------------------------------------------------------


def _hsm_chain_toml(softhsm: SoftHSM, chain: str, version: str, label: str, addr: str) -> str:
    return f"""
[[chains]]
chain_id = "{chain}"
version = "{version}"
signing_mode = "pkcs11"
[chains.signing.pkcs11]
module_path = "{softhsm.module}"
token_label = "{label}"
pin_path = "./hsm_pin"
key_label = "validator"
key_type = "ed25519"
timeout = 1.5
[[chains.connections]]
address = "{addr}"
"""


def test_a_locked_pin_is_refused_clearly_and_not_retried(
    softhsm, token, tmp_path, monkeypatch
) -> None:
    """CKR_PIN_LOCKED.  SoftHSM2 never locks a PIN, so the real token's ``open`` is wrapped
    to answer as a token that locked it after too many wrong PINs would; everything else
    is the real module.  At connect: refused, naming the lock and the way out.  While
    running: the backend stops for good, with no second login attempt."""
    import pkcs11

    good = settings(softhsm, tmp_path, token)
    hsm.generate_key(good)
    real_token = hsm._token
    opens: list[int] = []

    class LockedToken:
        def __init__(self, tok) -> None:
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def open(self, **kw):
            opens.append(1)
            raise pkcs11.PinLocked()

    backend = hsm.Pkcs11Backend.connect(good)  # before the lock
    monkeypatch.setattr(hsm, "_token", lambda lib, s: LockedToken(real_token(lib, s)))
    with pytest.raises(CredentialRejected, match=r"is locked \(CKR_PIN_LOCKED.*security officer"):
        hsm.Pkcs11Backend.connect(good)
    backend._drop_session()  # as after a device error: the next sign logs in again

    opens.clear()
    errs = sign_attempts(backend, 3)
    assert all("CKR_PIN_LOCKED" in e and "restart Nebula" in e for e in errs), errs
    assert len(opens) == 1  # one login attempt, then stopped for good
    assert backend.reconnects == 0
    backend.release()


def test_start_exits_3_on_a_wrong_pin(softhsm, token, tmp_path) -> None:
    import os

    hsm.generate_key(settings(softhsm, tmp_path, token))
    home = tmp_path / "node"
    home.mkdir()
    softhsm.pin_file(home, "999999")
    (home / "nebula.toml").write_text(
        'persist = "local"\nstate_path = "./state.json"\n'
        + _hsm_chain_toml(softhsm, "c", "v0_38", token, "tcp://127.0.0.1:1")
    )
    r = subprocess.run(
        [sys.executable, "-m", "nebula.cli.main", "start", "-c", str(home / "nebula.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **softhsm.env},
    )
    assert r.returncode == 3, r.stderr
    assert "PIN was rejected" in r.stderr
    # ... and the systemd unit does not restart on that status (a restart = another try).
    unit = Path(__file__).resolve().parents[2] / "contrib/systemd/nebula.service"
    service = unit.read_text().split("[Service]", 1)[1].split("\n[", 1)[0]
    lines = [ln.split("=", 1) for ln in service.splitlines() if ln and ln[0] not in "#;"]
    assert ["Restart", "on-failure"] in lines
    prevent = [v.split() for k, v in lines if k == "RestartPreventExitStatus"]
    assert prevent and str(r.returncode) in prevent[-1], prevent


def test_a_failing_hsm_chain_never_stalls_a_native_chain(softhsm, token, tmp_path) -> None:
    from nebula.devnet.cluster import ChainDef, NebulaNode, write_node_dir

    key = generate("ed25519")
    s = settings(softhsm, tmp_path, token)
    hsm.import_key(s, key.secret_bytes(), key.public_key)
    kb = generate("ed25519")
    pa, pb = free_ports(2)
    aa, ab = f"tcp://127.0.0.1:{pa}", f"tcp://127.0.0.1:{pb}"
    home = tmp_path / "node"
    d = write_node_dir(home, chains=[ChainDef("native-chain", "v0_38", kb, [ab])])
    softhsm.pin_file(home)
    with d.config_path.open("a") as f:
        f.write(_hsm_chain_toml(softhsm, "hsm-chain", "v0_38", token, aa))
    node = NebulaNode(d.config_path, log_path=d.log_path, cwd=d.home, env=softhsm.env)

    async def main() -> None:
        la, lb = PrivvalListener(aa, WireFamily.V0_38), PrivvalListener(ab, WireFamily.V0_38)
        await la.start()
        await lb.start()
        with node:
            ca, cb = await la.accept(timeout=30), await lb.accept(timeout=30)
            req = vote_req("hsm-chain", 1)
            r = await ca.request(SignVoteRequest(req.vote, "hsm-chain"), timeout=10)
            assert r.error is None
            assert key.verify(proto.vote_sign_bytes("hsm-chain", req.vote), r.vote.signature)
            hsm.delete_key(s)  # the HSM loses the key (another application deleted it)
            for h in range(2, 6):
                v = vote_req("hsm-chain", h).vote
                bad = await ca.request(SignVoteRequest(v, "hsm-chain"), timeout=10)
                assert bad.error is not None and bad.vote.signature == b""
                good = await cb.request(SignVoteRequest(v, "native-chain"), timeout=10)
                assert good.error is None
                assert kb.verify(proto.vote_sign_bytes("native-chain", v), good.vote.signature)
            hsm.import_key(s, key.secret_bytes(), key.public_key)  # back: it recovers
            for _ in range(100):
                v = vote_req("hsm-chain", 6).vote
                r = await ca.request(SignVoteRequest(v, "hsm-chain"), timeout=10)
                if r.error is None:
                    assert key.verify(proto.vote_sign_bytes("hsm-chain", v), r.vote.signature)
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the HSM chain never recovered: {r.error}")
        await la.close()
        await lb.close()

    run(main())


def test_a_cluster_whose_members_sign_from_their_own_tokens(tmp_path) -> None:
    """Three members, three SoftHSM2 installations, the same key imported into each."""
    key = generate("ed25519")
    (addr,) = [f"tcp://127.0.0.1:{p}" for p in free_ports(1)]
    hsms = [SoftHSM(tmp_path / f"hsm{i}") for i in (1, 2, 3)]
    for h in hsms:
        h.init_token("member")
        # each member's own token, written with its own module instance (a subprocess)
        kf = h.root / "priv_validator_key.json"
        write_priv_validator_key_json(kf, key)
        h.pin_file(h.root)
        cfg = h.root / "hsm.toml"
        cfg.write_text(
            f'chain_id = "c"\nsigning_mode = "pkcs11"\n[signing.pkcs11]\n'
            f'module_path = "{h.module}"\ntoken_label = "member"\npin_path = "./hsm_pin"\n'
            'key_label = "validator"\n'
        )
        import os

        r = subprocess.run(
            [sys.executable, "-m", "nebula.cli.main", "hsm", "import", str(kf), "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **h.env},
        )
        assert r.returncode == 0, r.stderr
        kf.unlink()
    extra = (
        f'[signing.pkcs11]\nmodule_path = "{hsms[0].module}"\ntoken_label = "member"\n'
        'pin_path = "./hsm_pin"\nkey_label = "validator"\ntimeout = 1.5\n'
    )
    cl = ProcCluster(
        tmp_path / "cluster",
        3,
        key=None,
        chain_id="c",
        connections=[addr],
        signing="pkcs11",
        extra=extra,
        node_env=lambda i: hsms[i - 1].env,
    )
    for d, h in zip(cl.dirs, hsms, strict=True):
        h.pin_file(d.home)
    aud = Auditor("ed25519", key.public_key)

    async def main() -> None:
        async with driver([addr], WireFamily.V0_38, "c", aud) as drv:
            with cl:
                leader = await cl.wait_leader(30)
                for h in range(1, 11):
                    await drv.sign(vote_req("c", h), deadline=30)
                for kill in range(2):
                    cl.nodes[leader].kill()
                    for h in range(11 + 10 * kill, 21 + 10 * kill):
                        await drv.sign(vote_req("c", h), deadline=30)
                    cl.nodes[leader].start()
                    leader = await cl.wait_leader(30, exclude={leader})
        aud.check()

    run(main())
    assert aud.count >= 30


def test_digest_is_sha256_of_the_sign_bytes() -> None:
    # What CometBFT verifies for secp256k1: ECDSA over SHA-256(sign bytes).
    key = generate("secp256k1")
    import coincurve

    msg = b"sign bytes"
    sig = key.sign(msg)
    der = coincurve.PrivateKey(key.secret_bytes()).sign(hashlib.sha256(msg).digest(), hasher=None)
    assert signature_verifier("secp256k1", key.public_key)(msg, sig)
    assert der  # (the native key signs the same digest)
