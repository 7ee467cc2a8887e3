"""Executors run batch plans; ``CpuExecutor`` does it with worker threads and the reference model.

The interface is what the engine needs from any executor (the GPU one included):
``build_model`` (called from a background thread; returns a handle with a ``spec``),
``free_slots`` and ``submit(job, done)``, which must not block: the executor runs the
job on its own threads and calls ``done(result)`` from one of them when the job is
finished, after the job's slot is free again. Each piece of a job gets scores or a
typed error of its own, so one bad request never fails the others in its batch.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .flat import slice_rows
from .inputs import Batch, RequestInputs, collate
from .reference import ReferenceModel
from .scheduler import BatchPlan, EngineError
from .settings import EngineSettings
from .spec import ModelSpec


@dataclass(frozen=True, slots=True)
class Job:
    """A planned batch with what it needs to run."""

    plan: BatchPlan
    model: Any
    """The executor's model handle (from ``build_model``), fixed when the batch was planned, so
    a model swapped out meanwhile still finishes this batch."""
    inputs: tuple[RequestInputs, ...]
    """The whole request of each piece, in plan order; the executor slices the planned rows."""


@dataclass(frozen=True, slots=True)
class PieceResult:
    """The outcome of one piece: scores [count, H] (fp32) or an error. The scores are the
    caller's from then on (a request scored in one piece is answered with this very
    array, or a view of it): an executor never writes them again."""

    scores: np.ndarray | None = None
    error: EngineError | None = None


@dataclass(frozen=True, slots=True)
class JobResult:
    """A finished job: one result per piece, in plan order."""

    job: Job
    pieces: tuple[PieceResult, ...]


Done = Callable[[JobResult], None]


class Executor(ABC):
    """Runs batch plans on some device, up to ``settings.slots`` at once."""

    @abstractmethod
    def start(self) -> None:
        """Allocate buffers and start threads (the constructor does no work)."""

    @abstractmethod
    def build_model(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> Any:
        """A runnable model handle with a ``spec`` attribute; may be slow (runs off the loop)."""

    @abstractmethod
    def free_slots(self) -> int:
        """How many more jobs ``submit`` accepts now."""

    @abstractmethod
    def submit(self, job: Job, done: Done) -> None:
        """Start ``job`` without blocking; ``done`` is called from an executor thread."""

    @abstractmethod
    def close(self) -> None:
        """Finish running jobs and stop; no ``submit`` after this."""


def index_problem(spec: ModelSpec, inputs: RequestInputs) -> str | None:
    """Why a request's ids fall outside their tables, or None when they all fit."""
    for feature in spec.sparse:
        values = inputs.sparse[feature.name].values
        rows = spec.table(feature.table).rows
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= rows):
            return (f"sparse feature {feature.name!r} has ids in [{int(values.min())}, "
                    f"{int(values.max())}]; table {feature.table!r} has {rows} rows")
    return None


