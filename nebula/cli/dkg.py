"""``nebula keys dkg``: a dealerless t-of-n BLS12-381 key generation in file rounds.

Each member runs the three steps on its own machine; an operator carries the public
files between the machines (the members need not be online together):

* ``nebula keys dkg init --index I --dir DIR`` writes ``DIR/member-I.secret.json`` (mode
  0600, stays) and ``DIR/member-I.pub.json`` (goes to every other member);
* ``nebula keys dkg deal --index I --threshold T --members member-*.pub.json --dir DIR``
  writes ``DIR/deal-I.json`` (public: the values in it are sealed to each member) and
  prints the ceremony id, which every member compares before handing over its deal;
* ``nebula keys dkg finish --index I --threshold T --members ... --deals deal-*.json
  --dir DIR`` checks every deal, writes ``DIR/share-I.json`` (the share key file
  ``nebula keys split`` writes) and prints the group key, its address and the transcript
  hash, which every member compares.

The design and its security argument: :mod:`nebula.crypto.dkg`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from nebula.errors import ConfigError, KeyFileError

_MAX_PUBLIC_FILE = 1 << 20


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_PUBLIC_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if len(raw) > _MAX_PUBLIC_FILE:
        raise KeyFileError(f"{what} {path} is too large")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # (JSONDecodeError, int()'s digit limit)
        raise KeyFileError(f"{path}: not valid JSON ({e})") from None


def _write_public(path: Path, doc: dict[str, Any], *, overwrite: bool) -> None:
    from nebula.crypto.keys import write_private_file

    if not overwrite and os.path.lexists(path):
        raise KeyFileError(f"{path} already exists; refusing to overwrite it (--force)")
    data = (json.dumps(doc, indent=2) + "\n").encode("ascii")
    write_private_file(path, data, overwrite=overwrite, mode=0o644)  # public: 0644


def _secret_path(args: argparse.Namespace) -> Path:
    return Path(args.dir) / f"member-{args.index}.secret.json"


def _load_me(args: argparse.Namespace) -> Any:
    from nebula.crypto import dkg
    from nebula.crypto.keys import read_private_file

    p = str(_secret_path(args))
    raw = read_private_file(p, what="DKG member secret file")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (JSONDecodeError, int()'s digit limit)
        raise KeyFileError(f"{p}: not valid JSON ({e})") from None
    me = dkg.MemberSecret.from_json(doc, p)
    if me.index != args.index:
        raise KeyFileError(f"{p} is the identity of member {me.index}, not {args.index}")
    return me


def _ceremony(args: argparse.Namespace) -> Any:
    """The ceremony from --threshold and --members, with the Raft quorum rule."""
    from nebula.crypto import dkg

    members = [dkg.MemberPublic.from_json(_read_json(f, "member file"), f) for f in args.members]
    n = len(members)
    quorum = n // 2 + 1
    if args.threshold < quorum and not args.allow_below_quorum:
        raise ConfigError(
            f"--threshold {args.threshold} is below the Raft quorum of {n} members ({quorum}): "
            "a Nebula cluster refuses it (t shares must imply a committed decision); "
            "--allow-below-quorum makes it anyway"
        )
    return dkg.Ceremony.of(args.threshold, members)


def cmd_init(args: argparse.Namespace) -> int:
    from nebula.crypto import dkg
    from nebula.crypto.keys import write_private_file

    me = dkg.new_member(args.index)  # checks the index
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = _secret_path(args)
    public = d / f"member-{args.index}.pub.json"
    if not args.force:
        for p in (secret, public):
            if os.path.lexists(p):
                raise KeyFileError(f"{p} already exists; refusing to overwrite it (--force)")
    text = json.dumps(me.to_json(), indent=2) + "\n"
    write_private_file(secret, text.encode("ascii"), overwrite=args.force)
    _write_public(public, me.public.to_json(), overwrite=args.force)
    info = {
        "index": me.index,
        "fingerprint": me.public.fingerprint,
        "public_file": str(public),
        "secret_file": str(secret),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"member {me.index}: ceremony identity {me.public.fingerprint}")
        print(f"  {secret}  (mode 0600: stays on this machine)")
        print(f"  {public}  (give it to every other member)")
        print("next, once every member's .pub.json is here: nebula keys dkg deal")
    return 0


def cmd_deal(args: argparse.Namespace) -> int:
    from nebula.crypto import dkg

    me = _load_me(args)
    cer = _ceremony(args)
    deal = dkg.make_deal(cer, me)
    out = Path(args.out) if args.out else Path(args.dir) / f"deal-{me.index}.json"
    _write_public(out, deal.to_json(), overwrite=args.force)
    info = {
        "dealer": me.index,
        "threshold": cer.threshold,
        "shares": cer.shares,
        "ceremony": cer.id.hex(),
        "deal_file": str(out),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"member {me.index} dealt for a {cer.threshold}-of-{cer.shares} key:")
        print(f"  {out}  (public: give it to every member, this one included)")
        print(f"ceremony : {info['ceremony']}")
        print(
            "compare the ceremony id with every other member over a channel the operator "
            "does not control before handing over the deal"
        )
    return 0


def cmd_finish(args: argparse.Namespace) -> int:
    from nebula.crypto import dkg, threshold
    from nebula.crypto.keys import pubkey_json

    me = _load_me(args)
    cer = _ceremony(args)
    deals = [dkg.Deal.from_json(_read_json(f, "deal file"), f) for f in args.deals]
    result = dkg.finish(cer, me, deals)  # DealRefused names the dealers; nothing written
    out = Path(args.out) if args.out else Path(args.dir) / f"share-{me.index}.json"
    threshold.write_share_file(out, result.share, overwrite=args.force)
    back = threshold.load_share_file(out)
    if back.secret != result.share.secret or not threshold.same_split([back, result.share]):
        raise KeyFileError(f"internal error: {out} does not read back as written")
    pub = result.public
    info = {
        "index": me.index,
        "threshold": pub.threshold,
        "shares": pub.shares,
        "address": pub.address.hex().upper(),
        "pub_key": pubkey_json(pub),
        "ceremony": cer.id.hex(),
        "transcript": result.transcript.hex(),
        "share_file": str(out),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"member {me.index}: share {me.index} of a {pub.threshold}-of-{pub.shares} key")
        print(f"  {out}  (mode 0600: this member's share key file)")
        print(f"address    : {info['address']}")
        print(f"pub_key    : {json.dumps(info['pub_key'])}")
        print(f"transcript : {info['transcript']}")
        print(
            "every member must print the same address and transcript (compare them out of "
            "band); if one differs or a member's finish failed, every member deletes its "
            f"share file and the ceremony restarts. Once all agree, delete "
            f"{_secret_path(args)}: with the deal files it gives this member's share"
        )
    return 0


def register(keys: Any) -> None:
    """Add ``nebula keys dkg`` to the ``nebula keys`` subparsers."""
    g = keys.add_parser(
        "dkg", help="dealerless t-of-n BLS12-381 key generation (no machine holds the key)"
    ).add_subparsers(dest="dkg_cmd", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--index", "-i", type=int, required=True, help="this member's node id")
        s.add_argument("--json", action="store_true")
        s.add_argument("--force", action="store_true", help="overwrite the files it writes")

    s = g.add_parser("init", help="make this member's ceremony identity")
    common(s)
    s.add_argument(
        "--dir",
        "--out",
        dest="dir",
        required=True,
        help="writes member-I.secret.json (stays) and member-I.pub.json (goes to the others)",
    )
    s.set_defaults(func=cmd_init)

    for name, func, help_ in (
        ("deal", cmd_deal, "deal this member's encrypted values to every member"),
        ("finish", cmd_finish, "check every deal and write this member's share file"),
    ):
        s = g.add_parser(name, help=help_)
        common(s)
        s.add_argument("--threshold", "-t", type=int, required=True, help="shares needed to sign")
        s.add_argument(
            "--members", nargs="+", required=True, help="every member's .pub.json, this one's too"
        )
        if name == "finish":
            s.add_argument("--deals", nargs="+", required=True, help="every member's deal-I.json")
        s.add_argument("--dir", required=True, help="the directory init wrote")
        s.add_argument(
            "--out",
            help="default DIR/deal-I.json" if name == "deal" else "default DIR/share-I.json",
        )
        s.add_argument("--allow-below-quorum", action="store_true", help="a t below n//2+1 anyway")
        s.set_defaults(func=func)
