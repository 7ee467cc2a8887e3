"""The front-end workers ``serve`` starts by default, from the cores this process may use
(``recserve.engine.cores``: affinity and the cgroup CPU quota, not the machine's cores)."""

from __future__ import annotations

from recserve.engine import cores as cores_module


def default_workers(one_at_a_time: bool = False, cores: int | None = None) -> int:
    """``serve``'s front-end processes when ``--workers`` is not given: one per four
    available cores, at most 4, so 1 below 8 cores (the 2-core CI machine keeps one
    process, and its low-load latency: a worker adds a hop). Measured with bench/server.py,
    demo model, closed loop: on a 16-core H100 host, 4 workers served 3287-3426 requests/s
    against 2012-2136 for one process; on 2 cores, 2 workers 1.0-1.7x one process (both in
    bench/RESULTS.md). ``--one-at-a-time`` (a baseline) stays one process."""
    if one_at_a_time:
        return 1
    if cores is None:
        cores = cores_module.available_cores()
    return max(1, min(4, cores // 4))
