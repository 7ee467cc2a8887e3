"""A request between ``Engine.submit`` and its answer: what the engine keeps of it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .inputs import RequestInputs
from .model_table import ModelKey
from .scheduler import EngineError, Priority

Outcome = np.ndarray | EngineError
"""What a request ends with: its scores ([N] for one output, else [N, H]) or its error."""


class Pending:
    """A request between ``submit`` and its answer (and, with ``on_release``, until the
    last batch reading its inputs is done: ``jobs`` counts those dispatched)."""

    __slots__ = ("on_done", "on_release", "inputs", "key", "scores", "rows_left", "outputs",
                 "submitted", "jobs", "priority", "dispatched", "batches")

    def __init__(self, on_done: Callable[[Outcome], None],
                 on_release: Callable[[], None] | None, inputs: RequestInputs,
                 key: ModelKey, outputs: int, submitted: float, priority: Priority) -> None:
        self.on_done, self.on_release, self.inputs, self.key = on_done, on_release, inputs, key
        self.scores: np.ndarray | None = None  # [N, outputs], made for split requests only
        self.rows_left = inputs.num_candidates
        self.outputs = outputs
        self.submitted = submitted
        self.jobs = 0
        self.priority = priority
        self.dispatched: float | None = None  # when its first rows went into a batch
        self.batches = 0  # batches that held a piece of it
