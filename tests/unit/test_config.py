"""The strict config schema."""

from __future__ import annotations

import pytest

from nebula import config
from nebula.errors import ConfigError
from nebula.types import WireFamily

RUST_NEBULA_EXAMPLE = """
log_level = "info"
chain_id = "test-chain-v1"
version = "v1_0"
signing_mode = "native"
[[connections]]
host = "127.0.0.1"
port = 26659
[raft]
node_id = 1
bind_addr = "127.0.0.1:8080"
data_path = "./raft_data"
initial_state_path = "./initial_state.json"
[[raft.peers]]
id = 1
addr = "127.0.0.1:8080"
[signing.native]
private_key_path = "./privkey"
key_type = "ed25519"
"""


def test_rust_nebula_config_stays_valid(tmp_path) -> None:
    cfg = config.loads(RUST_NEBULA_EXAMPLE, tmp_path / "nebula.toml")
    assert cfg.family is WireFamily.V1_0
    assert [str(e) for e in cfg.endpoints] == ["tcp://127.0.0.1:26659"]
    assert cfg.resolve(cfg.raw.signing.native.private_key_path) == tmp_path / "privkey"


@pytest.mark.parametrize("backend", ["native", "vault_transit", "vault_signer_plugin", "pkcs11"])
def test_templates_are_valid(backend, tmp_path) -> None:
    cfg = config.loads(config.template(backend), tmp_path / "c.toml")
    assert cfg.raw.signing_mode == backend


@pytest.mark.parametrize(
    ("version", "family"),
    [
        ("v0_34", WireFamily.V0_34),
        ("v0_37", WireFamily.V0_34),
        ("v0_38", WireFamily.V0_38),
        ("v0_40", WireFamily.V0_38),
        ("v1_0", WireFamily.V1_0),
    ],
)
def test_versions(version, family) -> None:
    text = RUST_NEBULA_EXAMPLE.replace('version = "v1_0"', f'version = "{version}"')
    assert config.loads(text).family is family


def test_unix_and_tcp_addresses() -> None:
    text = RUST_NEBULA_EXAMPLE.replace(
        'host = "127.0.0.1"\nport = 26659',
        'address = "unix:///tmp/pv.sock"\n[[connections]]\naddress = "tcp://10.0.0.1:1234"',
    )
    eps = config.loads(text).endpoints
    assert [str(e) for e in eps] == ["unix:///tmp/pv.sock", "tcp://10.0.0.1:1234"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("log_level", "colour = 1\nlog_level"), "unknown field `colour`"),
        (("port = 26659", 'port = "x"'), "connections[0].port"),
        (("port = 26659", "port = 70000"), "out of range"),
        (('version = "v1_0"', 'version = "v9"'), "unknown CometBFT version"),
        (('chain_id = "test-chain-v1"', 'chain_id = ""'), "chain_id must not be empty"),
        (('signing_mode = "native"', 'signing_mode = "hsm"'), "signing_mode"),
        (('signing_mode = "native"', 'persist = "raft"'), "raft.secret_path is required"),
        (("[signing.native]", "[signing.native]\nkey_type2 = 1"), "key_type2"),
        (('key_type = "ed25519"', 'key_type = "rsa"'), "key_type"),
        (('host = "127.0.0.1"', 'host = "127.0.0.1"\naddress = "tcp://x:1"'), "not both"),
        (("chain_id", "= broken"), "invalid TOML"),
        # Found in review: a stray space made every request a mismatch; a control
        # character reached the logs; a 70,000-byte id failed every Raft commit.
        (('"test-chain-v1"', '"test-chain-v1 "'), "no spaces at either end"),
        (('"test-chain-v1"', '"test\\nchain"'), "no control characters"),
        (('"test-chain-v1"', '"' + "c" * 51 + '"'), "CometBFT allows 50"),
    ],
)
def test_broken_configs_name_the_key(edit, message, tmp_path) -> None:
    text = RUST_NEBULA_EXAMPLE.replace(*edit)
    with pytest.raises(ConfigError, match=None) as ei:
        config.loads(text, tmp_path / "bad.toml")
    assert message in str(ei.value)
    assert "bad.toml" in str(ei.value)


