"""The `nebula` command line: one verb per module, one composition root."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nebula import __version__
from nebula.errors import CredentialRejected, NebulaError

if TYPE_CHECKING:
    from nebula.config import LoadedConfig
    from nebula.guard import SignRecord

BACKENDS = {
    "native": "native",
    "vault-transit": "vault_transit",
    "vault-signer-plugin": "vault_signer_plugin",
    "pkcs11": "pkcs11",
}


def _die(msg: str, code: int = 2) -> int:
    print(f"nebula: error: {msg}", file=sys.stderr)
    return code


# ---- init ------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from nebula import config

    out = Path(args.output_path)
    if out.exists() and not args.force:
        return _die(f"{out} exists; use --force to overwrite")
    text = config.template(
        BACKENDS[args.backend],
        chain_id=args.chain_id,
        version=args.cometbft_version,
        persist=args.persist,
        key_type=args.key_type,
    )
    config.loads(text, out)  # the template must always be valid
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    if args.backend == "native":
        print(f"next: nebula keys generate -c {out} --key-type {args.key_type}")
    elif args.backend == "pkcs11":
        print(
            f"next: nebula hsm generate -c {out}  "
            f"(or: nebula hsm import -c {out} priv_validator_key.json)"
        )
    elif args.backend == "vault-transit":
        print(
            f"next: nebula vault create-key -c {out}  "
            f"(or: nebula vault import-key -c {out} priv_validator_key.json)"
        )
    return 0


# ---- keys ------------------------------------------------------------------------------


def _key_path_from(args: argparse.Namespace) -> tuple[Path, str, bytes | None]:
    """(key file, key type, bls dst) from --output/--key-file or the config's native section."""
    from nebula import config
    from nebula.crypto.keys import BLS_DEFAULT_DST

    explicit = getattr(args, "output", None) or getattr(args, "key_file", None)
    if explicit and not args.config:
        return Path(explicit), args.key_type or "ed25519", None
    if not args.config:
        raise NebulaError("give -c CONFIG or an explicit key file path")
    cfg = config.load(args.config)
    chain = cfg.chain(getattr(args, "chain", None))
    n = chain.signing.native
    if n is None:
        if explicit:
            return Path(explicit), args.key_type or "ed25519", None
        raise NebulaError(
            f"{cfg.path}: no [{chain.where('signing.native')}] section to take the key path from"
        )
    dst = n.bls_dst.encode() if n.bls_dst else BLS_DEFAULT_DST
    if explicit:
        # A key file is a bare secret: with a config, its key type (and BLS DST) is the
        # config's unless --key-type says otherwise (it used to be read as Ed25519).
        return Path(explicit), args.key_type or n.key_type, dst
    key_type = args.key_type or n.key_type
    if args.key_type and args.key_type != n.key_type:
        raise NebulaError(
            f"--key-type {args.key_type} disagrees with {chain.where('signing.native.key_type')}"
            f" = {n.key_type!r} in {cfg.path}"
        )
    path = cfg.resolve(n.private_key_path)
    assert path is not None
    return path, key_type, dst


def _print_key(key, as_json: bool) -> None:
    from nebula.crypto.keys import pubkey_json

    info = {
        "key_type": key.key_type,
        "address": key.address.hex().upper(),
        "pub_key": pubkey_json(key),
        "pub_key_base64": base64.b64encode(key.public_key).decode(),
    }
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"key type : {info['key_type']}")
        print(f"address  : {info['address']}")
        print(f"pub_key  : {json.dumps(info['pub_key'])}")
        print(f"base64   : {info['pub_key_base64']}")


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from nebula.crypto import keys

    path, key_type, dst = _key_path_from(args)
    key = keys.generate(key_type) if dst is None else keys.generate(key_type, bls_dst=dst)
    keys.write_key_file(path, key, overwrite=args.force)
    print(f"wrote {key_type} key to {path} (mode 0600)")
    _print_key(key, args.json)
    return 0


