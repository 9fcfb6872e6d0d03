"""Helpers for the tests of the Rust extension's native threads."""

from __future__ import annotations


class StoppedThread:
    """A native worker core (``SignWorker``, ``SyncWorker``) whose thread reports itself
    gone: what a thread that stopped on its own (it should not) looks like from Python.
    Every other attribute is the real core's."""

    alive = False

    def __init__(self, core: object) -> None:
        self._core = core

    def __getattr__(self, name: str) -> object:
        return getattr(self._core, name)
