"""The multi-core front end's engine process: worker processes parse, this one scores.

One event loop cannot decode and validate frames as fast as a GPU scores them. Measured with
bench/server.py on the demo model's ranking traffic (2-core machine, ``--device null`` so
nothing is scored): one process spends about 130 us of CPU per request (msgpack 5 us,
validation 60 us, asyncio and dispatch the rest) and tops out near 7-8k requests/s; with
worker processes the engine process spends about 50 us per request (the workers about
130 us each, in parallel), so its ceiling rises 2.5x where cores are free. ``Hub`` starts
W worker processes (``worker``): each is a complete recserve server listening with
SO_REUSEPORT on the same port, so the kernel spreads connections over them, and each
sends already-validated requests to this process through its own channel (a Unix socket
pair; ``channel`` has the layout), where the one engine batches requests from every
worker together. A request's arrays do not cross the socket: the worker writes them into
a shared-memory ring (``shared_ring``, ``ring_bytes`` per worker) and the frame says
where; this process stages them from there and tells the worker when the region may be
reused. Admin and stats ops are forwarded here; model tables and readiness are pushed to
the workers.

Limits are per worker (``max_connections`` and ``max_in_flight`` divided among them);
the engine's queue bound is global. Shutdown: ``drain`` tells every worker to drain
(each refuses new requests and answers the accepted ones, which this process keeps
scoring), waits for them to exit, then ``close`` closes the engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from recserve.engine.inputs import DeferredInputs
from recserve.engine.shared_memory import SharedInputs

from . import channel, shared_ring
from .backend import submit
from .config import ServerConfig
from .control import Control
from .dispatch import Dispatcher, Op, Request
from .engine_side import EngineSide
from .errors import InternalError, NotFound, Overloaded, RecserveError
from .shared_ring import DEFAULT_RING_BYTES, MIN_RING_BYTES
from .stats import merge_server_stats
from .worker_launch import launch, worker_config

log = logging.getLogger("recserve.server")
START_TIMEOUT_S = 60.0
RESPAWN_PAUSE_S = 1.0


class Hub:
    """The engine process of ``recserve serve --workers W``; same life cycle as ``Server``
    (``start``, ``mark_ready``, ``drain``, ``close``, ``current_stats``)."""

    def __init__(self, backend: Any, config: ServerConfig, workers: int, *,
                 repository: Path | None = None, monitor: Any = None,
                 log_level: str = "INFO", ring_bytes: int = DEFAULT_RING_BYTES,
                 defer_ring_decode: bool = False) -> None:
        if workers < 2:
            raise ValueError(f"Hub needs 2 or more workers, got {workers}")
        if ring_bytes and ring_bytes < MIN_RING_BYTES:
            raise ValueError(f"a worker's shared ring needs {MIN_RING_BYTES} bytes or more "
                             f"(or 0 for none), got {ring_bytes}")
        self.backend, self.config, self.workers = backend, config, workers
        # Ring requests as DeferredInputs: the backend's packing processes decode them
        # (serve --pack-in), so this loop does not (see ``score``).
        self.defer_ring_decode = defer_ring_decode
        self.ring_bytes = ring_bytes if shared_ring.supported() else 0
        self.dispatcher = Dispatcher(backend, config)  # admission-free: for Control only
        self.control = Control(self.dispatcher, repository, monitor).install()
        self.log_level = log_level
        self.sides: list[EngineSide] = []
        self.procs: list[subprocess.Popen] = []
        self.worker_stats: dict[int, dict] = {}
        self._specs: dict[tuple[str, int], Any] = {}  # every (name, version) ever pushed
        self.arrived = {"requests_via_ring": 0, "requests_via_socket": 0}
        self._reserve: socket.socket | None = None
        self.port = config.port

    async def start(self) -> None:
        """Reserve the port, start the workers, return once all of them listen."""
        family = socket.getaddrinfo(self.config.host, None, type=socket.SOCK_STREAM)[0][0]
        self._reserve = socket.socket(family, socket.SOCK_STREAM)
        self._reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._reserve.bind((self.config.host, self.config.port))  # bound, never listening
        self.port = self._reserve.getsockname()[1]
        for index in range(self.workers):
            await self._spawn(index)
        try:
            ok = await asyncio.wait_for(asyncio.gather(*(s.listening for s in self.sides)),
                                        START_TIMEOUT_S)
        except TimeoutError:
            ok = [False]
        if not all(ok):
            raise RuntimeError("a front-end worker process did not start")
        self.broadcast_models()
        log.info("recserve listening on %s:%d with %d worker processes", self.config.host,
                 self.port, self.workers)

    async def _spawn(self, index: int) -> None:
        config = worker_config(self.config, self.port, self.workers)
        proc, ours, ring = launch(config, self.log_level, self.ring_bytes)
        _, side = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: EngineSide(self, index, ring), ours)
        if index < len(self.sides):  # a replacement
            self.procs[index], self.sides[index] = proc, side
        else:
            self.procs.append(proc)
            self.sides.append(side)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the workers listen on."""
        return self.config.host, self.port

    def mark_ready(self) -> None:
        """Every configured model is loaded: tell the workers (their health turns ready)."""
        self.control.not_ready = None
        self.broadcast_models()

    def broadcast_models(self) -> None:
        """Push the served models (with specs) and readiness to every worker."""
        handles = self.backend.models()
        for h in handles:  # what workers may validate against, for _handle_for
            self._specs[(h.name, h.version)] = h.spec
        models = [{"name": h.name, "version": h.version, "spec": h.spec.to_json()}
                  for h in handles]
        message = channel.encode_control({"kind": "models", "models": models,
                                          "not_ready": self.control.not_ready})
        for side in self.sides:
            side.send(message)

    def current_stats(self) -> dict:
        """What the ``stats`` op answers: the workers' server counters merged, and how
        requests reached this process."""
        server = merge_server_stats(list(self.worker_stats.values()))
        server["workers"] = {"processes": self.workers, "ring_bytes": self.ring_bytes,
                             **self.arrived,
                             "ring_regions_held": sum(len(s.holding) for s in self.sides)}
        return self.control.snapshot(server)

    def score(self, side: EngineSide, view: memoryview) -> None:
        """A score request from a worker: hand it to the backend, reply when it is done
        (no task per request: see ``backend.submit``). A request whose arrays lie in the
        worker's ring keeps its region until the backend releases it (``side.release``)."""
        header = channel.score_header(view)
        rid = header.rid
        side.running[rid] = None  # (an answer given inside submit pops it: see below)
        self.arrived["requests_via_socket" if header.data_at is None
                     else "requests_via_ring"] += 1
        try:
            handle = self._handle_for(header)
            ring, shared = side.ring, None
            if header.data_at is not None and ring is not None:  # (else decode refuses it)
                shared = SharedInputs(ring, bytes(view), channel.decode_shared)
            if shared is not None and self.defer_ring_decode:
                inputs = DeferredInputs(header.candidates, shared, functools.partial(
                    channel.decode_inputs, memoryview(shared.payload), header, handle.spec,
                    ring.view, shared))  # (the copied payload: ``view`` is reused)
            else:
                inputs = channel.decode_inputs(view, header, handle.spec,
                                               None if ring is None else ring.view, shared)
            reply = functools.partial(self._reply, side, rid, handle.version)
            release = None
            if header.data_at is not None:
                side.holding.add(rid)
                release = functools.partial(side.release, rid)
            cancel = submit(self.backend, handle.name, handle.version, inputs,
                            header.deadline, reply, release, header.priority)
        except Exception as exc:  # refused at once, or the request is malformed
            side.holding.discard(rid)  # (the backend kept nothing)
            self._reply(side, rid, 0, exc)
            return
        if rid in side.running:  # not answered already (a deadline can pass inside submit)
            side.running[rid] = cancel

    def _reply(self, side: EngineSide, rid: int, version: int, outcome: object) -> None:
        """Send a request's scores or error back to its worker (saying whether its ring
        region is free: backends release before they answer when nothing holds it)."""
        side.running.pop(rid, None)
        released = rid not in side.holding
        if isinstance(outcome, np.ndarray):
            side.send_soon(channel.encode_reply(rid, outcome, version, released))
        elif isinstance(outcome, RecserveError):
            side.send_soon(channel.encode_error(rid, str(outcome.code), outcome.message,
                                                released))
        else:
            log.error("scoring a request from worker %d failed", side.index,
                      exc_info=outcome if isinstance(outcome, BaseException) else None)
            side.send_soon(channel.encode_error(rid, "internal",
                                                f"{type(outcome).__name__}: {outcome}",
                                                released))

    def _handle_for(self, header: channel.ScoreHeader):
        """The version to score: the one the worker validated against, or, when the client
        asked for the latest and a swap retired that one meanwhile, the new latest if its
        inputs are the same (else ``overloaded``: the worker's table is about to update)."""
        try:
            return self.backend.resolve(header.name, header.version)
        except NotFound:
            if header.pinned:
                raise
        latest = self.backend.resolve(header.name, None)
        if self._specs.get((header.name, header.version)) != latest.spec:
            raise Overloaded(message=f"model {header.name!r} changed its inputs while the "
                                     "request was on its way; retry") from None
        return latest

    def on_control(self, side: EngineSide, message: dict) -> None:
        """A control message from a worker."""
        kind = message["kind"]
        if kind == "cancel":  # the worker's client went away: nobody to answer
            cancel = side.running.pop(message["rid"], None)
            if cancel is not None:
                cancel()  # (the region, if any, is freed by an F once released)
        elif kind == "stats":
            self.worker_stats[side.index] = message["server"]
        elif kind == "op":
            self.worker_stats[side.index] = message["server"]
            asyncio.get_running_loop().create_task(self._op(side, message))
        elif kind == "listening" and not side.listening.done():
            side.listening.set_result(True)

    async def _op(self, side: EngineSide, message: dict) -> None:
        request, rid = message["message"], message["rid"]
        op = Op(request["op"])
        try:
            if op is Op.STATS:
                body = {"stats": self.current_stats()}
            else:
                record = Request(op.value, time.perf_counter())
                try:
                    body = await self.dispatcher.tasks[op](request, record)
                finally:
                    self.broadcast_models()  # before the reply: the caller sees the change
                body["_model"] = record.model
            reply = {"kind": "reply", "rid": rid, "body": body}
        except RecserveError as exc:
            reply = {"kind": "reply", "rid": rid,
                     "error": {"code": str(exc.code), "message": exc.message}}
        except Exception as exc:
            log.exception("op %s from worker %d failed", op.value, side.index)
            error = InternalError(message=f"{type(exc).__name__}: {exc}")
            reply = {"kind": "reply", "rid": rid,
                     "error": {"code": str(error.code), "message": error.message}}
        side.send(channel.encode_control(reply))

    def lost(self, side: EngineSide) -> None:
        """A worker's channel closed: drop its work (its clients are gone with it)."""
        running, side.running = side.running, {}
        for cancel in running.values():
            if cancel is not None:
                cancel()
        self.worker_stats.pop(side.index, None)
        if not self.dispatcher.draining and self.sides[side.index] is side:
            log.error("front-end worker %d exited unexpectedly; starting another",
                      side.index)
            asyncio.get_running_loop().create_task(self._respawn(side.index))

    async def _respawn(self, index: int) -> None:
        """Replace a crashed worker (after a pause, so a worker that crashes at start
        cannot spin the machine)."""
        await asyncio.to_thread(self.procs[index].wait)
        await asyncio.sleep(RESPAWN_PAUSE_S)
        if self.dispatcher.draining:
            return
        await self._spawn(index)
        if await self.sides[index].listening:
            self.broadcast_models()
            log.info("front-end worker %d restarted", index)

    async def drain(self, timeout: float) -> bool:
        """Tell every worker to drain; True once all have exited within ``timeout``."""
        self.dispatcher.draining = True
        drain = channel.encode_control({"kind": "drain"})
        for side in self.sides:
            side.send(drain)
        try:
            await asyncio.wait_for(asyncio.gather(*(s.closed for s in self.sides)),
                                   timeout + 2.0)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the workers (killing any still running), close the engine."""
        self.dispatcher.draining = True
        for side in self.sides:
            side.close()
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        await self.backend.close()
        if self._reserve is not None:
            self._reserve.close()
