"""Fixtures for the end-to-end tests."""

from tests.support.cometbft import local_chains, local_networks

__all__ = ["local_chains", "local_networks"]
