"""Real CometBFT nodes for end-to-end tests (design.md §5, protocol.md §1, §7).

The implementation lives in :mod:`nebula.devnet.cometbft` (shared with ``nebula demo``);
this module re-exports it for the tests and adds the pytest fixture ``local_chains``
(import it into a test module or a conftest), which stops every chain it made at teardown.
The multi-validator networks of :mod:`nebula.devnet.network` get the same treatment:
``local_networks`` makes them and stops every node at teardown.

Typical use::

    from tests.support.cometbft import LocalChain, ValidatorKey, VERIFIERS, verify_commit_signatures

    key = ValidatorKey("ed25519", pubkey_bytes)
    with LocalChain.create(tmp_path, "v0.38.25", validator=key,
                           priv_validator_laddr=f"tcp://127.0.0.1:{port}") as chain:
        ...  # start Nebula, dialing 127.0.0.1:port
        chain.wait_for_height(10, timeout=30)
        verify_commit_signatures(chain, key.pub_key, key.key_type, range(1, 10),
                                 VERIFIERS[key.key_type])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nebula.devnet.cometbft import (
    BLOCK_ID_FLAG_ABSENT,
    BLOCK_ID_FLAG_COMMIT,
    BLOCK_ID_FLAG_NIL,
    BLS_DST,
    KEY_TYPES,
    PINNED_VERSIONS,
    VERIFIERS,
    CommitInfo,
    CommitSig,
    DevnetError,
    GoToolchainMissing,
    HarnessError,
    LocalChain,
    SignBytesFn,
    ValidatorKey,
    VerifiedSignature,
    VerifyFn,
    bls12381_verify,
    cache_root,
    cached_cometbft,
    cometbft_binary_path,
    duplicate_vote_evidence,
    ed25519_verify,
    edit_toml,
    ensure_cometbft,
    parse_commit,
    parse_rfc3339_nano,
    read_filepv_key,
    secp256k1_verify,
    signed_commits,
    validator_address,
    verify_commit_signatures,
    write_filepv_key,
)
from nebula.devnet.network import (
    LocalNetwork,
    ValidatorSpec,
    evidence_validator_address,
    evidence_votes,
    verify_duplicate_vote_evidence,
)

__all__ = [
    "BLOCK_ID_FLAG_ABSENT",
    "BLOCK_ID_FLAG_COMMIT",
    "BLOCK_ID_FLAG_NIL",
    "BLS_DST",
    "KEY_TYPES",
    "PINNED_VERSIONS",
    "VERIFIERS",
    "CommitInfo",
    "CommitSig",
    "DevnetError",
    "GoToolchainMissing",
    "HarnessError",
    "LocalChain",
    "LocalNetwork",
    "SignBytesFn",
    "ValidatorKey",
    "ValidatorSpec",
    "VerifiedSignature",
    "VerifyFn",
    "bls12381_verify",
    "cache_root",
    "cached_cometbft",
    "cometbft_binary_path",
    "duplicate_vote_evidence",
    "ed25519_verify",
    "edit_toml",
    "ensure_cometbft",
    "evidence_validator_address",
    "evidence_votes",
    "local_chains",
    "local_networks",
    "parse_commit",
    "parse_rfc3339_nano",
    "read_filepv_key",
    "secp256k1_verify",
    "signed_commits",
    "validator_address",
    "verify_commit_signatures",
    "verify_duplicate_vote_evidence",
    "write_filepv_key",
]


@pytest.fixture
def local_chains(tmp_path: Path) -> Iterator[Callable[..., LocalChain]]:
    """Factory fixture: ``make(version, **LocalChain.create kwargs) -> started LocalChain``.

    Every chain made is stopped at teardown, also when the test fails. Pass
    ``start=False`` to get an initialised but not started chain. Skips the test when a
    binary must be built and Go is not installed.
    """
    made: list[LocalChain] = []

    def make(version: str, *, start: bool = True, **kwargs: Any) -> LocalChain:
        try:
            chain = LocalChain.create(tmp_path, version, **kwargs)
        except GoToolchainMissing as exc:
            pytest.skip(str(exc))
        made.append(chain)
        if start:
            chain.start()
        return chain

    try:
        yield make
    finally:
        for chain in made:
            chain.stop()


@pytest.fixture
def local_networks(tmp_path: Path) -> Iterator[Callable[..., LocalNetwork]]:
    """Factory fixture: ``make(version, validators, **LocalNetwork kwargs) -> LocalNetwork``,
    initialised in ``tmp_path/net<n>`` but not started (remote-signer nodes wait for their
    signer, so the test decides the order). Every node is stopped at teardown, also when
    the test fails. Skips the test when a binary must be built and Go is not installed."""
    made: list[LocalNetwork] = []

    def make(version: str, validators: list[ValidatorSpec], **kwargs: Any) -> LocalNetwork:
        try:
            net = LocalNetwork.create(tmp_path / f"net{len(made)}", version, validators, **kwargs)
        except GoToolchainMissing as exc:
            pytest.skip(str(exc))
        made.append(net)
        return net

    try:
        yield make
    finally:
        for net in made:
            net.stop()
