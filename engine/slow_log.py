"""A log line for each request the engine took longer than a threshold to answer, saying
where the time went (queued, in how many batches), at a bounded rate.

Histograms say how many requests were slow; these lines say which (model, size, priority)
and whether they waited for a batch or for the device, which is what a p99 spike needs
first. Under overload every request may be slow: at most ``burst`` lines, then one a
``refill_s``, each saying how many were left unlogged since the one before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("recserve.engine")


class SlowRequestLog:
    """Logs answers slower than ``threshold_s`` (rate-limited: see the module docstring)."""

    def __init__(self, threshold_s: float, clock: Callable[[], float], *, burst: int = 5,
                 refill_s: float = 2.0, logger: logging.Logger = log) -> None:
        if not threshold_s > 0:
            raise ValueError(f"slow-request threshold {threshold_s!r} s; expected > 0")
        self.threshold_s = threshold_s
        self.clock, self.burst, self.refill_s, self.log = clock, burst, refill_s, logger
        self._tokens = float(burst)
        self._last = clock()
        self.unlogged = 0
        """Slow answers not logged since the last line (the rate limit)."""

    def observe(self, what: str, latency_s: float, queued_s: float | None, batches: int,
                outcome: str) -> bool:
        """Note one answer (``what``: model, size, priority); True when it was slow."""
        if latency_s < self.threshold_s:
            return False
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) / self.refill_s)
        self._last = now
        if self._tokens < 1:
            self.unlogged += 1
            return True
        self._tokens -= 1
        queued = ("never dispatched" if queued_s is None
                  else f"queued {queued_s * 1e3:.1f} ms before its first batch")
        more = f"; {self.unlogged} more slow requests since the last line" if self.unlogged \
            else ""
        self.log.warning("slow request: %s took %.1f ms (%s, %d batch%s), %s%s", what,
                         latency_s * 1e3, queued, batches, "" if batches == 1 else "es",
                         outcome, more)
        self.unlogged = 0
        return True
