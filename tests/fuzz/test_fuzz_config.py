"""Fuzzing the config loader: ``nebula.config.loads`` and ``load``.

Three kinds of input: arbitrary text, TOML-ish text (TOML tokens and the schema's key
names thrown together, damaged templates), and structured random documents that follow
the schema loosely (right and wrong types, boundary values, NaN/inf, unknown keys) dumped
to TOML by a small writer below.  Properties:

* the result is a ConfigError naming the file, or a LoadedConfig - never another exception;
* a LoadedConfig satisfies the rules the loader promises (``nebula/config.py``): non-empty
  chain_id, a known version, one endpoint per connection, ports 1..65535, positive dial
  timings with backoff_min <= backoff_max, a section for the signing mode, vault and raft
  timeouts in range, every raft rule;
* ``load`` of a file holding any bytes (invalid UTF-8 included) behaves the same way.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nebula import config
from nebula.errors import ConfigError
from nebula.state.base import COMMIT_TIMEOUT_MAX
from nebula.types import WireFamily
from tests.fuzz.conftest import fuzz_settings, outcome

CONFIG_PATH = Path("/etc/nebula/fuzz.toml")
TEMPLATES = [
    config.template(mode, version=version, persist=persist)
    for mode in ("native", "vault_transit", "vault_signer_plugin")
    for version in ("v0_34", "v0_38", "v1_0")
    for persist in ("local", "raft")
]

# ---- a small TOML writer (tests only; handles what the generators produce) --------------------


def toml_key(k: str) -> str:
    if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k):
        return k
    return toml_string(k)


def toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dump_toml(doc: dict[str, Any], headers: bool) -> str:
    """``doc`` as TOML: with [table] / [[array]] headers, or all inline when not ``headers``."""
    if not headers:
        return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())
    lines: list[str] = []

    def table(prefix: list[str], d: dict[str, Any]) -> None:
        nested = []
        for k, v in d.items():
            if isinstance(v, dict) or _is_table_array(v):
                nested.append((k, v))
            else:
                lines.append(f"{toml_key(k)} = {toml_value(v)}")
        for k, v in nested:
            path = [*prefix, toml_key(k)]
            if isinstance(v, dict):
                lines.append(f"[{'.'.join(path)}]")
                table(path, v)
            else:
                for item in v:
                    lines.append(f"[[{'.'.join(path)}]]")
                    table(path, item)

    table([], doc)
    return "\n".join(lines) + "\n"


# ---- strategies -------------------------------------------------------------------------------

TOML_SCALAR = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
ANY_VALUE = st.recursive(
    TOML_SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)

ADDRESSES = st.sampled_from(
    [
        "tcp://127.0.0.1:26659",
        "127.0.0.1:26659",
        "tcp://[::1]:26659",
        "unix:///run/nebula/privval.sock",
        "unix://",
        "tcp://host",
        "tcp://:1",
        "tcp://h:0",
        "tcp://h:65535",
        "tcp://h:65536",
        "tcp://h:-1",
        "tcp://h:+80",
        "tcp://h: 80",
        "tcp://h:8_0",
        "tcp://h:\u0663",  # ARABIC-INDIC DIGIT THREE
        "tcp://id@h:1",
        "udp://h:1",
        "",
    ]
)
HOSTPORTS = st.sampled_from(
    [
        "127.0.0.1:8080",
        "localhost:26661",
        "[::1]:26661",
        "0.0.0.0:1",
        "example.com:80",
        "127.0.0.1",
        ":80",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "127.0.0.1:\u0661\u0662",
        "",
    ]
)
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, 0.05, 0.4, 0.8, 1.0, 3.9, 4.0, 15.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 10),
)
PORTS = st.one_of(st.integers(-1, 70000), st.integers(-(2**63), 2**63 - 1))
OPT_TEXT = st.one_of(st.none(), st.text(max_size=12))


def loose(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually ``value``, sometimes any TOML value (a wrong type, mostly)."""
    return st.one_of(value, value, value, ANY_VALUE)