def test_raft_cross_field_checks(tmp_path) -> None:
    base = RUST_NEBULA_EXAMPLE.replace(
        'signing_mode = "native"', 'signing_mode = "native"\npersist = "raft"'
    ).replace('initial_state_path = "./initial_state.json"', 'secret_path = "./s"')
    assert config.loads(base).raw.persist == "raft"
    # One chain's initial state named twice: one of them would be ignored (found in review).
    both = base.replace("log_level", 'initial_state_path = "./a.json"\nlog_level', 1).replace(
        'secret_path = "./s"', 'secret_path = "./s"\ninitial_state_path = "./b.json"'
    )
    with pytest.raises(ConfigError, match="initial state twice"):
        config.loads(both)
    with pytest.raises(ConfigError, match="not listed"):
        config.loads(base.replace("node_id = 1", "node_id = 2"))
    dup = base + '[[raft.peers]]\nid = 1\naddr = "127.0.0.1:8081"\n'
    with pytest.raises(ConfigError, match="duplicate ids"):
        config.loads(dup.replace("[signing.native]", "[signing.native]"))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize("value", ["inf", "nan", "-1.0", "0.0"])
def test_dial_timeouts_must_be_finite_and_positive(value) -> None:
    text = RUST_NEBULA_EXAMPLE + f"[dial]\nhandshake_timeout = {value}\n"
    with pytest.raises(ConfigError, match="finite number > 0"):
        config.loads(text)


def test_commit_timeout_has_one_bound_for_config_and_stores(tmp_path) -> None:
    """raft.commit_timeout is checked against the one constant every store uses, and that
    bound leaves room inside CometBFT's 5 s signer timeout."""
    from nebula.state.base import COMMIT_TIMEOUT_MAX, check_commit_timeout

    assert COMMIT_TIMEOUT_MAX < 5.0
    base = RUST_NEBULA_EXAMPLE.replace(
        'signing_mode = "native"', 'signing_mode = "native"\npersist = "raft"'
    ).replace('initial_state_path = "./initial_state.json"', 'secret_path = "./s"')

    def with_timeout(v: str) -> str:
        return base.replace("node_id = 1", f"node_id = 1\ncommit_timeout = {v}")

    ok = COMMIT_TIMEOUT_MAX - 0.1
    assert config.loads(with_timeout(str(ok))).raw.raft.commit_timeout == ok
    assert check_commit_timeout(ok, "x") == ok
    for bad in (COMMIT_TIMEOUT_MAX, 0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"raft\.commit_timeout must be in \(0, 4\)"):
            config.loads(with_timeout(str(bad)), tmp_path / "c.toml")
        with pytest.raises(ConfigError, match="must be in"):
            check_commit_timeout(bad, "x")


# ---- many chains ([[chains]]) ------------------------------------------------------------

MULTI = """
persist = "local"
connection_key_path = "./conn_key"
[[chains]]
chain_id = "alpha-1"
version = "v0_38"
[chains.signing.native]
private_key_path = "./alpha_key"
[[chains.connections]]
address = "tcp://127.0.0.1:26659"
[[chains]]
chain_id = "beta-1"
version = "v1_0"
signing_mode = "vault_transit"
initial_state_path = "./beta_state.json"
connection_key_path = "./beta_conn_key"
[chains.signing.vault_transit]
key_name = "beta"
token_env = "VAULT_TOKEN"
[[chains.connections]]
address = "unix:///run/beta.sock"
[[chains.connections]]
host = "10.0.0.2"
port = 26659
"""


def test_multi_chain_config(tmp_path) -> None:
    cfg = config.loads(MULTI, tmp_path / "n.toml")
    assert cfg.multi_chain and cfg.chain_ids == ("alpha-1", "beta-1")
    a, b = cfg.chains
    assert a.family is WireFamily.V0_38 and b.family is WireFamily.V1_0
    assert a.signing_mode == "native" and b.signing_mode == "vault_transit"
    assert cfg.resolve(a.signing.native.private_key_path) == tmp_path / "alpha_key"
    assert [str(e) for e in b.endpoints] == ["unix:///run/beta.sock", "tcp://10.0.0.2:26659"]
    assert a.connection_key_path == "./conn_key" and b.connection_key_path == "./beta_conn_key"
    assert b.initial_state_path == "./beta_state.json" and a.initial_state_path is None
    assert cfg.chain("beta-1") is b
    with pytest.raises(ConfigError, match=r"n\.toml: serves 2 chains .*--chain"):
        cfg.chain()
    with pytest.raises(ConfigError, match=r"n\.toml: chain id 'gamma' is not configured"):
        cfg.chain("gamma")


def test_a_missing_key_file_names_the_config_key(tmp_path) -> None:
    """Found in review: "key file key_missing does not exist" named neither the config
    key nor the chain; a missing connection key read like a consensus key."""
    from nebula.aio import daemon
    from nebula.errors import KeyFileError

    cfg = config.loads(MULTI, tmp_path / "n.toml")
    with pytest.raises(KeyFileError) as e:
        daemon.make_backend(cfg, cfg.chain("alpha-1"))
    text = str(e.value)
    assert "n.toml: chains[0].signing.native.private_key_path" in text and "alpha_key" in text
    with pytest.raises(KeyFileError, match=r"connection_key_path \(the SecretConnection"):
        daemon.load_identity_for(cfg, cfg.chains[0])


