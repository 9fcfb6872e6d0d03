"""Operating a running node or cluster: status, leader transfer, state, membership.

Every command but ``cluster secret`` (which writes a new cluster secret file) talks to
running nodes through their admin sockets (:mod:`nebula.aio.admin`); give one ``-c`` per
node you want to see or reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nebula import config
from nebula.aio import admin
from nebula.errors import NebulaError
from nebula.guard import SignRecord
from nebula.state.base import record_from_json, record_to_json

_STEP = {0: "-", 1: "propose", 2: "prevote", 3: "precommit"}


def _query(cfg_path: str, cmd: str, **args: Any) -> Any:
    cfg = config.load(cfg_path)
    return admin.request(admin.socket_path(cfg), cmd, **args)


STATUS_TIMEOUT = 2.0  # seconds per member; members are asked concurrently


def _status_of(path: str, timeout: float) -> dict[str, Any]:
    try:
        st = _query(path, "status", timeout=timeout)
        st["config"] = path
    except admin.AdminUnreachable as e:
        # A paused (SIGSTOP) or wedged member accepts the connection and never answers.
        st = {"config": path, "role": "unreachable", "error": str(e)}
    except NebulaError as e:
        st = {"config": path, "role": "down", "error": str(e)}
    except TimeoutError:
        # A paused (SIGSTOP) or wedged member accepts the connection and never answers.
        st = {"config": path, "role": "unreachable", "error": f"no answer within {timeout:g}s"}
    except OSError as e:
        st = {"config": path, "role": "unreachable", "error": str(e)}
    return st


def _statuses(paths: list[str], timeout: float = STATUS_TIMEOUT) -> list[dict[str, Any]]:
    """Every member's status, asked concurrently: the whole call takes at most about
    ``timeout`` however many members are down or paused."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as pool:
        return list(pool.map(lambda p: _status_of(p, timeout), paths))


def _fmt_state(st: dict[str, Any]) -> str:
    chains = st.get("chains") or {}
    parts = []
    for chain, s in chains.items():
        parts.append(f"{chain} {s['height']}/{s['round']}/{_STEP.get(s['step'], s['step'])}")
    return ", ".join(parts) or "-"


def _reachable(s: dict[str, Any]) -> bool:
    return s.get("role") not in ("down", "unreachable")


def _healthy(sts: list[dict[str, Any]]) -> bool:
    """Every member answers and runs: none down, unreachable or stopped (a member that
    failed closed, or was removed, answers with role "stopped"); the exit status says so."""
    return all(_reachable(s) and s.get("role") != "stopped" for s in sts)