def cmd_keys_import(args: argparse.Namespace) -> int:
    from nebula.crypto import keys

    key = keys.load_priv_validator_key_json(args.file)
    if args.key_type and args.key_type != key.key_type:
        return _die(f"{args.file} holds a {key.key_type} key, not {args.key_type}")
    args.key_type = key.key_type
    path, _, _ = _key_path_from(args)
    keys.write_key_file(path, key, overwrite=args.force)
    print(f"imported {key.key_type} key from {args.file} into {path} (mode 0600)")
    _print_key(key, args.json)
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from nebula.crypto import keys

    if args.config and not args.key_file:
        from nebula import config

        cfg = config.load(args.config)
        chain = cfg.chain(getattr(args, "chain", None))
        if chain.signing_mode == "threshold_bls":
            # This member's share, checked against the cluster as at start; the group key
            # is the validator's public key.
            from nebula.aio.daemon import make_backend

            backend = make_backend(cfg, chain)
            share = backend.share  # type: ignore[attr-defined]
            _print_key(backend, args.json)
            if not args.json:
                p = share.public
                print(f"share    : {share.index} of a {p.threshold}-of-{p.shares} split")
            return 0
    path, key_type, dst = _key_path_from(args)
    key = (
        keys.load_key_file(path, key_type)
        if dst is None
        else keys.load_key_file(path, key_type, bls_dst=dst)
    )
    _print_key(key, args.json)
    return 0


def cmd_keys_split(args: argparse.Namespace) -> int:
    """Split a BLS12-381 key into t-of-n threshold shares (one file per member)."""
    from nebula.crypto import keys, threshold

    dst = args.bls_dst.encode("ascii") if args.bls_dst else keys.BLS_DEFAULT_DST
    if args.from_json and args.from_key_file:
        return _die("give --from or --from-key-file, not both")
    whole: keys.SigningKey | None = None
    if args.from_json:
        whole = keys.load_priv_validator_key_json(args.from_json, bls_dst=dst)
    elif args.from_key_file:
        whole = keys.load_key_file(args.from_key_file, "bls12381", bls_dst=dst)
    if whole is not None and whole.key_type != "bls12381":
        return _die(f"only a BLS12-381 key can be split, this one is {whole.key_type}")
    quorum = args.shares // 2 + 1
    if args.threshold < quorum and not args.allow_below_quorum:
        return _die(
            f"--threshold {args.threshold} is below the Raft quorum of {args.shares} members "
            f"({quorum}): a Nebula cluster refuses it (t shares must imply a committed "
            "decision); --allow-below-quorum writes it anyway"
        )
    shares = threshold.split(
        None if whole is None else whole.secret_bytes(), args.threshold, args.shares, dst=dst
    )
    pub = shares[0].public
    if whole is not None and pub.group_public_key != whole.public_key:  # cannot happen
        return _die("internal error: the group key is not the original public key")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for s in shares:
        threshold.write_share_file(out / f"share-{s.index}.json", s, overwrite=args.force)
    info = {
        "threshold": pub.threshold,
        "shares": pub.shares,
        "address": pub.address.hex().upper(),
        "pub_key": keys.pubkey_json(pub),
        "files": [str(out / f"share-{s.index}.json") for s in shares],
        "source": args.from_json or args.from_key_file or "a fresh key",
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"split {info['source']} into {pub.threshold}-of-{pub.shares} shares:")
        for f in info["files"]:
            print(f"  {f}  (mode 0600; give member i the file share-i.json only)")
        print(f"address  : {info['address']}")
        print(f"pub_key  : {json.dumps(info['pub_key'])}")
        if whole is not None:
            print("the group public key is the original key's: CometBFT sees no change")
        print(
            'each member\'s config: signing_mode = "threshold_bls" with '
            '[signing.threshold_bls] share_path = "share-<node_id>.json"'
        )
    return 0


# ---- start / state ---------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    from nebula import config, logs
    from nebula.aio import daemon

    cfg = config.load(args.config)
    logs.setup(args.log_level or cfg.raw.log_level, args.log_format or cfg.raw.log_format)
    daemon.run(cfg)
    return 0


def _running(cfg) -> bool:
    from nebula.aio import admin

    try:
        admin.request(admin.socket_path(cfg), "status", timeout=2)
    except NebulaError:
        return False
    return True


