"""Requests to responses: the op tables, envelope checks, typed errors, ids to futures.

``Dispatcher`` is shared by all connections (it holds the backend, the server-wide
admission count and the request stats); ``Session`` is one connection's view: it
starts a task per request, remembers id -> task while the request is in flight, and
hands each response to a ``send`` callback as soon as it is ready, in whatever order
they finish. The data-plane ops (ping, models, infer) are here (infer's body in
``infer``); ``control`` adds the control plane (health, stats, load, unload, reload).
Nothing here touches sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

from recserve.engine import VERSION

from .backend import Backend, ModelHandle
from .config import ServerConfig
from .errors import BadRequest, InternalError, Overloaded, RecserveError
from .infer import infer
from .stats import ServerStats

log = logging.getLogger("recserve.server")

PROTOCOL_VERSION = 1
MAX_ID = (1 << 64) - 1


class Op(StrEnum):
    """Every op of protocol v1."""

    PING = "ping"
    MODELS = "models"
    INFER = "infer"
    HEALTH = "health"
    STATS = "stats"
    LOAD = "load"
    UNLOAD = "unload"
    RELOAD = "reload"


_NONE: frozenset[str] = frozenset()
_KEYS: dict[Op, tuple[frozenset[str], frozenset[str]]] = {
    # op: (required keys, optional keys) besides id and op
    Op.PING: (_NONE, _NONE),
    Op.MODELS: (_NONE, _NONE),
    Op.INFER: (frozenset({"model", "candidates", "inputs"}),
               frozenset({"version", "deadline_ms", "priority"})),
    Op.HEALTH: (_NONE, _NONE),
    Op.STATS: (_NONE, _NONE),
    # admin ops: a missing token is answered unauthorized (by the op), not bad_request
    Op.LOAD: (frozenset({"model"}), frozenset({"token", "version"})),
    Op.UNLOAD: (frozenset({"model"}), frozenset({"token", "version"})),
    Op.RELOAD: (frozenset({"model"}), frozenset({"token"})),
}


class Request:
    """What the stats need to know about one request while it is handled."""

    __slots__ = ("op", "model", "priority", "started")

    def __init__(self, op: str, started: float) -> None:
        self.op = op
        self.model = ""
        """Set by a handler once it has resolved a served model (a bounded label)."""
        self.priority = ""
        """Set by ``infer`` once the request's priority is read (high, normal or low)."""
        self.started = started


Handler = Callable[[dict, Request], Awaitable[dict]]


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
    except (ValueError, TypeError):
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

    def __init__(self, backend: Backend, config: ServerConfig,
                 stats: ServerStats | None = None) -> None:
        self.backend = backend
        self.config = config
        self.stats = stats or ServerStats()
        self.in_flight = 0
        """Requests being handled over all connections (admission count)."""
        self.background = 0
        """Control-plane ops running as tasks (not admitted, still waited for on drain)."""
        self.connections = 0
        """Open connections (kept by the server)."""
        self.draining = False
        """Set on graceful shutdown: new admitted and background ops are refused."""
        self._idle: asyncio.Event | None = None
        self.immediate: dict[Op, Callable[[dict], dict]] = {
            Op.PING: self.ping, Op.MODELS: self.models}
        """Ops answered at once on the event loop: cheap, never admitted or queued."""
        self.admitted: dict[Op, Handler] = {Op.INFER: self.infer}
        """Ops run as tasks, each holding an admission slot until it is answered."""
        self.tasks: dict[Op, Handler] = {}
        """Ops run as tasks without an admission slot (model loads: slow and rare)."""

    @property
    def active(self) -> int:
        """Admitted and background requests not yet answered."""
        return self.in_flight + self.background

    def hold(self, admitted: bool, delta: int) -> None:
        """Take (+1) or give back (-1) an admission slot, or a background count."""
        if admitted:
            self.in_flight += delta
        else:
            self.background += delta
        if self._idle is not None and self.active == 0:
            self._idle.set()  # wakes wait_idle

    def server_stats(self) -> dict:
        """The ``server`` part of a ``stats`` answer: connections, in flight, request stats."""
        return {"connections": self.connections, "in_flight": self.in_flight,
                **self.stats.to_dict()}

    async def wait_idle(self) -> None:
        """Return once no admitted or background request is left."""
        while self.active:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def ping(self, message: dict) -> dict:
        """Body of a ping response."""
        return {"protocol": PROTOCOL_VERSION, "server": f"recserve {VERSION}"}

    def models(self, message: dict) -> dict:
        """Body of a models response: every served model and the server's limits."""
        return {"models": [describe_model(h) for h in self.backend.models()],
                "limits": {"max_candidates": self.config.max_candidates,
                           "max_frame_bytes": self.config.max_frame_bytes}}

    async def infer(self, message: dict, request: Request) -> dict:
        """Body of an infer response; raises RecserveError for a request it refuses."""
        return await infer(self.backend, self.config, self.stats, message, request)


