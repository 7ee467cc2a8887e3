"""A front-end worker process of the multi-core server (started by ``hub``, never by hand).

It is a full recserve server (codec, protocol, dispatch, validation, limits, health,
timeouts, drain) listening with SO_REUSEPORT beside its sibling workers, over a
``RemoteBackend``: validated requests go to the engine process through a channel (a Unix
socket inherited at spawn; ``channel`` has the message layout), admin and stats ops are
forwarded there too, and the model table and readiness come back as pushes. Workers
ignore SIGINT/SIGTERM: the engine process tells them when to drain, and a worker whose
channel ends (the engine process died) exits at once.

    python -m recserve.server.worker '<json settings>'   # the hub's command line
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

import numpy as np

from recserve.engine.scheduler import Priority
from recserve.engine.spec import ModelSpec

from . import channel, shared_ring
from .backend import ModelHandle, resolve_handle
from .channel_end import ChannelEnd
from .config import ServerConfig
from .dispatch import Op, Request
from .errors import InternalError, NotFound, RecserveError
from .shared_ring import SharedRing

log = logging.getLogger("recserve.server")
STATS_PUSH_S = 0.5  # how stale the merged request counts may be in another worker's stats


class Channel(ChannelEnd):
    """The worker's end of its channel: requests out, replies and pushes in."""

    def __init__(self, backend: RemoteBackend) -> None:
        super().__init__()
        self.backend = backend

    def on_frame(self, view: memoryview) -> None:
        kind = view[:1]
        if kind == b"R":
            self.backend.on_reply(channel.decode_reply(view))
        elif kind == b"F":
            self.backend.free(channel.decode_free(view))
        else:
            self.backend.on_control(channel.decode_control(view))

    def connection_lost(self, exc) -> None:
        self.backend.on_lost()
        if not self.closed.done():
            self.closed.set_result(None)


class RemoteBackend:
    """The Backend interface over the channel to the engine process; a request's arrays go
    into ``ring`` (shared with the engine process) when it has room, and their region is
    freed when the engine process says it reads them no more."""

    def __init__(self, ring: SharedRing | None = None) -> None:
        self.ring = ring
        self.ring_full = 0
        """Requests sent in the frame because the ring had no room."""
        self._regions: dict[int, int] = {}  # rid -> start of its ring region
        self.channel: Channel | None = None
        self.server: Any = None  # the worker's Server, for pushes (readiness)
        self.on_drain: Any = None  # called when the engine process says drain
        self._handles: dict[tuple[str, int], ModelHandle] = {}
        self._futures: dict[int, asyncio.Future] = {}
        self._next = 0

    def models(self) -> list[ModelHandle]:
        """Every served model version (as last pushed), sorted by name then version."""
        return [self._handles[k] for k in sorted(self._handles)]

    def resolve(self, name: str, version: int | None) -> ModelHandle:
        """The version asked for (the highest served one when None); raises ``NotFound``."""
        return resolve_handle(self._handles, name, version)

    async def score(self, model: str, version: int, inputs, deadline: float | None = None,
                    priority: Priority = Priority.NORMAL):
        """Scores from the engine process; a cancelled call cancels the engine's work."""
        handle = self._handles.get((model, version))
        if handle is None:  # unloaded since the request was validated
            raise NotFound(message=f"model {model!r} version {version} is not served here")
        return (await self.score_request(handle, inputs, deadline, priority=priority))[0]

    async def score_request(self, handle: ModelHandle, inputs, deadline: float | None,
                            pinned: bool = True,
                            priority: Priority = Priority.NORMAL) -> tuple[np.ndarray, int]:
        """(scores, version that scored). Unpinned (the client asked for the latest), the
        engine process may score a newer version with the same inputs: this worker's model
        table can trail a swap by a moment, and that must not fail the request."""
        return await self._ask(self._encode_score, handle, inputs, deadline, pinned, priority)

    def _encode_score(self, rid: int, handle: ModelHandle, inputs, deadline: float | None,
                      pinned: bool, priority: Priority) -> bytes:
        data, data_at = channel.encode_score(rid, handle.name, handle.version, inputs,
                                             deadline, handle.spec, pinned, self.ring,
                                             priority)
        if data_at is not None:
            self._regions[rid] = data_at
        elif self.ring is not None:
            self.ring_full += 1
            if self.ring_full == 1:
                log.warning("worker %d: its shared ring (%d MiB) is full; requests travel "
                            "through the socket instead (slower) until it has room: raise "
                            "--worker-ring-mb", os.getpid(), self.ring.capacity >> 20)
        return data

    def free(self, rid: int) -> None:
        """The engine process reads request ``rid``'s ring region no more."""
        start = self._regions.pop(rid, None)
        if start is not None:
            self.ring.free(start)

    async def control(self, message: dict) -> dict:
        """Send a control request to the engine process and await its reply."""
        return await self._ask(lambda rid: channel.encode_control({**message, "rid": rid}))

    async def _ask(self, encode, *args) -> Any:
        if self.channel is None:
            raise InternalError(message="the engine process is gone")
        self._next += 1
        rid = self._next
        future = asyncio.get_running_loop().create_future()
        self._futures[rid] = future
        self.channel.send_soon(encode(rid, *args))  # (one write for a loop turn's requests)
        try:
            return await future
        except asyncio.CancelledError:
            if self.channel is not None:
                self.channel.send_soon(channel.encode_control({"kind": "cancel", "rid": rid}))
            raise
        finally:
            self._futures.pop(rid, None)

    def on_reply(self, reply: channel.Reply) -> None:
        if reply.released:
            self.free(reply.rid)
        future = self._futures.get(reply.rid)
        if future is None or future.done():
            return
        if reply.error is not None:
            error = reply.error
            future.set_exception(RecserveError.from_code(error["code"], error["message"]))
        else:
            future.set_result((reply.scores, reply.version))

    def on_control(self, message: dict) -> None:
        kind = message["kind"]
        if kind == "reply":
            future = self._futures.get(message["rid"])
            if future is not None and not future.done():
                if message.get("error"):
                    error = message["error"]
                    future.set_exception(RecserveError.from_code(error["code"],
                                                                 error["message"]))
                else:
                    future.set_result(message["body"])
        elif kind == "models":
            self._handles = {(m["name"], m["version"]): ModelHandle(
                m["name"], m["version"], ModelSpec.from_json(m["spec"]))
                for m in message["models"]}
            self.server.control.not_ready = message["not_ready"]
        elif kind == "drain" and self.on_drain is not None:
            self.on_drain()

    def on_lost(self) -> None:
        self.channel = None
        for future in self._futures.values():
            if not future.done():
                future.set_exception(InternalError(message="the engine process is gone"))

    async def close(self) -> None:
        """Nothing to release: the engine belongs to the engine process."""