def test_single_chain_config_is_one_chain(tmp_path) -> None:
    cfg = config.loads(RUST_NEBULA_EXAMPLE, tmp_path / "n.toml")
    assert not cfg.multi_chain and cfg.chain_ids == ("test-chain-v1",)
    assert cfg.chain() is cfg.chain("test-chain-v1") and cfg.chain().key == ""


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('chain_id = "beta-1"', 'chain_id = "alpha-1"'),
            r"chains\[1\]\.chain_id: chain id 'alpha-1' is listed twice \(also chains\[0\]\)",
        ),
        (
            ('persist = "local"', 'persist = "local"\nchain_id = "top"'),
            r"chain_id at the top level and \[\[chains\]\] together",
        ),
        (
            ('persist = "local"', 'persist = "local"\nversion = "v0_38"'),
            r"version at the top level and \[\[chains\]\] together",
        ),
        (
            ('address = "unix:///run/beta.sock"', 'address = "tcp://127.0.0.1:26659"'),
            r"chains\[1\]\.connections: validator address tcp://127\.0\.0\.1:26659 is also "
            r"listed for chain 'alpha-1'",
        ),
        (('version = "v1_0"', 'version = "v9_9"'), r"chains\[1\]\.version"),
        (('key_name = "beta"', 'key_name = "beta"\ntimeout = 9.0'), r"chains\[1\]\.signing"),
        (
            ('[chains.signing.native]\nprivate_key_path = "./alpha_key"\n', ""),
            r"chains\[0\]\.signing_mode = 'native' needs a \[chains\[0\]\.signing\.native\]",
        ),
        (('chain_id = "alpha-1"', 'chain_id = "  "'), r"chains\[0\]\.chain_id must not be empty"),
        (("[[chains.connections]]\nhost", "[[chains.connections]]\nhostt"), r"hostt"),
    ],
)
def test_multi_chain_errors_name_the_file_and_key(edit, message, tmp_path) -> None:
    old, new = edit
    assert old in MULTI
    with pytest.raises(ConfigError, match=message) as e:
        config.loads(MULTI.replace(old, new, 1), tmp_path / "n.toml")
    assert "n.toml" in str(e.value)


def test_empty_chains_and_missing_chain_id_are_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="chains is empty"):
        config.loads('chains = []\npersist = "local"\n', tmp_path / "n.toml")
    with pytest.raises(ConfigError, match=r"chain_id is required \(or list"):
        config.loads('persist = "local"\n', tmp_path / "n.toml")


def test_raft_initial_state_path_is_per_chain_with_chains(tmp_path) -> None:
    text = MULTI.replace('persist = "local"', 'persist = "raft"') + (
        '[raft]\nsecret_path = "./s"\ninitial_state_path = "./x.json"\n'
        '[[raft.peers]]\nid = 1\naddr = "127.0.0.1:8080"\n'
    )
    with pytest.raises(ConfigError, match=r"raft\.initial_state_path is for a single-chain"):
        config.loads(text, tmp_path / "n.toml")
    ok = config.loads(text.replace('initial_state_path = "./x.json"\n', ""), tmp_path / "n.toml")
    assert ok.raw.persist == "raft" and len(ok.chains) == 2


def test_pkcs11_section_validation(tmp_path) -> None:
    base = config.template("pkcs11")
    cfg = config.loads(base, tmp_path / "n.toml")
    h = cfg.chain().signing.pkcs11
    assert h.key_type == "ed25519" and h.pin_path == "./hsm_pin" and h.key_label == "nebula"
    for old, new, msg in [
        ('pin_path = "./hsm_pin"', "", "pin_path is required"),
        ('key_label = "nebula"', 'key_label = ""', "set key_label or key_id"),
        ("\ntimeout = 1.0", "\ntimeout = 4.5", r"signing\.pkcs11\.timeout"),
        ('key_type = "ed25519"', 'key_type = "bls12381"', "key_type"),
    ]:
        assert old in base
        with pytest.raises(ConfigError, match=msg):
            config.loads(base.replace(old, new, 1), tmp_path / "n.toml")


