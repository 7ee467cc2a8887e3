"""Requests to responses: the op table, envelope checks, typed errors, ids to futures.

``Dispatcher`` is shared by all connections (it holds the backend and the server-wide
admission count); ``Session`` is one connection's view: it starts a task per
request, remembers id -> task while the request is in flight, and hands each
response to a ``send`` callback as soon as it is ready, in whatever order they finish.
Nothing here touches sockets or bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

from recserve.engine import VERSION

from .backend import Backend, ModelHandle
from .config import ServerConfig
from .errors import BadRequest, DeadlineExceeded, InternalError, Overloaded, RecserveError
from .validate import validate_inputs

log = logging.getLogger("recserve.server")

PROTOCOL_VERSION = 1
MAX_ID = (1 << 64) - 1
MAX_DEADLINE_MS = 3_600_000


class Op(StrEnum):
    """Every op of protocol v1."""

    PING = "ping"
    MODELS = "models"
    INFER = "infer"


_KEYS: dict[Op, tuple[frozenset[str], frozenset[str]]] = {
    # op: (required keys, optional keys) besides id and op
    Op.PING: (frozenset(), frozenset()),
    Op.MODELS: (frozenset(), frozenset()),
    Op.INFER: (frozenset({"model", "candidates", "inputs"}),
               frozenset({"version", "deadline_ms"})),
}


def ok_response(request_id: int | None, body: dict) -> dict:
    """A success response carrying ``body``'s keys."""
    return {"id": request_id, "ok": True, **body}


def error_response(request_id: int | None, error: RecserveError) -> dict:
    """An error response for ``error``."""
    return {"id": request_id, "ok": False,
            "error": {"code": str(error.code), "message": error.message}}


def parse_id(message: dict) -> int:
    """The request's id (an unsigned 64-bit int); ``BadRequest`` when absent or invalid."""
    if "id" not in message:
        raise BadRequest(message="request has no id; every request needs an unsigned int id")
    rid = message["id"]
    if type(rid) is not int or not 0 <= rid <= MAX_ID:
        raise BadRequest(message=f"request id is {rid!r}; expected an unsigned 64-bit int")
    return rid


def parse_op(message: dict) -> Op:
    """The request's op, after checking its keys; ``BadRequest`` otherwise."""
    name = message.get("op")
    try:
        op = Op(name)
    except ValueError:
        known = ", ".join(o.value for o in Op)
        raise BadRequest(message=f"unknown op {name!r}; ops are {known}") from None
    required, optional = _KEYS[op]
    present = set(message) - {"id", "op"}
    missing = sorted(required - present)
    extra = sorted(str(k) for k in present - required - optional)
    if missing or extra:
        raise BadRequest(message=f"op {op.value}: missing keys {missing}, unknown keys "
                                 f"{extra}; it takes {sorted(required | optional)}")
    return op