def cmd_status(args: argparse.Namespace) -> int:
    sts = _statuses(args.config, args.timeout)
    if args.json:
        print(json.dumps(sts, indent=2, default=str))
        return 0 if _healthy(sts) else 1
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Nebula cluster status")
    for col in ("node", "role", "term", "leader", "commit", "applied", "quorum",
                "validators", "last signed (h/r/step)"):  # fmt: skip
        t.add_column(col)
    for s in sts:
        if not _reachable(s):
            t.add_row(
                s["config"], f"[red]{s['role']}[/red]", "", "", "", "", "", "", s.get("error", "")
            )
            continue
        vals = s.get("validators") or []
        conn = sum(1 for v in vals if v.get("connected"))
        role = s.get("role", "?")
        role_txt = f"[bold green]{role}[/bold green]" if role == "leader" else role
        t.add_row(
            str(s.get("node_id", s["config"])),
            role_txt,
            str(s.get("term", "-")),
            str(s.get("leader_id", "-")),
            str(s.get("commit_index", "-")),
            str(s.get("applied_index", "-")),
            "yes" if s.get("has_quorum", s.get("authoritative")) else "no",
            f"{conn}/{len(vals)}",
            _fmt_state(s),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(t)
    chains = _chains_table(sts)
    if chains is not None:
        console.print(chains)
    return 0 if _healthy(sts) else 1


def _chains_table(sts: list[dict[str, Any]]) -> Any:
    """One row per served chain, as the leader (else the first reachable member) sees it;
    None for a single-chain node."""
    from rich.table import Table

    reachable = [s for s in sts if _reachable(s) and s.get("served")]
    if not reachable:
        return None
    src = next((s for s in reachable if s.get("authoritative")), reachable[0])
    served = src["served"]
    if len(served) < 2:
        return None
    t = Table(title=f"Chains (as node {src.get('node_id', src['config'])} sees them)")
    for col in ("chain", "line", "key", "address", "validators", "last signed (h/r/step)"):
        t.add_column(col)
    for chain_id, c in served.items():
        st = c.get("state")
        last = (
            f"{st['height']}/{st['round']}/{_STEP.get(st['step'], st['step'])}"
            if st
            else "never signed"
        )
        key = f"{c.get('key_type', '')} ({c.get('signing_mode', '')})"
        if c.get("backend_unavailable"):
            key = f"backend unavailable ({c.get('signing_mode', '')}), retrying"
        t.add_row(
            chain_id,
            str(c.get("version", "")),
            key,
            str(c.get("address", ""))[:12],
            f"{c.get('validators_connected', 0)}/{c.get('validators', 0)}",
            last,
        )
    return t


def _find_leader(paths: list[str]) -> str:
    for s in _statuses(paths):
        if s.get("role") == "leader":
            return s["config"]
    raise NebulaError("no reachable node is the leader (give -c for every member)")


def cmd_leader_transfer(args: argparse.Namespace) -> int:
    leader = _find_leader(args.config)
    res = _query(leader, "transfer", timeout=15, to=args.to)
    print(f"leadership moved to node {res['leader_id']}")
    return 0


def cmd_member(args: argparse.Namespace) -> int:
    leader = _find_leader(args.config)
    if args.member_cmd == "add":
        res = _query(leader, "add_member", timeout=15, id=args.id, addr=args.addr)
    else:
        res = _query(leader, "remove_member", timeout=15, id=args.id)
    print(f"members: {res['members']}")
    return 0


SECRET_BYTES = 32


def cmd_secret(args: argparse.Namespace) -> int:
    """A new cluster secret: 32 random bytes, hex, in a 0600 file that is never
    overwritten without ``--force``."""
    import secrets

    from nebula.crypto.keys import write_private_file

    write_private_file(
        args.output, (secrets.token_hex(SECRET_BYTES) + "\n").encode(), overwrite=args.force
    )
    print(
        f"wrote a new cluster secret to {args.output} (0600): copy it to every member's "
        "raft.secret_path; a Raft data directory created under another secret refuses it"
    )
    return 0


def export_raft_state(cfg: config.LoadedConfig, chain_id: str) -> SignRecord | None:
    res = admin.request(admin.socket_path(cfg), "export", chain_id=chain_id)
    return record_from_json(res, "exported state") if res else None


def import_raft_state(cfg: config.LoadedConfig, chain_id: str, rec: SignRecord | None) -> int:
    if rec is None:
        print("nothing to import: the file holds the initial (0/0/0) state")
        return 0
    res = admin.request(
        admin.socket_path(cfg),
        "import",
        timeout=15,
        chain_id=chain_id,
        state=record_to_json(rec),
    )
    print(f"state for {chain_id}: {res['height']}/{res['round']}/{res['step']}")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("status", help="role, term, leader, indexes, sign state, connections")
    s.add_argument(
        "-c",
        "--config",
        action="append",
        required=True,
        help="a node's config (repeat for every member)",
    )
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--timeout",
        type=float,
        default=STATUS_TIMEOUT,
        help="seconds to wait for each member (asked concurrently); a paused member "
        "shows as unreachable",
    )
    s.set_defaults(func=cmd_status)

    lead = sub.add_parser("leader", help="Raft leadership").add_subparsers(
        dest="leader_cmd", required=True
    )
    s = lead.add_parser("transfer", help="move leadership to another member")
    s.add_argument("-c", "--config", action="append", required=True)
    s.add_argument("--to", type=int, help="target node id (default: the most caught-up)")
    s.set_defaults(func=cmd_leader_transfer)

    mem = sub.add_parser("cluster", help="membership").add_subparsers(
        dest="member_cmd", required=True
    )
    s = mem.add_parser("add", help="add a member (start it first with the new peer list)")
    s.add_argument("-c", "--config", action="append", required=True)
    s.add_argument("--id", type=int, required=True)
    s.add_argument("--addr", required=True, help="host:port of its Raft port")
    s.set_defaults(func=cmd_member)
    s = mem.add_parser("remove", help="remove a member")
    s.add_argument("-c", "--config", action="append", required=True)
    s.add_argument("--id", type=int, required=True)
    s.set_defaults(func=cmd_member)
    s = mem.add_parser("secret", help="write a new cluster secret (for a new or rebuilt cluster)")
    s.add_argument("-o", "--output", required=True, help="file to create (mode 0600)")
    s.add_argument("--force", action="store_true", help="replace an existing file")
    s.set_defaults(func=cmd_secret)


__all__ = ["export_raft_state", "import_raft_state", "register"]
