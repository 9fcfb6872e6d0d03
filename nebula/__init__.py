"""Nebula: a highly available CometBFT remote signer."""

__version__ = "0.1.0"
