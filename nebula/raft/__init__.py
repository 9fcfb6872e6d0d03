"""Nebula's Raft layer: tikv's raft-rs (``_core``, a pyo3 extension built from ``rust/``)
driven by the event loop.

Read top-down: ``_core`` (the binding), ``storage`` (durable log and hard state),
``transport`` (authenticated frames, one live connection per peer), ``node`` (the
Ready loop, I/O injected), ``commands`` (versioned log commands and snapshot data);
``nebula.state.raft`` is the sign store on top.
"""
