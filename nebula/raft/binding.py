"""A Raft data directory is bound to the cluster secret it was created under.

The transport's handshake proves the cluster secret and nothing else, so a member of an
*earlier incarnation* of the cluster (a data directory not wiped when the cluster was
rebuilt, a VM restored from a backup) that is given the new secret would be taken as a
member.  Its log is the old cluster's: with a higher term and a longer log it can win an
election and overwrite entries that the new cluster committed but some followers had not
yet learned were committed, which can move a chain's high-water mark back: a double sign.

The rebuild procedure (README) writes a new cluster secret, so the secret is the
cluster's incarnation.  This module makes a data directory remember which secret it
belongs to: ``cluster.binding`` (mode 0600, written atomically and durably before the
Raft log is created) holds one line::

    nebula-raft-binding 1 <HMAC-SHA256(secret, "nebula raft data directory binding v1"), hex>

The HMAC names the secret without revealing it.  On every start, before the log is
opened, :func:`check_binding` compares it with the configured secret and refuses a
mismatch (:class:`~nebula.errors.StateError`, nothing on disk changed).  A directory
without the file (new, or written by a release before this one) is bound to the
configured secret on that start: one that already holds a log is taken in with a warning,
since nothing then tells an old incarnation's directory (restored from a backup taken
before bindings) from the current one's.

What it cannot see: a cluster rebuilt with the *same* secret, whose old members all look
like its own.  The rebuild procedure therefore still says to write a new secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from nebula.durable import write_file_durably
from nebula.errors import StateError

logger = logging.getLogger(__name__)


class BindingMismatch(StateError):
    """The directory is bound to another cluster secret than the one given."""


BINDING_NAME = "cluster.binding"
_TAG = "nebula-raft-binding"
_VERSION = "1"
_INFO = b"nebula raft data directory binding v1"
_MAX = 256  # the file is one short line; anything longer is not ours


def fingerprint(secret: bytes) -> str:
    """The hex HMAC that names ``secret`` in a binding file."""
    return hmac.new(bytes(secret), _INFO, hashlib.sha256).hexdigest()


def encode(secret: bytes) -> bytes:
    return f"{_TAG} {_VERSION} {fingerprint(secret)}\n".encode()


def decode(raw: bytes, path: Path) -> str:
    """The fingerprint in a binding file's bytes; StateError if they are not one."""
    parts = raw.decode("ascii", "replace").split() if len(raw) <= _MAX else []
    if len(parts) != 3 or parts[0] != _TAG:
        raise StateError(
            f"{path}: not a Nebula cluster binding file; it should hold one line "
            f"'{_TAG} {_VERSION} <hex>'. Refusing to start"
        )
    if parts[1] != _VERSION:
        raise StateError(
            f"{path}: cluster binding format {parts[1]!r} is not one this release reads "
            f"({_VERSION}); refusing to start (was this directory written by a newer release?)"
        )
    fp = parts[2]
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise StateError(f"{path}: the cluster binding is not a 64-digit hex HMAC")
    return fp


def check_binding(data_path: Path, secret: bytes, *, create: bool = True) -> bool:
    """Refuse ``data_path`` if it was bound to another cluster secret; bind it to
    ``secret`` if it is not bound yet (unless ``create`` is false: a reader that changes
    nothing).  Call with the directory's lock held, before the Raft log is opened.
    Returns True when the binding was written now."""
    path = data_path / BINDING_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as e:
        raise StateError(f"{path}: cannot read the cluster binding: {e}") from None
    if raw is not None:
        if not hmac.compare_digest(decode(raw, path), fingerprint(secret)):
            raise BindingMismatch(
                f"{path}: this Raft data directory belongs to a cluster with a different "
                "secret, so its log is another cluster's (or the same cluster's before its "
                "secret was changed). Refusing to start: taken into this cluster, an old log "
                "could win an election and roll back a chain's sign state. If the cluster "
                f"was rebuilt, wipe {data_path} (the README's re-membership steps). If you "
                "changed this same cluster's secret on purpose, with every member stopped, "
                f"delete {path} on every member and start them again"
            )
        return False
    if not create:
        return False
    existing = [p.name for p in data_path.iterdir() if p.name != "raft.lock"]
    try:
        write_file_durably(path, encode(secret))
    except OSError as e:
        raise StateError(f"{path}: cannot write the cluster binding: {e}") from None
    if existing:
        # Nothing tells this directory's incarnation any more: if it is an old one (a
        # VM restored from a backup taken before bindings) it is taken in from now on.
        logger.warning(
            "%s: Raft data written before cluster bindings (%s) is now bound to the "
            "configured cluster secret; if this member's data may come from an earlier "
            "incarnation of the cluster (a restored backup), stop it and wipe it",
            data_path,
            ", ".join(sorted(existing)),
        )
    return True
