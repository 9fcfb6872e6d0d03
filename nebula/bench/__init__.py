"""``nebula bench``: signing round trips measured from the validator's side.

* :mod:`nebula.bench.client` - a blocking privval listener (the validator's end).
* :mod:`nebula.bench.workload` - proposal/prevote/precommit requests on consecutive heights.
* :mod:`nebula.bench.runner` - send them, time them, verify every signature.
* :mod:`nebula.bench.stats` - percentiles and the Prometheus per-phase scrape.
* :mod:`nebula.bench.local` - local nodes / Raft clusters started for ``--local N``.
* :mod:`nebula.bench.report` - JSON, rich tables, the optional histogram.
"""
