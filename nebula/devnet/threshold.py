"""Local threshold-BLS clusters (demo, bench): give each node one share of a split key."""

from __future__ import annotations

from collections.abc import Sequence

from nebula.crypto.keys import SigningKey
from nebula.crypto.threshold import split, write_share_file
from nebula.devnet.cluster import KEY_NAME, NodeDir
from nebula.errors import ConfigError

__all__ = ["SHARE_NAME", "give_shares", "parse_t_of_n"]

SHARE_NAME = "share.json"


def parse_t_of_n(text: str) -> tuple[int, int]:
    """``"2-of-3"`` -> (2, 3); ConfigError for anything else or t below the Raft quorum."""
    t_s, sep, n_s = text.partition("-of-")
    if not sep or not t_s.isdigit() or not n_s.isdigit():
        raise ConfigError(f"--threshold takes T-of-N, e.g. 2-of-3, got {text!r}")
    t, n = int(t_s), int(n_s)
    if n not in (3, 5) or not n // 2 + 1 <= t <= n:
        raise ConfigError(
            f"--threshold {text}: N must be 3 or 5 and T between the Raft quorum "
            f"({n // 2 + 1}) and N (a T below the quorum is refused: nebula/state/threshold.py)"
        )
    return t, n


def give_shares(dirs: Sequence[NodeDir], key: SigningKey, threshold: int) -> None:
    """Replace the whole key in each single-chain node directory written by
    :func:`nebula.devnet.cluster.write_cluster` with that node's share of a
    ``threshold``-of-len(dirs) split of ``key`` (``signing_mode = "threshold_bls"``)."""
    if key.key_type != "bls12381":
        raise ConfigError("a threshold split needs a bls12381 key")
    shares = split(key.secret_bytes(), threshold, len(dirs))
    native = f'[signing.native]\nprivate_key_path = "./{KEY_NAME}"\nkey_type = "bls12381"\n'
    for d, share in zip(dirs, shares, strict=True):
        if share.index != d.node_id:
            raise ConfigError(f"{d.config_path}: node {d.node_id} is not share {share.index}")
        text = d.config_path.read_text()
        if native not in text or 'signing_mode = "native"' not in text:
            raise ConfigError(f"{d.config_path}: not a single-chain native-key node directory")
        text = text.replace('signing_mode = "native"', 'signing_mode = "threshold_bls"')
        text = text.replace(native, f'[signing.threshold_bls]\nshare_path = "./{SHARE_NAME}"\n')
        d.config_path.write_text(text)
        (d.home / KEY_NAME).unlink()  # no node keeps the whole key
        write_share_file(d.home / SHARE_NAME, share, overwrite=True)