def section(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A table with a random subset of ``fields`` and, rarely, an unknown key."""
    return st.fixed_dictionaries({}, optional={k: loose(v) for k, v in fields.items()}).flatmap(
        lambda d: st.one_of(
            st.just(d),
            st.just(d),
            st.just(d),
            st.dictionaries(st.text(min_size=1, max_size=8), ANY_VALUE, max_size=1).map(
                lambda extra: {**extra, **d}
            ),
        )
    )


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: a None value means the key is absent."""
    return {k: v for k, v in d.items() if v is not None}


CONNECTION = section(
    {"host": OPT_TEXT | st.just("127.0.0.1"), "port": PORTS, "address": ADDRESSES}
).map(_drop_none)
VAULT = {
    "address": st.text(max_size=12),
    "mount": st.text(max_size=8),
    "key_name": st.text(max_size=8),
    "token_path": OPT_TEXT,
    "token_env": OPT_TEXT | st.just(""),
    "ca_cert": OPT_TEXT,
    "insecure_skip_verify": st.booleans(),
    "timeout": FLOATS,
}
RAFT_PEER = section({"id": st.integers(0, 4), "addr": HOSTPORTS})
SIGNING = section(
    {
        "native": section(
            {
                "private_key_path": st.text(max_size=8),
                "key_type": st.sampled_from(["ed25519", "secp256k1", "bls12381", "rsa"]),
                "bls_dst": OPT_TEXT,
            }
        ).map(_drop_none),
        "vault_transit": section(VAULT).map(_drop_none),
        "vault_signer_plugin": section({**VAULT, "bls_dst": OPT_TEXT}).map(_drop_none),
    }
)
CHAIN = st.fixed_dictionaries(
    {"chain_id": st.sampled_from(["a", "b", "", " "]) | st.text(max_size=6)},
    optional={
        "version": st.sampled_from(["v0_34", "v0_38", "v1_0", "v9"]),
        "signing_mode": st.sampled_from(["native", "vault_transit", "vault_signer_plugin", "x"]),
        "signing": SIGNING,
        "connections": st.lists(CONNECTION, max_size=2),
        "initial_state_path": st.text(max_size=8),
        "connection_key_path": st.text(max_size=8),
        "bogus": st.integers(),
    },
)
DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "chain_id": loose(
            st.sampled_from(["test-chain", "", "  ", "c\u00e9"]) | st.text(max_size=10)
        ),
        "log_level": loose(st.sampled_from(["trace", "debug", "info", "warn", "error", "loud"])),
        "log_format": loose(st.sampled_from(["text", "json", "xml"])),
        "version": loose(
            st.sampled_from(["v0_34", "v0.37", "0.38", "V1_0", "v1", " v0_40 ", "v2", ""])
        ),
        "signing_mode": loose(
            st.sampled_from(["native", "vault_transit", "vault_signer_plugin", "hsm"])
        ),
        "persist": loose(st.sampled_from(["local", "raft", "s3"])),
        "state_path": loose(st.text(max_size=12)),
        "initial_state_path": loose(st.text(max_size=12)),
        "connection_key_path": loose(st.text(max_size=12)),
        "connections": loose(st.lists(CONNECTION, max_size=3)),
        "dial": loose(
            section(
                {
                    "handshake_timeout": FLOATS,
                    "backoff_min": FLOATS,
                    "backoff_max": FLOATS,
                    "idle_timeout": FLOATS,
                }
            )
        ),
        "raft": loose(
            section(
                {
                    "node_id": st.integers(0, 4),
                    "bind_addr": HOSTPORTS,
                    "data_path": st.text(max_size=8),
                    "initial_state_path": OPT_TEXT,
                    "peers": st.lists(RAFT_PEER, max_size=3),
                    "secret_path": OPT_TEXT,
                    "commit_timeout": FLOATS,
                    "election_timeout_min": FLOATS,
                    "election_timeout_max": FLOATS,
                }
            ).map(_drop_none)
        ),
        "signing": loose(SIGNING),
        "chains": loose(st.lists(CHAIN, max_size=3)),
        "metrics": loose(section({"listen": HOSTPORTS})),
    },
)


