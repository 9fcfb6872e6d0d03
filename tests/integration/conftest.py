"""Fixtures shared by the Raft integration tests (real raftnode processes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.raftnode import Auditor, Cluster

# Election timeouts a little above the defaults: a loaded 2-core machine must not see
# spurious elections in tests that do not ask for them.
FAST = {"election_timeout_min": 0.4, "election_timeout_max": 0.8, "connection_retry": 0.1}


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make(n=3, store={...}, **Cluster kwargs)``; every cluster made is closed after."""
    made: list[Cluster] = []

    def make(n: int = 3, **kw: Any) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", n, store={**FAST, **kw.pop("store", {})}, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def audit(c: Cluster) -> dict[tuple[str, int, int, int], bytes]:
    """Every decision any node (alive or retired) released: two different signatures for
    one (chain, h, r, step) fail."""
    return Auditor(lambda: [*c.nodes.values(), *c.retired]).check()
