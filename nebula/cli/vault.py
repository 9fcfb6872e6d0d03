"""``nebula vault``: manage the consensus key held in Vault / OpenBao.

* ``nebula vault create-key -c CONFIG`` — create a new ed25519 transit key;
* ``nebula vault import-key -c CONFIG priv_validator_key.json`` — move an existing
  CometBFT ed25519 key into transit (BYOK import: the key travels wrapped with
  RSA-OAEP + AES-KWP to Vault's wrapping key, is not exportable, and is checked
  against the file's public key afterwards);
* ``nebula vault show-key -c CONFIG`` — the key's type, address and public key, after
  the same checks and self-test signature ``nebula start`` runs.

The address, mount, key name, token and TLS settings come from the config's
``[signing.vault_transit]`` (or ``[signing.vault_signer_plugin]`` for
``show-key --plugin``) section; each can be overridden with a flag, and without a
config the flags and the defaults are used.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from nebula.errors import ConfigError

# Per request. Longer than the signing timeout: the first transit import makes the server
# generate its RSA-4096 wrapping key, which takes seconds on a busy machine.
_MANAGEMENT_TIMEOUT = 30.0
_MAX_MANAGEMENT_TIMEOUT = 300.0


def _settings(args: argparse.Namespace, mode: str) -> tuple[Any, str]:
    """(VaultSettings, CometBFT version) from -c CONFIG and the override flags."""
    from nebula import config
    from nebula.backends._vault_common import VaultSettings, load_token

    section: Any
    version = "v1_0"
    base = Path.cwd() / "nebula.toml"
    if args.config:
        cfg = config.load(args.config)
        chain = cfg.chain(getattr(args, "chain", None))
        section = getattr(chain.signing, mode)
        if section is None:
            raise ConfigError(f"{cfg.path}: no [{chain.where('signing.' + mode)}] section")
        version = chain.version
        base = cfg.path
        where = f"{cfg.path}: {chain.where('signing.' + mode)}"
    else:
        section = (
            config.VaultTransitSigning()
            if mode == "vault_transit"
            else (config.VaultSignerPluginSigning())
        )
        where = f"nebula vault ({mode})"

    def pick(flag: str, attr: str) -> Any:
        v = getattr(args, flag, None)
        return getattr(section, attr) if v is None else v

    token_path = pick("token_path", "token_path")
    token_env = pick("token_env", "token_env")
    if args.token_env and not args.token_path:
        token_path = None  # an explicit --token-env wins over the config's token_path
    ca_cert = pick("ca_cert", "ca_cert")
    s = VaultSettings.create(
        pick("address", "address"),
        pick("mount", "mount"),
        pick("key_name", "key_name"),
        load_token(config.resolve_path(base, token_path), token_env, where=where),
        ca_cert=str(config.resolve_path(base, ca_cert)) if ca_cert else None,
        insecure_skip_verify=bool(args.insecure_skip_verify or section.insecure_skip_verify),
        timeout=_MANAGEMENT_TIMEOUT if args.timeout is None else args.timeout,
        where=where,
        max_timeout=_MAX_MANAGEMENT_TIMEOUT,
    )
    return s, version


def _show(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k.ljust(width)} : {json.dumps(v) if isinstance(v, dict) else v}")


def _key_info(key_type: str, public_key: bytes, extra: dict[str, Any]) -> dict[str, Any]:
    from types import SimpleNamespace

    from nebula.crypto.keys import address_of, pubkey_json

    return {
        "key_type": key_type,
        "address": address_of(key_type, public_key).hex().upper(),
        "pub_key": pubkey_json(SimpleNamespace(key_type=key_type, public_key=public_key)),
        "pub_key_base64": base64.b64encode(public_key).decode(),
        **extra,
    }


def cmd_create_key(args: argparse.Namespace) -> int:
    from nebula.backends.vault_transit import VaultTransitBackend, create_transit_key

    s, version = _settings(args, "vault_transit")
    info = create_transit_key(s, exportable=False)
    VaultTransitBackend.connect(s, version=version)  # the checks and self-test of `start`
    print(f"created ed25519 transit key {s.mount}/{s.key_name} at {s.address}", file=sys.stderr)
    _show(
        _key_info(
            "ed25519",
            info.public_key,
            {"mount": s.mount, "key_name": s.key_name, "version": info.latest_version},
        ),
        args.json,
    )
    return 0


def cmd_import_key(args: argparse.Namespace) -> int:
    from nebula.backends.vault_transit import VaultTransitBackend, import_transit_key
    from nebula.crypto.keys import Ed25519Key, load_priv_validator_key_json

    key = load_priv_validator_key_json(args.file)
    if not isinstance(key, Ed25519Key):
        raise ConfigError(
            f"{args.file} holds a {key.key_type} key; Vault transit has only ed25519 "
            "consensus keys (use the signer plugin or the native backend)"
        )
    s, version = _settings(args, "vault_transit")
    info = import_transit_key(s, key)
    VaultTransitBackend.connect(s, version=version)
    print(
        f"imported {args.file} into transit key {s.mount}/{s.key_name} at {s.address}; "
        f"address {key.address.hex().upper()} unchanged. Keep an offline backup of the file "
        "and remove it from this machine.",
        file=sys.stderr,
    )
    _show(
        _key_info(
            "ed25519",
            info.public_key,
            {"mount": s.mount, "key_name": s.key_name, "version": info.latest_version},
        ),
        args.json,
    )
    return 0


def cmd_show_key(args: argparse.Namespace) -> int:
    if args.plugin:
        from nebula.backends.vault_signer_plugin import VaultSignerPluginBackend

        s, version = _settings(args, "vault_signer_plugin")
        plugin = VaultSignerPluginBackend.connect(s, version=version)
        _show(
            _key_info(
                plugin.key_type, plugin.public_key, {"mount": s.mount, "key_name": s.key_name}
            ),
            args.json,
        )
        return 0
    from nebula.backends.vault_transit import VaultTransitBackend, read_transit_key

    s, version = _settings(args, "vault_transit")
    info = read_transit_key(s)
    transit = VaultTransitBackend.connect(s, version=version)
    _show(
        _key_info(
            "ed25519",
            transit.public_key,
            {
                "mount": s.mount,
                "key_name": s.key_name,
                "version": transit.key_version,
                "exportable": info.exportable,
                "imported": info.imported,
            },
        ),
        args.json,
    )
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (Vault settings from [signing.*])")
    p.add_argument("--chain", help="the config's chain whose settings to use (several chains)")
    p.add_argument("--address", help="Vault address, e.g. https://vault:8200")
    p.add_argument("--mount", help="mount path of the engine")
    p.add_argument("--key-name", dest="key_name", help="key name")
    p.add_argument("--token-path", dest="token_path", help="file holding the token (0600)")
    p.add_argument("--token-env", dest="token_env", help="environment variable with the token")
    p.add_argument("--ca-cert", dest="ca_cert", help="CA file for https")
    p.add_argument(
        "--insecure-skip-verify",
        dest="insecure_skip_verify",
        action="store_true",
        help="do not check the server's TLS certificate (testing only)",
    )
    p.add_argument("--timeout", type=float, help="seconds per request (default 30)")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: Any) -> None:
    """Add ``nebula vault`` to the CLI's argparse subparsers."""
    v = subparsers.add_parser("vault", help="consensus keys in Vault / OpenBao")
    vs = v.add_subparsers(dest="vault_cmd", required=True)

    s = vs.add_parser("create-key", help="create a new ed25519 transit key")
    _common(s)
    s.set_defaults(func=cmd_create_key)

    s = vs.add_parser("import-key", help="import a priv_validator_key.json (ed25519) into transit")
    s.add_argument("file", help="CometBFT priv_validator_key.json")
    _common(s)
    s.set_defaults(func=cmd_import_key)

    s = vs.add_parser("show-key", help="check the Vault key and show its address")
    s.add_argument(
        "--plugin",
        action="store_true",
        help="the signer plugin key ([signing.vault_signer_plugin]) instead of transit",
    )
    _common(s)
    s.set_defaults(func=cmd_show_key)
