"""Fixed-bucket histograms that merge across replicas (Prometheus-style), without locks on read.

Every recserve latency and size distribution is one of these, so the ``stats`` op, the
Prometheus endpoint and ``recserve top`` all read the same numbers. Buckets are upper
bounds; ``counts`` are per bucket (not cumulative) with a final +Inf bucket.
"""

from __future__ import annotations

import bisect
import threading

# Seconds: 50 us .. 10 s, about 4 buckets per decade (fine enough for a p99 of a few ms).
LATENCY_BOUNDS_S = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3,
                    7.5e-3, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0)
# Rows or requests per batch: powers of two up to 64k.
SIZE_BOUNDS = tuple(float(1 << k) for k in range(17))


class Histogram:
    """Counts of observations per bucket, plus their sum; safe to observe from any thread."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_S) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"histogram bounds must be strictly ascending, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one observation."""
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[index] += 1
            self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """Estimated q-quantile (0 < q <= 1): linear inside the bucket holding it; nan if empty."""
        return quantile_from(self.bounds, self.counts, q)

    def to_dict(self) -> dict:
        """``{bounds, counts, sum, count}``: what the ``stats`` op sends."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        return {"bounds": list(self.bounds), "counts": counts, "sum": total,
                "count": sum(counts)}


def quantile_from(bounds: tuple[float, ...] | list[float], counts: list[int], q: float) -> float:
    """The q-quantile of a histogram given as bounds and per-bucket counts."""
    total = sum(counts)
    if total == 0:
        return float("nan")
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            low = bounds[i - 1] if i > 0 else 0.0
            high = bounds[i] if i < len(bounds) else bounds[-1]
            return low + (high - low) * (rank - seen) / c
        seen += c
    return float(bounds[-1])
