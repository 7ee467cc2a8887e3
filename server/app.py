"""The TCP server: binds, accepts connections, and closes them all on shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

from .backend import Backend
from .config import ServerConfig
from .dispatch import Dispatcher
from .protocol import ServerProtocol

log = logging.getLogger("recserve.server")


class Server:
    """A recserve server for one backend; ``await start()``, then ``await close()``."""

    def __init__(self, backend: Backend, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.backend = backend
        self.dispatcher = Dispatcher(backend, self.config)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[ServerProtocol] = set()

    async def start(self) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        limits = self.config.codec_limits
        self._server = await loop.create_server(
            lambda: self._connect(limits), self.config.host, self.config.port)
        host, port = self.address
        served = ", ".join(f"{h.name} v{h.version}" for h in self.backend.models())
        log.info("recserve listening on %s:%d, serving %s", host, port, served or "no models")

    def _connect(self, limits) -> ServerProtocol:
        protocol = ServerProtocol(self.dispatcher, limits,
                                  self.config.max_pending_per_connection,
                                  on_lost=self._connections.discard)
        self._connections.add(protocol)
        return protocol

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

    async def close(self) -> None:
        """Stop accepting, drop every connection (in-flight requests are cancelled), and
        close the backend."""
        if self._server is not None:
            self._server.close()
        for protocol in list(self._connections):
            protocol.close()
        if self._server is not None:
            await self._server.wait_closed()
        await self.backend.close()


async def serve_until_signalled(backend: Backend, config: ServerConfig) -> None:
    """Run a server until SIGINT or SIGTERM, then close it."""
    server = Server(backend, config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("recserve stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.close()