def _export_offline(cfg: LoadedConfig, chain_id: str) -> SignRecord | None:
    """A stopped Raft member's mark for ``chain_id``, read from its data directory (a
    cluster that lost its majority has no leader to export through)."""
    from nebula.aio.daemon import _initial_paths, read_cluster_secret
    from nebula.errors import ConfigError
    from nebula.state.base import load_priv_validator_state
    from nebula.state.raft import read_offline

    r = cfg.raw.raft
    if cfg.raw.persist != "raft" or r is None:
        raise ConfigError(
            f"{cfg.path}: --offline reads a Raft member's data; this config "
            "keeps a local state file: export without --offline"
        )
    data_path, secret_path = cfg.resolve(r.data_path), cfg.resolve(r.secret_path)
    assert data_path is not None and secret_path is not None

    states = read_offline(data_path, read_cluster_secret(secret_path))
    chain = chain_id.encode()
    applied, high, rec = states.applied.get(chain), states.highest.get(chain), states.export(chain)
    # The initial state this member's config names (a migration's export) may never have
    # been applied (the cluster lost its majority before the import committed): nothing
    # was signed through the cluster for the chain then, but the signer it came from
    # signed up to it.  The online export refuses in that case (last_for_export).
    init_path = _initial_paths(cfg).get(chain_id)
    initial = load_priv_validator_state(init_path, chain_id) if init_path is not None else None

    def show(x: SignRecord | None) -> str:
        return f"{x.height}/{x.round}/{x.step}" if x is not None else "none"

    print(
        f"{data_path}: chain {chain_id}: committed and applied {show(applied)} (commit index "
        f"{states.commit}); highest in any entry held {show(high)} (last index "
        f"{states.last_index}); exported {show(rec)}"
        + (
            " as a bare mark (no sign bytes: that entry may never have been committed)"
            if rec is not None and rec is not applied
            else ""
        ),
        file=sys.stderr,
    )
    if initial is not None and (rec is None or initial.hrs > rec.hrs):
        print(
            f"{init_path}: the configured initial state {show(initial)} is higher than "
            "this member's Raft data (its import was never applied): exported it instead",
            file=sys.stderr,
        )
        rec = initial
    print(
        "this is one member's view: the others may have committed more. Export every "
        "surviving member and import the highest; if lost members could have been ahead "
        "of every survivor, raise the height to the chain's current height first",
        file=sys.stderr,
    )
    return rec


def cmd_state_export(args: argparse.Namespace) -> int:
    from nebula import config
    from nebula.cli.cluster import export_raft_state
    from nebula.errors import StateError
    from nebula.state.base import record_to_json
    from nebula.state.local import read_states

    cfg = config.load(args.config)
    chain_id = cfg.chain(args.chain).chain_id
    if args.offline:
        rec = _export_offline(cfg, chain_id)
    elif cfg.raw.persist == "raft" or _running(cfg):
        rec = export_raft_state(cfg, chain_id)  # ask the running node
    else:
        p = cfg.resolve(cfg.raw.state_path)
        assert p is not None
        if not p.exists():
            # Not zeros: an export is what a migration trusts (found in review).
            raise StateError(
                f"{p}: no state file (state_path in {cfg.path}): a wrong path, or a signer "
                "that never started - nothing to export"
            )
        rec = read_states(p).get(chain_id)  # reads only; creates nothing
    obj = record_to_json(rec) if rec is not None else {"height": "0", "round": 0, "step": 0}
    # CometBFT's file has only these keys; Nebula's extension fields are left out.
    keep = ("height", "round", "step", "signature", "signbytes")
    text = json.dumps({k: v for k, v in obj.items() if k in keep}, indent=2) + "\n"
    if args.output:
        from nebula.durable import write_file_durably

        try:  # whole or not at all: a migration trusts this file
            write_file_durably(args.output, text.encode())
        except OSError as e:
            raise StateError(f"{args.output}: cannot write the export: {e}") from None
    else:
        sys.stdout.write(text)
    return 0


def cmd_state_import(args: argparse.Namespace) -> int:
    from nebula import config
    from nebula.cli.cluster import import_raft_state
    from nebula.state.base import load_priv_validator_state
    from nebula.state.local import LocalStore

    cfg = config.load(args.config)
    chain_id = cfg.chain(args.chain).chain_id
    rec = load_priv_validator_state(args.file, chain_id)
    if cfg.raw.persist == "raft" or _running(cfg):
        return import_raft_state(cfg, chain_id, rec)  # through the running node
    p = cfg.resolve(cfg.raw.state_path)
    assert p is not None
    store = LocalStore(p)  # holds the state file's lock: refused while a node runs on it
    try:
        raised = store.force_import(chain_id, rec)
        after = store.last(chain_id)
    finally:
        store.close_sync()
    shown = f"{after.height}/{after.round}/{after.step}" if after else "0/0/0"
    if raised:
        print(f"state for {chain_id}: raised to {shown}")
    else:
        given = f"{rec.height}/{rec.round}/{rec.step}" if rec else "0/0/0"
        print(
            f"state for {chain_id}: unchanged at {shown} ({args.file} holds {given}, not "
            "higher: an import only ever raises it)"
        )
    return 0