def _ids_in_range(spec: ModelSpec, batch: Batch) -> bool:
    # One check per feature over the whole batch; per request only when it fails.
    for feature in spec.sparse:
        values = batch.sparse[feature.name].values.numpy()
        if len(values) and (values.min() < 0 or values.max() >= spec.table(feature.table).rows):
            return False
    return True


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator failure worth retrying on a smaller batch."""
    return isinstance(exc, MemoryError | torch.OutOfMemoryError)


class CpuExecutor(Executor):
    """Worker threads, one per slot, each running the fp32 reference model on CPU.

    ``fault`` (tests) is called with each batch just before its forward; whatever it raises
    is handled as if the forward had raised it (``torch.OutOfMemoryError`` simulates OOM).
    """

    def __init__(self, settings: EngineSettings, *, torch_threads: int | None = None,
                 fault: Callable[[Batch], None] | None = None) -> None:
        self.settings = settings
        self.torch_threads = torch_threads
        self.fault = fault
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start one worker thread per slot."""
        if self._threads:
            return
        if self.torch_threads is not None:
            torch.set_num_threads(self.torch_threads)  # process-wide: torch has no per-thread pool
        for i in range(self.settings.slots):
            thread = threading.Thread(target=self._work, name=f"recserve-cpu-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def build_model(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> ReferenceModel:
        """The reference model on CPU (raises ValueError when the weights do not fit the spec)."""
        return ReferenceModel(spec, weights, "cpu")

    def free_slots(self) -> int:
        """Slots not holding a job."""
        with self._lock:
            return self.settings.slots - self._busy

    def submit(self, job: Job, done: Done) -> None:
        """Queue ``job`` for a worker; raises RuntimeError when no slot is free."""
        if not self._threads:
            raise RuntimeError("CpuExecutor.submit before start()")
        with self._lock:
            if self._busy >= self.settings.slots:
                raise RuntimeError(f"all {self.settings.slots} slots are busy")
            self._busy += 1
        self._jobs.put((job, done))

    def close(self) -> None:
        """Let the workers finish their jobs, then stop them."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, done = item
            try:
                pieces = self.run(job)
            except Exception as exc:  # a bug here must still answer every request
                error = EngineError("internal", f"{type(exc).__name__}: {exc}")
                pieces = tuple(PieceResult(error=error) for _ in job.plan.pieces)
            with self._lock:
                self._busy -= 1  # before done(): the engine refills the slot from there
            done(JobResult(job, pieces))

    def run(self, job: Job) -> tuple[PieceResult, ...]:
        """Run one job synchronously (the worker's body; public for tests)."""
        spec = job.model.spec
        results: list[PieceResult | None] = [None] * len(job.plan.pieces)
        items = []
        for i, (piece, inputs) in enumerate(zip(job.plan.pieces, job.inputs, strict=True)):
            try:
                items.append((i, slice_rows(spec, inputs, piece.start, piece.count)))
            except Exception as exc:  # arrays decoded only now (DeferredInputs) can refuse
                results[i] = PieceResult(error=EngineError("internal",
                                                           f"{type(exc).__name__}: {exc}"))
        try:
            batch = collate(spec, [rows for _, rows in items])
        except Exception:  # a malformed request: _score isolates it
            batch = None
        if batch is None or not _ids_in_range(spec, batch):  # rare: find the bad requests
            batch, good = None, []
            for i, rows in items:
                problem = index_problem(spec, rows)
                if problem is None:
                    good.append((i, rows))
                else:
                    results[i] = PieceResult(error=EngineError("bad_request", problem))
            items = good
        if items:
            self._score(job.model, items, results, batch)
        return tuple(results)

    def _score(self, model: ReferenceModel, items: list[tuple[int, RequestInputs]],
               results: list[PieceResult | None], batch: Batch | None = None) -> None:
        try:
            if batch is None:
                batch = collate(model.spec, [rows for _, rows in items])
            if self.fault is not None:
                self.fault(batch)
            scores = model.forward(batch).numpy()
        except Exception as exc:
            if len(items) == 1:
                results[items[0][0]] = PieceResult(error=_as_engine_error(exc, items[0][1]))
            elif is_out_of_memory(exc):  # smaller batches may fit: halve and retry
                half = len(items) // 2
                self._score(model, items[:half], results)
                self._score(model, items[half:], results)
            else:  # find the request(s) at fault: retry each alone
                for item in items:
                    self._score(model, [item], results)
            return
        start = 0
        for i, rows in items:
            results[i] = PieceResult(scores=scores[start:start + rows.num_candidates])
            start += rows.num_candidates


def _as_engine_error(exc: Exception, rows: RequestInputs) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if is_out_of_memory(exc):
        return EngineError("internal", f"out of memory scoring {rows.num_candidates} rows")
    return EngineError("internal", f"{type(exc).__name__}: {exc}")