@st.composite
def damaged_template(draw: st.DrawFn) -> str:
    """A template with lines dropped, duplicated, swapped or edited."""
    lines = draw(st.sampled_from(TEMPLATES)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "swap", "edit", "uncomment"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "uncomment":
            lines[i] = lines[i].lstrip("# ")
        else:
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(TOMLISH_TOKEN) + lines[i][pos:]
    return "\n".join(lines) + "\n"


SCHEMA_WORDS = [
    "chain_id", "version", "signing_mode", "persist", "connections", "host", "port",
    "address", "dial", "raft", "peers", "signing", "native", "vault_transit", "metrics",
    "listen", "timeout", "node_id", "id", "addr", "backoff_min", "backoff_max",
]  # fmt: skip
TOMLISH_TOKEN = st.one_of(
    st.sampled_from(
        ["=", "[", "]", "[[", "]]", "{", "}", ",", ".", '"', "'", '"""', "\n", "#", " ",
         "nan", "inf", "-inf", "true", "1979-05-27T07:32:00Z", "0x7f", "1e400", "\\u0000"]
    ),
    st.sampled_from(SCHEMA_WORDS),
    st.text(max_size=4),
    st.integers(-5, 70000).map(str),
)  # fmt: skip
TOMLISH_TEXT = st.lists(TOMLISH_TOKEN, max_size=40).map("".join)

# ---- the oracle -------------------------------------------------------------------------------


def check_loaded(cfg: config.LoadedConfig, path: Path = CONFIG_PATH) -> None:
    """The rules ``nebula.config`` promises for every config it accepts."""
    raw = cfg.raw
    assert cfg.path == path
    assert cfg.chains and len(set(cfg.chain_ids)) == len(cfg.chains)
    raw_chains = raw.chains if raw.chains is not None else [raw]
    all_endpoints = [e for c in cfg.chains for e in c.endpoints]
    assert len(set(all_endpoints)) == len(all_endpoints)
    port_texts: list[str] = []
    for chain, rc in zip(cfg.chains, raw_chains, strict=True):
        assert chain.chain_id.strip()
        assert chain.family is WireFamily.from_config(rc.version or "v1_0")
        conns = rc.connections or []
        assert len(chain.endpoints) == len(conns)
        for e in chain.endpoints:
            if e.scheme == "tcp":
                assert e.host and 1 <= e.port <= 65535
            else:
                assert e.scheme == "unix" and e.path
        # ports written in strings are plain ASCII decimal ("+80", "8_0", "\u0663" refused)
        port_texts += [
            c.address.rpartition(":")[2]
            for c in conns
            if c.address and not c.address.startswith("unix://")
        ]
        mode = getattr(chain.signing, chain.signing_mode)
        assert mode is not None
        if chain.signing_mode != "native":
            assert mode.token_path or mode.token_env
            assert 0 < mode.timeout < 4.0, f"signing.{chain.signing_mode}.timeout = {mode.timeout}"
    if raw.persist == "raft" and raw.raft is not None:
        port_texts += [
            a.rpartition(":")[2] for a in [raw.raft.bind_addr, *(p.addr for p in raw.raft.peers)]
        ]
    if raw.metrics.listen:
        port_texts.append(raw.metrics.listen.rpartition(":")[2])
    for text in port_texts:
        assert text.isascii() and text.isdigit(), f"port {text!r} accepted"
    d = raw.dial
    for name in ("handshake_timeout", "backoff_min", "backoff_max", "idle_timeout"):
        assert getattr(d, name) > 0, f"dial.{name} = {getattr(d, name)} accepted"
    assert d.backoff_min <= d.backoff_max
    if raw.persist == "raft":
        r = raw.raft
        assert r is not None and r.secret_path and r.peers
        ids = [p.id for p in r.peers]
        assert r.node_id in ids and len(set(ids)) == len(ids)
        assert len({p.addr for p in r.peers}) == len(r.peers)
        assert 0 < r.commit_timeout < COMMIT_TIMEOUT_MAX
        ticks = [
            round(x / r.tick_interval) for x in (r.election_timeout_min, r.election_timeout_max)
        ]
        assert max(1, round(r.heartbeat_interval / r.tick_interval)) < ticks[0] < ticks[1]


def load_text(text: str) -> tuple[str, Any]:
    kind, result = outcome(config.loads, text, CONFIG_PATH)
    if kind == "error":
        assert result is ConfigError
        assert_names_file(text, CONFIG_PATH)
    else:
        check_loaded(result)
    return kind, result


def assert_names_file(text: str, path: Path) -> None:
    """A clear error: it starts with the file it is about."""
    try:
        config.loads(text, path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}:"), str(exc)


# ---- tests ------------------------------------------------------------------------------------


@fuzz_settings(200)
@given(text=st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    load_text(text)


@fuzz_settings(300)
@given(text=st.one_of(TOMLISH_TEXT, damaged_template()))
def test_tomlish_text(text: str) -> None:
    load_text(text)


@fuzz_settings(400)
@given(doc=DOCUMENT, headers=st.booleans())
@example(
    doc={"chain_id": "c", "dial": {"backoff_max": math.nan}, "signing": {"native": {}}},
    headers=True,
)
@example(
    doc={
        "chain_id": "c",
        "signing_mode": "vault_transit",
        "signing": {"vault_transit": {"timeout": math.nan}},
    },
    headers=False,
)
@example(
    doc={
        "chain_id": "c",
        "connections": [{"address": "tcp://h:\u0663"}],
        "signing": {"native": {}},
    },
    headers=True,
)
def test_structured_documents(doc: dict[str, Any], headers: bool) -> None:
    text = dump_toml(doc, headers)
    # the writer is right: what it writes is TOML that means ``doc``
    assert _same(tomllib.loads(text), doc)
    load_text(text)


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("depth", [10, 300, 1000, 100_000])
@pytest.mark.parametrize("opener", ["[", "{a="])
def test_deep_nesting_is_a_config_error(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = 'chain_id = "c"\nx = ' + opener * depth + ("1" if opener != "[" else "") + closer * depth
    load_text(text)


@fuzz_settings(50)
@given(raw=st.binary(max_size=60), template=st.sampled_from(TEMPLATES[:3]))
def test_load_file_bytes(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes, template: str
) -> None:
    """``load`` reads files: any bytes in it (invalid UTF-8 included) give a ConfigError or a config."""
    path = tmp_path_factory.mktemp("cfg") / "nebula.toml"
    path.write_bytes(template.encode() + raw)
    kind, result = outcome(config.load, path)
    if kind == "error":
        assert result is ConfigError
    else:
        check_loaded(result, path)
