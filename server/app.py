"""The TCP server: binds, accepts connections up to a limit, drops stalled ones, drains on
shutdown and closes them all.

Graceful shutdown is ``drain`` then ``close``: draining stops accepting connections,
answers new requests on open connections ``overloaded`` (so clients retry elsewhere),
and waits until every request already accepted has been answered; ``close`` then closes
the backend (failing whatever a timed-out drain left queued, with an answer), flushes and
closes the connections.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .backend import Backend
from .config import ServerConfig
from .control import Control
from .dispatch import Dispatcher
from .errors import Overloaded
from .protocol import ReadBudget, ServerProtocol
from .stats import RequestHook, ServerStats

log = logging.getLogger("recserve.server")

FLUSH_S = 1.0  # on close: how long active connections get to take their last responses


def freeze_heap() -> None:
    """Hide every object alive now from the cyclic garbage collector: modules, models and
    their tables live as long as the process, yet each full collection would walk them all,
    stopping the event loop for tens of ms (59 ms with torch, Triton and recserve loaded, on
    the CI machine). Call once serving is set up; later objects are collected as usual."""
    gc.collect()
    gc.freeze()


class Server:
    """A recserve server for one backend; ``await start()``, then ``await close()``.

    ``repository`` is where admin ops load models from; ``monitor`` a started GpuMonitor
    for the ``stats`` op; ``on_request_done`` callbacks see every answered request as
    ``(model, op, code, seconds)`` (see ``stats.ServerStats``); ``reuse_port`` binds with
    SO_REUSEPORT (worker processes of the multi-core front end share the port).
    """

    def __init__(self, backend: Backend, config: ServerConfig | None = None, *,
                 repository: Path | None = None, monitor: Any = None,
                 on_request_done: Iterable[RequestHook] = (), reuse_port: bool = False) -> None:
        self.config = config or ServerConfig()
        self.backend = backend
        self.stats = ServerStats(list(on_request_done))
        self.dispatcher = Dispatcher(backend, self.config, self.stats)
        self.control = Control(self.dispatcher, repository, monitor).install()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[ServerProtocol] = set()
        self._overflow: set[ServerProtocol] = set()  # over the limit: one probe, then closed
        self._sweeper: asyncio.Task | None = None
        self.read_budget = ReadBudget(self.config.max_read_buffer_bytes)
        self._reuse_port = reuse_port  # several worker processes listen on one port

    async def start(self) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        limits = self.config.codec_limits
        self._server = await loop.create_server(
            lambda: self._connect(limits), self.config.host, self.config.port,
            reuse_port=self._reuse_port or None)
        self._sweeper = loop.create_task(self._sweep())
        host, port = self.address
        served = ", ".join(f"{h.name} v{h.version}" for h in self.backend.models())
        # Worker processes (reuse_port) share the engine process's port: it logs for them.
        log.log(logging.DEBUG if self._reuse_port else logging.INFO,
                "recserve listening on %s:%d, serving %s", host, port, served or "no models")

    def current_stats(self) -> dict:
        """What the ``stats`` op answers under ``stats`` (for exporters in this process)."""
        return self.control.snapshot()

    def mark_ready(self) -> None:
        """Every configured model is loaded and warmed: ``health`` may report ready."""
        self.control.not_ready = None

    def _connect(self, limits) -> ServerProtocol:
        refuse = None
        if len(self._connections) >= self.config.max_connections:
            refuse = Overloaded(message=f"{len(self._connections)} connections are open; the "
                                        f"limit is {self.config.max_connections}")
        protocol = ServerProtocol(self.dispatcher, limits,
                                  self.config.max_pending_per_connection,
                                  on_lost=self._lost, refuse=refuse,
                                  budget=self.read_budget)
        if refuse is None:
            self._connections.add(protocol)
            self.dispatcher.connections = len(self._connections)
        else:
            self._overflow.add(protocol)
        return protocol

    def _lost(self, protocol: ServerProtocol) -> None:
        self._connections.discard(protocol)
        self._overflow.discard(protocol)
        self.dispatcher.connections = len(self._connections)

    async def _sweep(self) -> None:
        """Drop connections stalled mid-frame or not reading, a few times per timeout."""
        config = self.config
        period = min(1.0, max(0.02, min(config.frame_timeout_s, config.write_timeout_s) / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for protocol in [*self._connections, *self._overflow]:
                reason = protocol.timed_out(now, config.frame_timeout_s, config.write_timeout_s)
                if reason is not None:
                    log.info("dropping a connection: %s", reason)
                    protocol.abort()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (the port is real even when the config said 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._connections)

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def drain(self, timeout: float) -> bool:
        """Stop accepting and wait up to ``timeout`` s for every accepted request to be
        answered; True when none is left."""
        self.dispatcher.draining = True
        if self._server is not None:
            self._server.close()
        try:
            await asyncio.wait_for(self.dispatcher.wait_idle(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop accepting, close the backend (answering what it still holds), flush and
        close every connection."""
        self.dispatcher.draining = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.backend.close()
        try:  # the requests the backend just refused still have to send their answers
            await asyncio.wait_for(self.dispatcher.wait_idle(), FLUSH_S)
        except TimeoutError:
            log.warning("%d requests still unanswered at close", self.dispatcher.active)
        for protocol in list(self._connections):
            protocol.finish()
        deadline = time.monotonic() + FLUSH_S
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for protocol in [*self._connections, *self._overflow]:  # not reading: give up
            protocol.abort()
        if self._server is not None:
            await self._server.wait_closed()
