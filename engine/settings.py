"""Engine settings: one frozen, validated dataclass shared by the scheduler, executor and engine."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} is {value!r}; expected a positive integer")


def _non_negative_float(what: str, value: object) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{what} is {value!r}; expected a finite number >= 0")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How the engine batches, queues and runs requests."""

    max_batch_rows: int = 4096
    """Most candidate rows in one batch; larger requests are split across batches."""
    buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    """Batch sizes a batch is rounded up to (ascending, the last equal to max_batch_rows), so a
    GPU executor can replay one captured graph per bucket; the padding rows are counted."""
    slots: int = 2
    """Batches the executor may hold at once (being packed, computed or copied back)."""
    max_queued_rows: int = 65536
    """Admission bound: a request that would bring the queued (not yet dispatched) rows above
    this is refused at once with ``overloaded`` (LOW priority from half of it, HIGH an
    eighth past it: ``scheduler.ADMIT_SHARE``)."""
    fill_wait_s: float = 0.0
    """Longest a model's oldest queued request waits for more rows before a batch that is not
    full is dispatched anyway; 0 dispatches whatever is queued as soon as a slot is free."""
    aging_s: float | None = 0.1
    """A queued request rises one priority level per ``aging_s`` seconds of waiting, so low
    priority work cannot starve; None turns aging off (strict priority)."""

    def __post_init__(self) -> None:
        _positive_int("max_batch_rows", self.max_batch_rows)
        if not isinstance(self.buckets, tuple) or not self.buckets:
            raise ValueError(f"buckets is {self.buckets!r}; expected a non-empty tuple")
        for i, size in enumerate(self.buckets):
            _positive_int(f"buckets[{i}]", size)
        if any(a >= b for a, b in zip(self.buckets, self.buckets[1:], strict=False)):
            raise ValueError(f"buckets {self.buckets!r} must be strictly ascending")
        if self.buckets[-1] != self.max_batch_rows:
            raise ValueError(f"the last bucket ({self.buckets[-1]}) must equal max_batch_rows "
                             f"({self.max_batch_rows})")
        _positive_int("slots", self.slots)
        _positive_int("max_queued_rows", self.max_queued_rows)
        _non_negative_float("fill_wait_s", self.fill_wait_s)
        if self.aging_s is not None:
            _non_negative_float("aging_s", self.aging_s)
            if self.aging_s == 0:
                raise ValueError("aging_s is 0; use a positive number, or None to disable aging")

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket holding ``rows`` (1 <= rows <= max_batch_rows)."""
        for size in self.buckets:
            if rows <= size:
                return size
        raise ValueError(f"{rows} rows is above max_batch_rows ({self.max_batch_rows})")
