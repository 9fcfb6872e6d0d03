"""``nebula hsm``: the consensus key in a hardware security module (PKCS#11).

* ``nebula hsm generate -c CONFIG`` — generate the key inside the token: sensitive, never
  extractable; prints its address and public key;
* ``nebula hsm import -c CONFIG priv_validator_key.json`` — store an existing CometBFT key
  in the token (non-extractable from then on), with a warning that the key existed
  outside the HSM;
* ``nebula hsm show -c CONFIG`` — the key's type, address and public key, after the same
  login, lookup and self-test signature ``nebula start`` runs.

Settings come from the config's ``[signing.pkcs11]`` (``--chain`` picks a chain of a
multi-chain config); each can be overridden with a flag, and without a config the flags
are used (``--pin-path`` is then required).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from nebula.errors import ConfigError


def _settings(args: argparse.Namespace) -> Any:
    from nebula import config
    from nebula.backends.pkcs11 import Pkcs11Settings

    section: Any = config.Pkcs11Signing()
    base = Path.cwd() / "nebula.toml"
    where = "nebula hsm"
    if args.config:
        cfg = config.load(args.config)
        chain = cfg.chain(args.chain)
        if chain.signing.pkcs11 is None:
            raise ConfigError(f"{cfg.path}: no [{chain.where('signing.pkcs11')}] section")
        section = chain.signing.pkcs11
        base = cfg.path
        where = f"{cfg.path}: {chain.where('signing.pkcs11')}"

    def pick(flag: str) -> Any:
        v = getattr(args, flag, None)
        return getattr(section, flag) if v is None else v

    pin_path = pick("pin_path")
    return Pkcs11Settings.create(
        module_path=pick("module_path"),
        token_label=pick("token_label"),
        pin_path=config.resolve_path(base, pin_path) if pin_path else None,
        key_type=pick("key_type"),
        key_label=pick("key_label"),
        key_id=pick("key_id"),
        public_key=None,  # generate/import make the key; show reads it
        timeout=section.timeout,
        where=where,
    )


def _show(backend: Any, s: Any, as_json: bool) -> None:
    from nebula.crypto.keys import pubkey_json

    info = {
        "key_type": backend.key_type,
        "address": backend.address.hex().upper(),
        "pub_key": pubkey_json(backend),
        "pub_key_base64": base64.b64encode(backend.public_key).decode(),
        "token_label": s.token_label,
        "key_label": s.key_label,
        "key_id": s.key_id.hex() if s.key_id else None,
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"key type : {info['key_type']}")
    print(f"address  : {info['address']}")
    print(f"pub_key  : {json.dumps(info['pub_key'])}")
    print(f"base64   : {info['pub_key_base64']}")
    print(f"token    : {s.token_label} ({s.key_name})")


def cmd_generate(args: argparse.Namespace) -> int:
    from nebula.backends.pkcs11 import Pkcs11Backend, generate_key

    s = _settings(args)
    generate_key(s)
    backend = Pkcs11Backend.connect(s)  # the checks and self-test of `nebula start`
    backend.release()
    print(
        f"generated a {s.key_type} key inside token {s.token_label!r} ({s.key_name}); "
        "it cannot be extracted",
        file=sys.stderr,
    )
    _show(backend, s, args.json)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from nebula.backends.pkcs11 import KEY_TYPES, Pkcs11Backend, import_key
    from nebula.crypto.keys import load_priv_validator_key_json

    key = load_priv_validator_key_json(args.file)
    if key.key_type not in KEY_TYPES:
        raise ConfigError(
            f"{args.file} holds a {key.key_type} key; the PKCS#11 backend signs "
            f"{' and '.join(KEY_TYPES)} keys"
        )
    if args.key_type is None:
        args.key_type = key.key_type
    s = _settings(args)
    if s.key_type != key.key_type:
        raise ConfigError(f"{args.file} holds a {key.key_type} key, not {s.key_type}")
    import_key(s, key.secret_bytes(), key.public_key)
    backend = Pkcs11Backend.connect(s)
    backend.release()
    print(
        f"WARNING: this key existed outside the HSM ({args.file}); whoever had a copy can "
        "still sign with it. Keep an offline backup at most and remove the file from this "
        "machine; for a key that never left a token use `nebula hsm generate`.",
        file=sys.stderr,
    )
    print(
        f"imported {args.file} into token {s.token_label!r} ({s.key_name}); address "
        f"{key.address.hex().upper()} unchanged",
        file=sys.stderr,
    )
    _show(backend, s, args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from nebula.backends.pkcs11 import Pkcs11Backend

    s = _settings(args)
    backend = Pkcs11Backend.connect(s)
    backend.release()
    _show(backend, s, args.json)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (settings from [signing.pkcs11])")
    p.add_argument("--chain", help="the config's chain whose settings to use (several chains)")
    p.add_argument("--module", dest="module_path", help="the PKCS#11 module (.so)")
    p.add_argument("--token-label", dest="token_label", help="the token's label")
    p.add_argument("--pin-path", dest="pin_path", help="file holding the user PIN (0600)")
    p.add_argument("--key-label", dest="key_label", help="the key's CKA_LABEL")
    p.add_argument("--key-id", dest="key_id", help="the key's CKA_ID, hex")
    p.add_argument("--key-type", dest="key_type", choices=["ed25519", "secp256k1"])
    p.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: Any) -> None:
    """Add ``nebula hsm`` to the CLI's argparse subparsers."""
    h = subparsers.add_parser("hsm", help="consensus keys in an HSM (PKCS#11)")
    hs = h.add_subparsers(dest="hsm_cmd", required=True)

    s = hs.add_parser("generate", help="generate the key inside the token (non-extractable)")
    _common(s)
    s.set_defaults(func=cmd_generate)

    s = hs.add_parser("import", help="store a priv_validator_key.json in the token")
    s.add_argument("file", help="CometBFT priv_validator_key.json")
    _common(s)
    s.set_defaults(func=cmd_import)

    s = hs.add_parser("show", help="check the token's key and show its address")
    _common(s)
    s.set_defaults(func=cmd_show)