class Dispatcher:
    """Runs ops against a backend; shared by every connection of one server."""

    def __init__(self, backend: Backend, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.in_flight = 0
        """Requests being handled over all connections (admission count)."""
        self.immediate: dict[Op, Callable[[dict], dict]] = {
            Op.PING: self.ping, Op.MODELS: self.models}
        """Ops answered at once on the event loop: cheap, never admitted or queued."""
        self.admitted: dict[Op, Callable[[dict], Awaitable[dict]]] = {Op.INFER: self.infer}
        """Ops run as tasks, each holding an admission slot until it is answered."""

    def ping(self, message: dict) -> dict:
        """Body of a ping response."""
        return {"protocol": PROTOCOL_VERSION, "server": f"recserve {VERSION}"}

    def models(self, message: dict) -> dict:
        """Body of a models response: every served model and the server's limits."""
        return {"models": [describe_model(h) for h in self.backend.models()],
                "limits": {"max_candidates": self.config.max_candidates,
                           "max_frame_bytes": self.config.max_frame_bytes}}

    async def infer(self, message: dict) -> dict:
        """Body of an infer response; raises RecserveError for a request it refuses."""
        name, version = message["model"], message.get("version")
        if not isinstance(name, str):
            raise BadRequest(message=f"model is {name!r}; expected a model name (str)")
        if version is not None and (type(version) is not int or version < 0):
            raise BadRequest(message=f"version is {version!r}; expected a non-negative int")
        timeout = _deadline(message.get("deadline_ms"))
        handle = self.backend.resolve(name, version)
        inputs = validate_inputs(handle.spec, message["candidates"], message["inputs"],
                                 self.config.max_candidates)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # The backend gets the deadline to drop expired work; wait_for guarantees
            # the answer even from a backend that ignores it.
            scores = await asyncio.wait_for(
                self.backend.score(handle.name, handle.version, inputs, deadline), timeout)
        except TimeoutError:
            raise DeadlineExceeded(message=f"not scored within deadline_ms="
                                           f"{message['deadline_ms']}") from None
        expected = (inputs.num_candidates,) if len(handle.spec.outputs) == 1 else (
            inputs.num_candidates, len(handle.spec.outputs))
        if tuple(scores.shape) != expected:
            # A backend bug; refuse to send scores that cannot be matched to candidates.
            raise InternalError(message=f"backend returned scores of shape "
                                        f"{list(scores.shape)}; expected {list(expected)}")
        return {"model": handle.name, "version": handle.version,
                "scores": scores.astype("float32", copy=False)}


def _deadline(value: object) -> float | None:
    if value is None:
        return None
    if (type(value) not in (int, float) or not math.isfinite(value)
            or not 0 < value <= MAX_DEADLINE_MS):
        raise BadRequest(message=f"deadline_ms is {value!r}; expected a number of "
                                 f"milliseconds in (0, {MAX_DEADLINE_MS}]")
    return value / 1000.0


def describe_model(handle: ModelHandle) -> dict:
    """A model's inputs and outputs as the ``models`` op reports them."""
    spec = handle.spec
    inputs = []
    for f in spec.sparse:
        table = spec.table(f.table)
        inputs.append({"name": f.name, "kind": "sparse", "scope": f.scope, "dtype": "i8",
                       "table": table.name, "rows": table.rows, "max_bag": f.max_bag,
                       "pooling": f.pooling, "weighted": f.weighted})
    for f in spec.dense:
        inputs.append({"name": f.name, "kind": "dense", "scope": f.scope, "dtype": "f4",
                       "dim": f.dim})
    outputs = [{"name": o.name, "activation": o.activation} for o in spec.outputs]
    return {"name": handle.name, "version": handle.version, "inputs": inputs,
            "outputs": outputs}


class Session:
    """One connection's requests: id -> in-flight task; responses go to ``send``."""

    def __init__(self, dispatcher: Dispatcher, send: Callable[[dict], None]) -> None:
        self._dispatcher = dispatcher
        self._send = send
        self._tasks: dict[int, asyncio.Task] = {}
        self._admitted: set[asyncio.Task] = set()  # tasks holding a server-wide slot

    @property
    def pending(self) -> int:
        """Requests accepted on this connection and not yet answered."""
        return len(self._tasks)

    def submit(self, message: dict) -> None:
        """Handle one decoded request; its response is sent now or when its task ends."""
        try:
            rid = parse_id(message)
        except RecserveError as exc:
            self._send(error_response(None, exc))
            return
        try:
            op = parse_op(message)
            if rid in self._tasks:
                raise BadRequest(message=f"id {rid} is already in flight on this connection")
            handler = self._dispatcher.immediate.get(op)
            if handler is not None:
                self._send(ok_response(rid, handler(message)))
            else:
                self._start(rid, op, message)
        except RecserveError as exc:
            self._send(error_response(rid, exc))

    def _start(self, rid: int, op: Op, message: dict) -> None:
        dispatcher = self._dispatcher
        if dispatcher.in_flight >= dispatcher.config.max_in_flight:
            raise Overloaded(message=f"{dispatcher.in_flight} requests in flight; the limit "
                                     f"is {dispatcher.config.max_in_flight}")
        dispatcher.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(rid, op, message))
        self._tasks[rid] = task
        self._admitted.add(task)
        # Also on done: a task cancelled before its first step never runs its body.
        task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task) -> None:
        """Give back the task's admission slot, once."""
        if task in self._admitted:
            self._admitted.discard(task)
            self._dispatcher.in_flight -= 1

    async def _run(self, rid: int, op: Op, message: dict) -> None:
        try:
            response = ok_response(rid, await self._dispatcher.admitted[op](message))
        except RecserveError as exc:
            response = error_response(rid, exc)
        except Exception as exc:
            log.exception("request %d failed", rid)
            response = error_response(rid, InternalError(
                message=f"{type(exc).__name__}: {exc}"))
        # Release before sending: a client may send its next request the moment it has
        # this response, and must find both counts already lowered.
        del self._tasks[rid]
        task = asyncio.current_task()
        if task is not None:
            self._release(task)
        self._send(response)

    def close(self) -> None:
        """Cancel every request still in flight (the connection is gone)."""
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