def describe_model(handle: ModelHandle) -> dict:
    """A model's inputs and outputs as the ``models`` op reports them."""
    spec = handle.spec
    inputs = []
    for f in spec.sparse:
        table = spec.table(f.table)
        ids = "i4" if table.rows <= 2**31 - 1 else "i8"  # what the engine stages them as
        inputs.append({"name": f.name, "kind": "sparse", "scope": f.scope, "dtype": ids,
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
        self._held: dict[asyncio.Task, bool] = {}  # task -> holds an admission slot (else a
        # background count)

    @property
    def pending(self) -> int:
        """Requests accepted on this connection and not yet answered."""
        return len(self._tasks)

    def reject(self, error: RecserveError) -> None:
        """Answer a frame that could not even be read as a request (id nil)."""
        self._answer(error_response(None, error), Request("", time.perf_counter()))

    def submit(self, message: dict) -> None:
        """Handle one decoded request; its response is sent now or when its task ends."""
        request = Request("", time.perf_counter())
        try:
            rid = parse_id(message)
        except RecserveError as exc:
            self._answer(error_response(None, exc), request)
            return
        try:
            op = parse_op(message)
            request.op = op.value
            if rid in self._tasks:
                raise BadRequest(message=f"id {rid} is already in flight on this connection")
            handler = self._dispatcher.immediate.get(op)
            if handler is not None:
                self._answer(ok_response(rid, handler(message)), request)
            else:
                self._start(rid, op, message, request)
        except RecserveError as exc:
            self._answer(error_response(rid, exc), request)

    def _start(self, rid: int, op: Op, message: dict, request: Request) -> None:
        dispatcher = self._dispatcher
        if dispatcher.draining and op is not Op.STATS:  # stats run as a task in a worker
            raise Overloaded(message="the server is shutting down; retry on another replica")
        admitted = op in dispatcher.admitted
        if admitted and dispatcher.in_flight >= dispatcher.config.max_in_flight:
            raise Overloaded(message=f"{dispatcher.in_flight} requests in flight; the limit "
                                     f"is {dispatcher.config.max_in_flight}")
        handler = dispatcher.admitted[op] if admitted else dispatcher.tasks.get(op)
        if handler is None:
            raise BadRequest(message=f"op {op.value} is not served by this server")
        dispatcher.hold(admitted, +1)
        task = asyncio.get_running_loop().create_task(self._run(rid, handler, message, request))
        self._tasks[rid] = task
        self._held[task] = admitted
        # Also on done: a task cancelled before its first step never runs its body.
        task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task) -> None:
        """Give back the task's admission (or background) count, once."""
        admitted = self._held.pop(task, None)
        if admitted is not None:
            self._dispatcher.hold(admitted, -1)

    async def _run(self, rid: int, handler: Handler, message: dict, request: Request) -> None:
        try:
            response = ok_response(rid, await handler(message, request))
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
        self._answer(response, request)

    def _answer(self, response: dict, request: Request) -> None:
        error = response.get("error")
        code = error["code"] if error else "ok"
        self._dispatcher.stats.record(request.model, request.op, code,
                                      time.perf_counter() - request.started, request.priority)
        self._send(response)

    def close(self) -> None:
        """Cancel every request still in flight (the connection is gone)."""
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()
