"""The asyncio face of the engine: ``await engine.score(...)`` over the scheduler and an executor.

Everything here runs on the event loop thread except the executor's work and model
builds; executor threads hand results back with ``loop.call_soon_threadsafe``, so the
scheduler and the request table are only ever touched from the loop. Whenever a
request arrives or a batch finishes, the engine fills every free executor slot with
the scheduler's next batch (continuous batching); a timer expires queued requests at
their deadlines even while every slot is busy.

Models are keyed ``(name, version)``. ``load`` builds a model off the loop and swaps
it in atomically; the name's other versions are retired: new requests no longer reach
them, but their queued and running work finishes on them, then they are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .engine_metrics import EngineMetrics
from .executor import Executor, Job, JobResult
from .inputs import RequestInputs
from .model_table import ModelKey, ModelTable
from .pending import Outcome, Pending
from .scheduler import EngineError, Priority, Scheduler
from .settings import EngineSettings
from .slow_log import SlowRequestLog
from .spec import ModelSpec

log = logging.getLogger("recserve.engine")


class Engine:
    """Scores requests for several loaded models with continuous batching.

    Use ``async with Engine(settings, CpuExecutor) as engine`` (or ``await start()`` and
    ``await close()``). ``clock`` is the time base of deadlines (``time.monotonic``).
    """

    def __init__(self, settings: EngineSettings,
                 executor_factory: Callable[[EngineSettings], Executor], *,
                 clock: Callable[[], float] = time.monotonic,
                 slow_request_s: float | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self._factory = executor_factory
        self._scheduler = Scheduler(settings)
        self._executor: Executor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._models = ModelTable()
        self._pending: dict[int, Pending] = {}
        self._releasing: dict[int, Pending] = {}  # answered, inputs still in a batch
        self._next_id = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self.counters: Counter[str] = Counter()
        """Totals since start: requests, batches, rows, padding_rows, expired, failed, ..."""
        self.metrics = EngineMetrics()
        self._slow = SlowRequestLog(slow_request_s, clock) if slow_request_s else None
        """Logs answers later than ``slow_request_s`` after submit (None: off)."""

    async def start(self) -> None:
        """Create and start the executor."""
        if self._executor is None:
            self._loop = asyncio.get_running_loop()
            self._executor = self._factory(self.settings)
            self._executor.start()

    async def close(self) -> None:
        """Refuse new work, fail what is queued, let running batches finish, stop."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for request_id in list(self._pending):
            self._finish(request_id, EngineError("overloaded", "the engine is shutting down"))
        if self._executor is not None:
            await asyncio.to_thread(self._executor.close)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def load(self, name: str, version: int, spec: ModelSpec,
                   weights: dict[str, torch.Tensor]) -> None:
        """Build ``(name, version)`` in a background thread and make it the name's serving
        version; raises ``EngineError`` with the reason (and changes nothing) if it fails."""
        if self._executor is None:
            raise RuntimeError("Engine.load before start()")
        try:
            model = await asyncio.to_thread(self._executor.build_model, spec, weights)
        except Exception as exc:
            code = "bad_request" if isinstance(exc, ValueError) else "internal"
            raise EngineError(code, f"loading {name} version {version} failed: {exc}") from exc
        self._models.add((name, version), model)

    def unload(self, name: str, version: int | None = None) -> None:
        """Retire one version (or every version) of a model; running work finishes first."""
        self._models.unload(name, version)

    def models(self) -> list[ModelKey]:
        """Every servable (name, version), sorted."""
        return self._models.models()

    def resolve(self, name: str, version: int | None = None) -> ModelKey:
        """The key ``score`` would use: ``version`` None means the highest loaded one."""
        return self._models.resolve(name, version)

    def handle(self, name: str, version: int | None = None) -> Any:
        """The executor's built model (``build_model``'s result) serving ``name``: for
        inspection and benchmarks (bench/engine_gpu.py times its CUDA graphs)."""
        return self._models[self.resolve(name, version)]

    def spec(self, name: str, version: int | None = None) -> ModelSpec:
        """The spec of a servable model (for validating requests against it)."""
        return self.handle(name, version).spec

    async def score(self, name: str, inputs: RequestInputs, *, version: int | None = None,
                    priority: Priority = Priority.NORMAL,
                    deadline: float | None = None) -> np.ndarray:
        """Scores [N] (one output) or [N, H] for a validated request, in candidate order.

        ``deadline`` is an absolute time on ``self.clock``. Raises ``EngineError``
        (not_found, overloaded, too_large, deadline_exceeded, bad_request, internal).
        Cancelling the awaiting task drops the request's queued work.
        """
        future = asyncio.get_running_loop().create_future()

        def settle(outcome: Outcome) -> None:
            if not future.done():
                if isinstance(outcome, EngineError):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

        request_id = self.submit(name, inputs, settle, version=version, priority=priority,
                                 deadline=deadline)
        try:
            return await future
        except asyncio.CancelledError:
            self.cancel(request_id)
            raise

    def submit(self, name: str, inputs: RequestInputs, on_done: Callable[[Outcome], None], *,
               version: int | None = None, priority: Priority = Priority.NORMAL,
               deadline: float | None = None,
               on_release: Callable[[], None] | None = None) -> int:
        """``score`` without a task: queue the request and return its id (for ``cancel``);
        ``on_done`` is called once, later, on the loop, with the scores or the
        ``EngineError``. Refusals (not_found, overloaded, too_large, deadline_exceeded)
        raise at once instead. The server's engine process answers requests this way:
        a task and a future per request cost more CPU than the rest of its bookkeeping.

        ``on_release`` is called once, on the loop, when the engine will read ``inputs``
        no more: just before ``on_done`` when no batch holds them, else when the last
        batch holding a piece is done (a failed piece or a cancel can answer a request
        while another of its pieces is being packed). Memory the inputs view may be
        reused from then on; the server's shared-memory channel relies on it."""
        if self._closed or self._loop is None:
            raise EngineError("overloaded", "the engine is not running")
        key = self.resolve(name, version)
        outputs = len(self._models[key].spec.outputs)
        if inputs.num_candidates == 0:
            empty = np.zeros((0,) if outputs == 1 else (0, outputs), dtype=np.float32)
            if on_release is not None:
                self._loop.call_soon(on_release)
            self._loop.call_soon(on_done, empty)
            return 0
        self._next_id += 1
        request_id = self._next_id
        now = self.clock()
        # operator.index: any integer type (numpy's too) counts rows; the policy takes ints.
        rows = operator.index(inputs.num_candidates)
        self._scheduler.submit(request_id, key, rows, now, priority, deadline)
        self._pending[request_id] = Pending(on_done, on_release, inputs, key, outputs, now,
                                             priority)
        self._models.begin(key)
        self.counters["requests"] += 1
        if deadline is not None or self._executor.free_slots() > 0:
            self._pump()  # (else nothing to dispatch, and no new deadline to arm a timer for)
        return request_id

    def cancel(self, request_id: int) -> bool:
        """Drop a submitted request (its queued rows; a running batch's scores for it are
        discarded) without calling its ``on_done``; False when it was already answered."""
        if request_id not in self._pending:
            return False
        self.counters["cancelled"] += 1
        self._finish(request_id, None)
        return True

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch."""
        return self._scheduler.queued_rows

    def room(self, priority: Priority = Priority.NORMAL) -> int:
        """Rows a request of ``priority`` could bring now without being refused
        ``overloaded`` (a server checks this before reading a request's inputs)."""
        return self._scheduler.room(priority)

    @property
    def pending_requests(self) -> int:
        """Requests queued or running."""
        return len(self._pending)

    def stats(self) -> dict:
        """Counters, queue depth, latency and batch-size histograms, invalid ids per feature,
        and the executor's own ``stats()`` (GPU busy time, bytes copied) when it has one.
        Cheap: no device call. Call it on the event loop."""
        executor_stats = getattr(self._executor, "stats", None)
        # device memory of each model the executor measured (the GPU's: weights, slots)
        footprints = {f"{name}/{version}": dict(footprint)
                      for name, version in self._models.models()
                      if (footprint := getattr(self._models[(name, version)], "device_bytes",
                                               None))}
        return {"counters": dict(self.counters), "queued_rows": self.queued_rows,
                "pending_requests": self.pending_requests,
                "max_batch_rows": self.settings.max_batch_rows, **self.metrics.to_dict(),
                "executor": executor_stats() if executor_stats is not None else {},
                "model_device_bytes": footprints}

    def _pump(self) -> None:
        """Fill every free slot with a batch; re-arm the deadline/fill timer."""
        if self._closed or self._executor is None:
            return
        wake_at = None
        while self._executor.free_slots() > 0:
            decision = self._scheduler.next_batch(self.clock())
            self._expire(decision.expired)
            plan = decision.plan
            if plan is None:
                wake_at = decision.wake_at
                break
            holders = [self._pending[p.request_id] for p in plan.pieces]
            now = self.clock()
            for pending in holders:
                pending.jobs += 1
                pending.batches += 1
                if pending.dispatched is None:
                    pending.dispatched = now
            inputs = tuple(pending.inputs for pending in holders)
            self._count_batch(plan, now)
            self._executor.submit(Job(plan, self._models[plan.model], inputs), self._done)
        self._arm_timer(wake_at)

    def _count_batch(self, plan, now: float) -> None:
        """Counters and histograms of a batch about to be dispatched at ``now``."""
        m = self.metrics
        self.counters["batches"] += 1
        self.counters["rows"] += plan.rows
        self.counters["padding_rows"] += plan.padding
        m.observe_batch(plan, now, {p.request_id: self._pending[p.request_id].submitted
                                    for p in plan.pieces if p.start == 0})

    def _done(self, result: JobResult) -> None:
        """Executor thread: hand the result to the loop."""
        try:
            self._loop.call_soon_threadsafe(self._on_done, result)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _on_done(self, result: JobResult) -> None:
        started = self.metrics.dispatched.pop(result.job.plan.seq, None)
        if started is not None:
            self.metrics.compute_s.observe(self.clock() - started)
        for piece, outcome in zip(result.job.plan.pieces, result.pieces, strict=True):
            pending = self._pending.get(piece.request_id)
            if pending is None:  # cancelled, expired or failed meanwhile
                self._job_done(piece.request_id)
                continue
            pending.jobs -= 1
            if outcome.error is not None:
                self.counters["failed"] += 1
                if outcome.error.code == "bad_request":
                    self.metrics.count_invalid(result.job.model.spec, pending.inputs, outcome.error)
                self._finish(piece.request_id, outcome.error)
                continue
            if piece.count == pending.inputs.num_candidates:
                # the whole request in one piece: its rows of the batch's fresh scores
                self._finish(piece.request_id, np.asarray(outcome.scores, dtype=np.float32))
                continue
            if pending.scores is None:
                pending.scores = np.empty((pending.inputs.num_candidates, pending.outputs),
                                          dtype=np.float32)
            pending.scores[piece.start:piece.start + piece.count] = outcome.scores
            pending.rows_left -= piece.count
            if pending.rows_left == 0:
                self._finish(piece.request_id, pending.scores)
        self._pump()

    def _job_done(self, request_id: int) -> None:
        """A batch holding a piece of an answered request is done: release its inputs
        once no other batch holds them."""
        pending = self._releasing[request_id]
        pending.jobs -= 1
        if pending.jobs == 0:
            del self._releasing[request_id]
            self._release(pending)

    def _release(self, pending: Pending) -> None:
        if pending.on_release is not None:
            try:
                pending.on_release()
            except Exception:
                log.exception("a request's on_release callback failed")

    def _finish(self, request_id: int, outcome: np.ndarray | EngineError | None) -> None:
        """Answer a request (None: it was cancelled) and drop its unsent rows; its inputs
        are released first when no batch holds them, else when the last such is done."""
        pending = self._pending.pop(request_id)
        self._scheduler.cancel(request_id)
        if pending.jobs == 0:
            self._release(pending)
        else:
            self._releasing[request_id] = pending
        if outcome is not None:
            if self._slow is not None:
                self._note_latency(pending, outcome)
            if not isinstance(outcome, EngineError) and pending.outputs == 1:
                outcome = outcome[:, 0]
            try:
                pending.on_done(outcome)
            except Exception:  # the caller's bug must not cost the batch's other requests
                log.exception("a request's on_done callback failed")
        self._models.end(pending.key)

    def _note_latency(self, pending: Pending, outcome: np.ndarray | EngineError) -> None:
        """Count (and log, rate-limited) an answer later than the slow-request threshold."""
        name, version = pending.key
        queued = None if pending.dispatched is None else pending.dispatched - pending.submitted
        what = (f"{name} v{version}, {pending.inputs.num_candidates} candidates, priority "
                f"{Priority(pending.priority).name.lower()}")
        if self._slow.observe(what, self.clock() - pending.submitted, queued, pending.batches,
                              outcome.code if isinstance(outcome, EngineError) else "ok"):
            self.counters["slow"] += 1

    def _expire(self, request_ids: tuple[int, ...]) -> None:
        for request_id in request_ids:
            self.counters["expired"] += 1
            self._finish(request_id, EngineError(
                "deadline_exceeded", "the deadline passed while the request was queued"))

    def _arm_timer(self, wake_at: float | None) -> None:
        deadline = self._scheduler.next_deadline()
        target = min((t for t in (wake_at, deadline) if t is not None), default=None)
        if target == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = target
        if target is not None:
            self._timer = self._loop.call_later(max(0.0, target - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, None
        self._expire(self._scheduler.expire(self.clock()))
        self._pump()
