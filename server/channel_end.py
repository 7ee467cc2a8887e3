"""One end of a worker <-> engine-process channel: framing and writes, shared by both ends.

Subclasses say what a frame means (``on_frame``) and what a lost connection means
(``connection_lost``); messages themselves are built and read by ``channel``.
"""

from __future__ import annotations

import asyncio

from .codec import FrameDecoder
from .writes import TurnWriter


class ChannelEnd(asyncio.Protocol):
    """Frames in (each handed to ``on_frame`` as a memoryview), out with ``send`` (written
    at once: control messages, whose effect others may act on right after) or
    ``send_soon`` (per-request traffic: a loop turn's frames leave in one write, see
    ``TurnWriter``); order is kept either way, and ``close`` writes what is queued."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 31)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._writes = TurnWriter()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._writes.transport = transport

    def data_received(self, data: bytes) -> None:
        for payload in self.decoder.feed(data):
            self.on_frame(memoryview(payload))

    def on_frame(self, view: memoryview) -> None:
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Write ``data`` now, after any frames queued by ``send_soon``."""
        self._writes.write_now(data)

    def send_soon(self, data: bytes) -> None:
        """Queue ``data`` for the write at the end of this loop turn."""
        self._writes.write(data)

    def close(self) -> None:
        """Write what was sent, then close the transport (it flushes its own buffer)."""
        self._writes.flush()
        if self.transport is not None:
            self.transport.close()