def _forward(backend: RemoteBackend):
    """A handler running an op in the engine process (this worker's fresh stats go along,
    so a ``stats`` answer counts this worker's requests up to now)."""
    async def handler(message: dict, request: Request) -> dict:
        body = await backend.control({"kind": "op", "message": message,
                                      "server": backend.server.dispatcher.server_stats()})
        request.model = body.pop("_model", "")
        return body
    return handler


async def run(settings: dict) -> int:
    """The worker's life: connect the channel, listen, serve until drained or orphaned."""
    from .app import Server, freeze_heap

    loop = asyncio.get_running_loop()
    ring = None
    if settings.get("ring_fd") is not None:
        ring = SharedRing(shared_ring.map_memory(settings["ring_fd"], settings["ring_bytes"],
                                                 writable=True))
        os.close(settings["ring_fd"])
    backend = RemoteBackend(ring)
    sock = socket.socket(fileno=settings["channel_fd"])
    _, chan = await loop.connect_accepted_socket(lambda: Channel(backend), sock)
    backend.channel = chan
    config = ServerConfig(**settings["config"])
    server = Server(backend, config, reuse_port=True)
    backend.server = server
    for op in (Op.LOAD, Op.UNLOAD, Op.RELOAD, Op.STATS):
        server.dispatcher.immediate.pop(op, None)
        server.dispatcher.tasks[op] = _forward(backend)
    backend.on_drain = lambda: loop.create_task(_drain(server, chan, config.drain_s))
    await server.start()
    freeze_heap()
    chan.send(channel.encode_control({"kind": "listening", "pid": os.getpid()}))
    pusher = loop.create_task(_push_stats(server, chan))
    await chan.closed
    pusher.cancel()
    if not server.dispatcher.draining:  # orphaned: the engine process died
        log.error("worker %d: the engine process is gone; exiting", os.getpid())
        return 1
    return 0


async def _drain(server, chan: Channel, seconds: float) -> None:
    await server.drain(seconds)
    await server.close()
    chan.send(channel.encode_control({"kind": "drained"}))
    chan.close()


async def _push_stats(server, chan: Channel) -> None:
    while True:
        stats = server.dispatcher.server_stats()
        chan.send(channel.encode_control({"kind": "stats", "server": stats}))
        await asyncio.sleep(STATS_PUSH_S)


def main() -> int:
    """Entry point: ``python -m recserve.server.worker SETTINGS_JSON``."""
    settings = json.loads(sys.argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM):  # the engine process decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=settings.get("log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    import uvloop

    return uvloop.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