# ---- parser ----------------------------------------------------------------------------


_CHAIN_HELP = "the chain id (required when the config serves several chains)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nebula", description="Highly available CometBFT remote signer"
    )
    p.add_argument("--version", action="version", version=f"nebula {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a commented, working config file")
    s.add_argument("--output-path", "-o", required=True)
    s.add_argument("--backend", choices=sorted(BACKENDS), default="native")
    s.add_argument("--chain-id", default="test-chain-v1")
    s.add_argument("--cometbft-version", default="v1_0", help="v0_34 | v0_37 | v0_38 | v1_0")
    s.add_argument("--persist", choices=["local", "raft"], default="local")
    s.add_argument("--key-type", choices=["ed25519", "secp256k1", "bls12381"], default="ed25519")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_init)

    k = sub.add_parser("keys", help="consensus keys").add_subparsers(dest="keys_cmd", required=True)
    for name, func, help_ in (
        ("generate", cmd_keys_generate, "generate a new consensus key"),
        ("import", cmd_keys_import, "import CometBFT's priv_validator_key.json"),
        ("show", cmd_keys_show, "show address and public key"),
    ):
        s = k.add_parser(name, help=help_)
        if name == "import":
            s.add_argument("file", help="priv_validator_key.json")
        s.add_argument("-c", "--config", help="config file (key path from [signing.native])")
        s.add_argument("--chain", help=_CHAIN_HELP)
        if name == "show":
            s.add_argument("--key-file", help="a key file instead of the config's")
        else:
            s.add_argument("--output", help="key file to write instead of the config's")
            s.add_argument("--force", action="store_true", help="overwrite an existing key file")
        s.add_argument("--key-type", choices=["ed25519", "secp256k1", "bls12381"])
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=func)

    s = k.add_parser("split", help="split a BLS12-381 key into t-of-n threshold shares")
    s.add_argument("--threshold", "-t", type=int, required=True, help="shares needed to sign")
    s.add_argument("--shares", "-n", type=int, required=True, help="members (the cluster size)")
    s.add_argument("--from", dest="from_json", help="an existing priv_validator_key.json")
    s.add_argument("--from-key-file", help="an existing native BLS key file")
    s.add_argument("--output-dir", "-o", required=True, help="writes share-1.json ... share-n.json")
    s.add_argument("--bls-dst", help="the BLS domain separation tag (default: the repo's)")
    s.add_argument(
        "--allow-below-quorum", action="store_true", help="write a t below n//2+1 anyway"
    )
    s.add_argument("--force", action="store_true", help="overwrite existing share files")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_split)

    s = sub.add_parser("start", help="run the signer")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--log-format", choices=["text", "json"])
    s.add_argument("--log-level")
    s.set_defaults(func=cmd_start)

    st = sub.add_parser("state", help="sign state").add_subparsers(dest="state_cmd", required=True)
    s = st.add_parser("export", help="write the sign state as priv_validator_state.json")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--chain", help=_CHAIN_HELP)
    s.add_argument("--output", "-o")
    s.add_argument(
        "--offline",
        action="store_true",
        help="read a stopped Raft member's data directory (when no leader can be had)",
    )
    s.set_defaults(func=cmd_state_export)
    s = st.add_parser("import", help="raise the sign state from a priv_validator_state.json")
    s.add_argument("-c", "--config", required=True)
    s.add_argument("--chain", help=_CHAIN_HELP)
    s.add_argument("file")
    s.set_defaults(func=cmd_state_import)

    # Every subcommand is part of the CLI: a module that fails to import is an error
    # here, never a subcommand that silently vanishes.
    from nebula.cli import bench, cluster, demo, dkg, hsm, vault

    dkg.register(k)  # nebula keys dkg init|deal|finish
    cluster.register(sub)
    vault.register(sub)
    hsm.register(sub)
    demo.register(sub)
    bench.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CredentialRejected as e:
        return _die(str(e), 3)  # never restarted: a retried PIN can lock the device
    except NebulaError as e:
        return _die(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
