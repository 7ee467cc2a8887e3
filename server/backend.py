"""What the dispatcher scores with: a narrow async interface, and two implementations.

``Backend`` is all the server needs from an engine: which models it serves, and an
awaitable ``score``. ``ReferenceBackend`` is the first cut: every model held as a
``ReferenceModel`` on the CPU, requests scored one at a time in a worker thread so
the event loop never blocks. ``EngineBackend`` adapts the batching ``engine.Engine``
(continuous batching, deadlines, hot swap) to the same interface.

Deadlines are absolute ``time.monotonic()`` seconds (the engine's default clock).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from recserve.engine.inputs import RequestInputs, collate
from recserve.engine.scheduler import Priority
from recserve.engine.spec import ModelSpec

from .errors import DeadlineExceeded, NotFound, RecserveError

if TYPE_CHECKING:  # torch comes with ReferenceBackend only: worker processes never load it
    from recserve.engine.reference import ReferenceModel


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """One servable model version."""

    name: str
    """Model name, as clients send it."""
    version: int
    """Integer version."""
    spec: ModelSpec
    """Its spec: the dispatcher validates requests against it."""


def resolve_handle(handles: dict[tuple[str, int], ModelHandle], name: str,
                   version: int | None) -> ModelHandle:
    """``Backend.resolve`` over a table of (name, version) -> handle."""
    versions = sorted(v for (n, v) in handles if n == name)
    if not versions:
        served = sorted({n for (n, _) in handles})
        raise NotFound(message=f"model {name!r} is not served here; models: {served}")
    if version is None:
        version = versions[-1]
    handle = handles.get((name, version))
    if handle is None:
        raise NotFound(message=f"model {name!r} has no version {version} here; "
                               f"versions: {versions}")
    return handle


class Backend(Protocol):
    """The scoring engine behind the server.

    Optional: ``async score_request(handle, inputs, deadline, pinned, priority) ->
    (scores, version)`` for a backend that may score a newer version than the one the
    request was validated against (the worker processes' ``RemoteBackend``, whose model
    table can trail a swap); the dispatcher uses it when present, else ``score`` with the
    resolved version.
    """

    def models(self) -> list[ModelHandle]:
        """Every model version being served, sorted by name then version."""
        ...

    def resolve(self, name: str, version: int | None) -> ModelHandle:
        """The version asked for (the highest served one when None); raises ``NotFound``."""
        ...

    async def score(self, model: str, version: int, inputs: RequestInputs,
                    deadline: float | None = None,
                    priority: Priority = Priority.NORMAL) -> np.ndarray:
        """float32 scores, [N] for one output or [N, H] for H outputs; ``RecserveError``
        subclasses for refusals (``DeadlineExceeded`` once ``deadline`` has passed).
        ``priority`` orders queued work (a backend without a queue may ignore it)."""
        ...

    async def close(self) -> None:
        """Release threads and memory; no ``score`` call may follow."""
        ...


class ReferenceBackend:
    """Scores with ``ReferenceModel`` (fp32, CPU), one request at a time off the event loop.

    ``models`` is any iterable of objects with ``name``, ``version``, ``spec`` and
    ``weights`` attributes (``engine.repository.LoadedModel`` fits).
    """

    def __init__(self, models: Any, device: str = "cpu") -> None:
        from recserve.engine.reference import ReferenceModel

        self._handles: dict[tuple[str, int], ModelHandle] = {}
        self._models: dict[tuple[str, int], ReferenceModel] = {}
        for loaded in models:
            key = (loaded.name, int(loaded.version))
            if key in self._handles:
                raise ValueError(f"model {key[0]!r} version {key[1]} is given twice")
            self._handles[key] = ModelHandle(loaded.name, key[1], loaded.spec)
            self._models[key] = ReferenceModel(loaded.spec, loaded.weights, device)
        # One worker: requests are scored one at a time in this first cut.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recserve-score")

    @classmethod
    def from_repository(cls, root: Any, device: str = "cpu") -> ReferenceBackend:
        """Load the highest version of every model in the repository at ``root``."""
        from recserve.engine.repository import ModelRepository

        repo = ModelRepository(root)
        return cls([repo.load(name, version) for name, version in repo.models()], device)

    def models(self) -> list[ModelHandle]:
        """Every model version being served, sorted by name then version."""
        return [self._handles[key] for key in sorted(self._handles)]

    def resolve(self, name: str, version: int | None) -> ModelHandle:
        """The version asked for (the highest served one when None); raises ``NotFound``."""
        return resolve_handle(self._handles, name, version)

    async def score(self, model: str, version: int, inputs: RequestInputs,
                    deadline: float | None = None,
                    priority: Priority = Priority.NORMAL) -> np.ndarray:
        """float32 scores, [N] for one output or [N, H] for H outputs (in arrival order:
        ``priority`` is ignored, one request at a time has no queue of its own)."""
        reference = self._reference(model, version)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _forward, reference, inputs,
                                          deadline)

    def submit(self, model: str, version: int, inputs: RequestInputs, deadline: float | None,
               on_done: Callable[[Any], None],
               on_release: Callable[[], None] | None = None,
               priority: Priority = Priority.NORMAL) -> Callable[[], object]:
        """``score`` without a task (see the module function ``submit``): the inputs are
        released when the scoring thread is done with them, even after a cancel."""
        reference = self._reference(model, version)
        loop = asyncio.get_running_loop()
        cancelled = False

        def settle(work: Future) -> None:  # on the loop
            if on_release is not None:
                on_release()
            if not cancelled and not work.cancelled():
                on_done(work.exception() or work.result())

        def cancel() -> None:
            nonlocal cancelled
            cancelled = True
            work.cancel()  # (a forward already running finishes, then releases)

        def finished(work: Future) -> None:  # on the scoring thread (or the cancelling one)
            try:
                loop.call_soon_threadsafe(settle, work)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        work = self._executor.submit(_forward, reference, inputs, deadline)
        work.add_done_callback(finished)
        return cancel

    def _reference(self, model: str, version: int) -> ReferenceModel:
        reference = self._models.get((model, version))
        if reference is None:
            raise NotFound(message=f"model {model!r} version {version} is not served here")
        return reference

    def stats(self) -> dict:
        """What the ``stats`` op reports under ``engine``."""
        return {"kind": "one_at_a_time", "models": len(self._models)}

    async def close(self) -> None:
        """Stop the worker thread (waiting for the request it is scoring)."""
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)


def _forward(model: ReferenceModel, inputs: RequestInputs, deadline: float | None) -> np.ndarray:
    if deadline is not None and time.monotonic() > deadline:
        # It waited in the queue past its deadline: skip the work nobody will read.
        raise DeadlineExceeded(message="deadline passed while queued")
    import torch

    batch = collate(model.spec, [inputs])
    with torch.inference_mode():
        scores = model.forward(batch).float().cpu().numpy()
    return scores[:, 0] if scores.shape[1] == 1 else scores


def submit(backend: Any, model: str, version: int, inputs: RequestInputs,
           deadline: float | None, on_done: Callable[[Any], None],
           on_release: Callable[[], None] | None = None,
           priority: Priority = Priority.NORMAL) -> Callable[[], object]:
    """Score in the background: ``on_done`` gets the scores or the exception, later, on the
    loop (never when cancelled). Returns the request's cancel function. Uses the
    backend's own ``submit`` when it has one (no task per request), else a task around
    ``score``. A refusal the backend knows at once may raise here instead.

    ``on_release`` (once, on the loop, answered or cancelled) says the backend reads
    ``inputs`` no more: see ``Engine.submit``. Around ``score`` that is when its task ends,
    so a backend whose ``score`` leaves a thread reading inputs after a cancel must have
    its own ``submit``, as ``ReferenceBackend`` does."""
    own = getattr(backend, "submit", None)
    if own is not None:
        return own(model, version, inputs, deadline, on_done, on_release, priority)
    task = asyncio.get_running_loop().create_task(backend.score(model, version, inputs,
                                                                deadline, priority))

    def finished(done: asyncio.Task) -> None:
        if on_release is not None:
            on_release()
        if not done.cancelled():
            on_done(done.exception() or done.result())

    task.add_done_callback(finished)
    return task.cancel


class EngineBackend:
    """The batching ``engine.Engine`` behind the Backend interface.

    The engine must be started; models are loaded into it with ``await load(...)`` (or
    ``engine.load``). Its ``EngineError`` codes are wire codes, raised here as the
    matching ``RecserveError`` subclasses. ``close`` closes the engine.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def load(self, loaded: Any) -> None:
        """Load one model (``name``, ``version``, ``spec``, ``weights``) into the engine."""
        await self._call(self.engine.load(loaded.name, int(loaded.version), loaded.spec,
                                          loaded.weights))

    def models(self) -> list[ModelHandle]:
        """Every model version being served, sorted by name then version."""
        return [ModelHandle(n, v, self.engine.spec(n, v)) for n, v in self.engine.models()]

    def resolve(self, name: str, version: int | None) -> ModelHandle:
        """The version asked for (the highest served one when None); raises ``NotFound``."""
        try:
            name, version = self.engine.resolve(name, version)
            return ModelHandle(name, version, self.engine.spec(name, version))
        except Exception as exc:
            raise _wire_error(exc) from None

    async def score(self, model: str, version: int, inputs: RequestInputs,
                    deadline: float | None = None,
                    priority: Priority = Priority.NORMAL) -> np.ndarray:
        """float32 scores, [N] for one output or [N, H] for H outputs."""
        return await self._call(self.engine.score(model, inputs, version=version,
                                                  deadline=deadline, priority=priority))

    def admits(self, rows: int, priority: Priority = Priority.NORMAL) -> bool:
        """Whether the engine's queue has room for ``rows`` more at ``priority`` now: the
        dispatcher asks before validating a request, so overload refuses work cheaply.
        (More rows than the whole bound: left to the engine, which says ``too_large``.)"""
        return rows > self.engine.settings.max_queued_rows or rows <= self.engine.room(priority)

    def submit(self, model: str, version: int, inputs: RequestInputs, deadline: float | None,
               on_done: Callable[[Any], None],
               on_release: Callable[[], None] | None = None,
               priority: Priority = Priority.NORMAL) -> Callable[[], object]:
        """``engine.submit`` with wire errors (see the module function ``submit``)."""
        def done(outcome: Any) -> None:
            on_done(_wire_error(outcome) if isinstance(outcome, Exception) else outcome)

        try:
            request_id = self.engine.submit(model, inputs, done, version=version,
                                            deadline=deadline, priority=priority,
                                            on_release=on_release)
        except Exception as exc:
            raise _wire_error(exc) from None
        return functools.partial(self.engine.cancel, request_id)

    def unload(self, name: str, version: int | None = None) -> None:
        """Stop serving ``name`` (one version, or all); its running work finishes first."""
        try:
            self.engine.unload(name, version)
        except Exception as exc:
            raise _wire_error(exc) from None

    def stats(self) -> dict:
        """Engine counters and queue depth, for the ``stats`` op (cheap: no device call)."""
        engine = self.engine
        return {"kind": "engine", **engine.stats(), "counters": dict(engine.counters),
                "queued_rows": engine.queued_rows, "pending_requests": engine.pending_requests,
                "models": [{"name": n, "version": v} for n, v in engine.models()]}

    async def close(self) -> None:
        """Close the engine (queued requests fail, running batches finish)."""
        await self.engine.close()

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except RecserveError:
            raise
        except Exception as exc:
            raise _wire_error(exc) from None


def _wire_error(exc: Exception) -> Exception:
    """An engine failure with a wire ``code`` as a RecserveError; anything else unchanged."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return RecserveError.from_code(code, getattr(exc, "message", str(exc)))
    return exc
