"""The ``infer`` op: its arguments, the engine's admission asked before validation, the
inputs validated, scores awaited under the request's deadline and checked for shape."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from recserve.engine.scheduler import Priority

from .backend import Backend
from .config import ServerConfig
from .errors import BadRequest, DeadlineExceeded, InternalError, Overloaded
from .stats import ServerStats
from .validate import validate_inputs

MAX_DEADLINE_MS = 3_600_000
PRIORITIES = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}
"""``priority`` on the wire -> the engine's level (queued high rows are batched first)."""


async def infer(backend: Backend, config: ServerConfig, stats: ServerStats, message: dict,
                request: Any) -> dict:
    """Body of an infer response; raises RecserveError for a request it refuses.
    ``request`` (the dispatcher's record of it) learns its model and priority."""
    name, version = message["model"], message.get("version")
    if not isinstance(name, str):
        raise BadRequest(message=f"model is {name!r}; expected a model name (str)")
    if version is not None and (type(version) is not int or version < 0):
        raise BadRequest(message=f"version is {version!r}; expected a non-negative int")
    timeout = _deadline(message.get("deadline_ms"))
    priority = _priority(message.get("priority"))
    request.priority = priority.name.lower()
    handle = backend.resolve(name, version)
    request.model = handle.name
    candidates = message["candidates"]
    _check_room(backend, config, candidates, priority)
    try:
        inputs = validate_inputs(handle.spec, candidates, message["inputs"],
                                 config.max_candidates)
    except BadRequest as exc:
        invalid = getattr(exc, "invalid_ids", None)
        if invalid is not None:  # (feature, count): ids outside their table
            stats.invalid_ids[invalid[0]] += invalid[1]
        raise
    deadline = None if timeout is None else time.monotonic() + timeout
    version = handle.version
    try:
        # The backend gets the deadline to drop expired work; the timeout guarantees the
        # answer even from a backend that ignores it. Awaited in this task (no new task),
        # so the backend sees the request in the same step as the resolve above: a model
        # swapped meanwhile cannot retire the resolved version under it.
        async with asyncio.timeout(timeout):
            remote = getattr(backend, "score_request", None)
            if remote is not None:  # a backend that may score a newer version
                scores, version = await remote(handle, inputs, deadline,
                                               pinned=message.get("version") is not None,
                                               priority=priority)
            else:
                scores = await backend.score(handle.name, version, inputs, deadline, priority)
    except TimeoutError:
        raise DeadlineExceeded(message=f"not scored within deadline_ms="
                                       f"{message['deadline_ms']}") from None
    expected = (inputs.num_candidates,) if len(handle.spec.outputs) == 1 else (
        inputs.num_candidates, len(handle.spec.outputs))
    if tuple(scores.shape) != expected:
        # A backend bug; refuse to send scores that cannot be matched to candidates.
        raise InternalError(message=f"backend returned scores of shape "
                                    f"{list(scores.shape)}; expected {list(expected)}")
    return {"model": handle.name, "version": version,
            "scores": scores.astype("float32", copy=False)}


def _check_room(backend: Backend, config: ServerConfig, candidates: object,
                priority: Priority) -> None:
    """Refuse a request the engine's queue has no room for before its inputs are read: in
    overload, every refusal that costs a full validation is CPU the engine's batches do
    not get (bench/RESULTS.md). Malformed ``candidates`` are left to validation."""
    admits = getattr(backend, "admits", None)
    if (admits is not None and type(candidates) is int
            and 0 < candidates <= config.max_candidates and not admits(candidates, priority)):
        raise Overloaded(message=f"the engine's queue has no room for {candidates} rows at "
                                 f"{priority.name.lower()} priority; retry later")


def _deadline(value: object) -> float | None:
    if value is None:
        return None
    if (type(value) not in (int, float) or not math.isfinite(value)
            or not 0 < value <= MAX_DEADLINE_MS):
        raise BadRequest(message=f"deadline_ms is {value!r}; expected a number of "
                                 f"milliseconds in (0, {MAX_DEADLINE_MS}]")
    return value / 1000.0


def _priority(value: object) -> Priority:
    if value is None:
        return Priority.NORMAL
    level = PRIORITIES.get(value) if isinstance(value, str) else None
    if level is None:
        raise BadRequest(message=f"priority is {value!r}; expected one of "
                                 f"{sorted(PRIORITIES, key=PRIORITIES.get)}")
    return level