@pytest.mark.parametrize("version", ["v0_34", "v0_37", "v0_38"])
def test_a_bls_key_on_a_line_without_bls_is_a_config_error(version: str, tmp_path) -> None:
    """v0.34/v0.37/v0.38 have no BLS public key (v0.38.25's tendermint.crypto.PublicKey
    holds ed25519 and secp256k1 only; v0.39 and v0.40 added it on the same wire): the
    chain would drop the connection on every public-key request (found in review), so
    the config is refused at load, as the signer plugin backend already refused it."""
    text = RUST_NEBULA_EXAMPLE.replace('key_type = "ed25519"', 'key_type = "bls12381"')
    assert config.loads(text).chains[0].family.value == "v1_0"
    for fine in ("v0_39", "v0_40"):
        config.loads(text.replace('version = "v1_0"', f'version = "{fine}"'))
    with pytest.raises(ConfigError, match=r"signing\.native\.key_type = 'bls12381'") as e:
        config.loads(
            text.replace('version = "v1_0"', f'version = "{version}"'), tmp_path / "b.toml"
        )
    assert "b.toml" in str(e.value) and f"version = '{version}'" in str(e.value)


def test_a_request_that_could_outlast_cometbfts_5_s_is_a_config_error(tmp_path) -> None:
    """Each backend timeout is under 4 s, but a v0.38/v1.0 precommit calls the backend
    twice (its vote extension too) and a cluster adds its commit: 3.0 s timeouts answered
    after 5.2 s, when CometBFT had given up (found in review).  The sum is bounded."""
    beta = MULTI.replace('key_name = "beta"', 'key_name = "beta"\ntimeout = 2.0')
    config.loads(beta)  # 2 x 2.0 s on v1.0, a local store: 4.0 s
    with pytest.raises(ConfigError) as e:
        config.loads(beta.replace("timeout = 2.0", "timeout = 2.5"), tmp_path / "n.toml")
    text = str(e.value)
    assert "n.toml: chains[1].signing.vault_transit.timeout = 2.5" in text
    assert "can take 5 s, more than 4.5 s" in text
    on_v034 = beta.replace('version = "v1_0"', 'version = "v0_34"')
    config.loads(on_v034.replace("timeout = 2.0", "timeout = 3.0"))  # one call: 3.0 s


_RAFT = """
persist = "raft"
[raft]
node_id = 1
secret_path = "./secret"
[[raft.peers]]
id = 1
addr = "127.0.0.1:8080"
"""


@pytest.mark.parametrize(
    ("mode", "section"),
    [
        ("native", '[signing.native]\nkey_type = "bls12381"\n'),
        ("threshold_bls", "[signing.threshold_bls]\n"),
        ("vault_signer_plugin", "[signing.vault_signer_plugin]\n"),
    ],
    ids=["native", "threshold_bls", "vault_signer_plugin"],
)
@pytest.mark.parametrize(
    ("dst", "why"),
    [("BLS_SIG_é", "ASCII"), ("A" * 256, "1 to 255 bytes")],
    ids=["non-ascii", "too-long"],
)
def test_a_bad_bls_dst_is_a_config_error_naming_the_key(
    mode: str, section: str, dst: str, why: str, tmp_path
) -> None:
    """bls_dst is checked at load, the same way for every mode: a non-ASCII one used to be
    a UnicodeEncodeError traceback at start (threshold_bls), or taken as UTF-8 (native);
    a long one a KeyFileError blaming private_key_path (found in review)."""
    text = f'chain_id = "c"\nsigning_mode = "{mode}"\n'
    text += (_RAFT if mode == "threshold_bls" else "") + section
    assert config.loads(text, tmp_path / "ok.toml").chains[0].signing_mode == mode
    with pytest.raises(ConfigError, match=why) as e:
        config.loads(text + f'bls_dst = "{dst}"\n', tmp_path / "b.toml")
    assert "b.toml" in str(e.value) and f"signing.{mode}.bls_dst" in str(e.value)


def test_a_pin_file_that_is_not_utf8_is_refused_before_the_token_sees_it(tmp_path) -> None:
    """A PIN file in another encoding (a Latin-1 'ä') was decoded with replacement
    characters and that wrong PIN sent to the token, where a failed login counts toward
    locking it (found in review): it is a ConfigError naming the file, no login tried."""
    from nebula.backends.pkcs11 import Pkcs11Settings

    pin = tmp_path / "pin"
    pin.write_bytes("pässword\n".encode("latin-1"))
    pin.chmod(0o600)
    with pytest.raises(ConfigError, match="UTF-8") as e:
        Pkcs11Settings.create(
            module_path="/usr/lib/softhsm/libsofthsm2.so",
            token_label="t",
            pin_path=pin,
            key_type="ed25519",
            key_label="k",
            key_id=None,
        )
    assert str(pin) in str(e.value)
