"""What the engine measures about itself: latency and batch-size histograms, invalid ids."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .histogram import SIZE_BOUNDS, Histogram
from .inputs import RequestInputs
from .scheduler import BatchPlan, EngineError
from .spec import ModelSpec


class EngineMetrics:
    """Distributions the engine observes on the event loop (so no locking is needed)."""

    def __init__(self) -> None:
        self.queue_wait_s = Histogram()
        """Submit to the request's first rows dispatched in a batch."""
        self.compute_s = Histogram()
        """A batch's dispatch to the executor until its result is back on the loop."""
        self.batch_rows = Histogram(SIZE_BOUNDS)
        self.batch_requests = Histogram(SIZE_BOUNDS)
        self.padding_rows = Histogram(SIZE_BOUNDS)
        self.invalid_ids: Counter[str] = Counter()
        """Ids outside their table, per sparse feature, in requests refused for them."""
        self.dispatched: dict[int, float] = {}  # batch seq -> dispatch time, while running

    def to_dict(self) -> dict:
        """Histograms as ``Histogram.to_dict`` maps, invalid ids per feature."""
        names = ("queue_wait_s", "compute_s", "batch_rows", "batch_requests", "padding_rows")
        return {"histograms": {n: getattr(self, n).to_dict() for n in names},
                "invalid_ids": dict(self.invalid_ids)}

    def observe_batch(self, plan: BatchPlan, now: float, first_submitted: dict[int, float]) -> None:
        """Sizes of a batch being dispatched, and the queue wait of each request whose first
        rows it carries (``first_submitted``: request id -> submit time)."""
        self.batch_rows.observe(plan.rows)
        self.batch_requests.observe(len(plan.pieces))
        self.padding_rows.observe(plan.padding)
        self.dispatched[plan.seq] = now
        for submitted in first_submitted.values():
            self.queue_wait_s.observe(now - submitted)

    def count_invalid(self, spec: ModelSpec, inputs: RequestInputs, error: EngineError) -> None:
        """Count the out-of-table ids of a refused request per feature (a rare path, so the
        ids are checked again here rather than carried back from the executor)."""
        found = False
        for feature in spec.sparse:
            values = inputs.sparse[feature.name].values
            bad = int(np.count_nonzero((values < 0) | (values >= spec.table(feature.table).rows)))
            if bad:
                self.invalid_ids[feature.name] += bad
                found = True
        feature = getattr(error, "feature", None)
        if not found and feature is not None:
            self.invalid_ids[feature] += 1
