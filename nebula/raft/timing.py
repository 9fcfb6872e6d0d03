"""The Raft timing keys: their bounds and their conversion to raft-rs ticks.

Used by the config schema (``nebula.config``) and by the store, so both apply the same
rule.  No heavy imports: the config loads this without the Rust extension.

| key | default | meaning |
|---|---|---|
| ``tick_interval`` | 0.05 s | one raft-rs tick |
| ``heartbeat_interval`` | 0.05 s | leader heartbeats (rounded to ticks, at least one) |
| ``election_timeout_min`` / ``_max`` | 0.3 / 0.6 s | a follower that hears no leader for a random time in this range starts a (pre-)election; failover takes about this long |
| ``commit_timeout`` | 1.0 s | how long a signing decision waits for the majority (bound: ``nebula.state.base.COMMIT_TIMEOUT_MAX``) |
| ``connection_retry`` | 0.1 s | first reconnect delay to a peer (doubles up to 1 s) |
| ``handshake_timeout`` | 2.0 s | an inbound Raft connection must authenticate within this |
"""

from __future__ import annotations

from nebula.errors import ConfigError

# Bounds of the timing keys (seconds).
TIMING_BOUNDS: dict[str, tuple[float, float]] = {
    "tick_interval": (0.005, 1.0),
    "heartbeat_interval": (0.005, 5.0),
    "election_timeout_min": (0.05, 30.0),
    "election_timeout_max": (0.06, 60.0),
    "connection_retry": (0.01, 10.0),
    "handshake_timeout": (0.1, 30.0),
}


def check_timing(
    *,
    tick_interval: float,
    heartbeat_interval: float,
    election_timeout_min: float,
    election_timeout_max: float,
    where: str = "raft",
) -> tuple[int, int, int]:
    """(heartbeat_tick, min_election_tick, max_election_tick), or ConfigError."""
    values = {
        "tick_interval": tick_interval,
        "heartbeat_interval": heartbeat_interval,
        "election_timeout_min": election_timeout_min,
        "election_timeout_max": election_timeout_max,
    }
    for key, v in values.items():
        lo, hi = TIMING_BOUNDS[key]
        if not lo <= v <= hi:  # NaN too
            raise ConfigError(f"{where}.{key} must be in [{lo:g}, {hi:g}] seconds, got {v!r}")
    hb = max(1, round(heartbeat_interval / tick_interval))
    emin = round(election_timeout_min / tick_interval)
    emax = round(election_timeout_max / tick_interval)
    if not emin > hb:
        raise ConfigError(
            f"{where}.election_timeout_min must be longer than heartbeat_interval "
            f"(in ticks of {tick_interval:g} s: {emin} <= {hb})"
        )
    if not emax > emin:
        raise ConfigError(
            f"{where}.election_timeout_max must be longer than election_timeout_min "
            f"(in ticks of {tick_interval:g} s: {emax} <= {emin})"
        )
    return hb, emin, emax


DEFAULTS: dict[str, float] = {
    "tick_interval": 0.05,
    "heartbeat_interval": 0.05,
    "election_timeout_min": 0.3,
    "election_timeout_max": 0.6,
    "commit_timeout": 1.0,
    "connection_retry": 0.1,
    "handshake_timeout": 2.0,
}
