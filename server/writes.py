"""Writes gathered per event-loop turn: one syscall for every frame a turn produced.

When a batch finishes, its requests' replies are all made in the same loop turn; a
``transport.write`` each would cost a ``send`` syscall each (a fifth of the engine
process's CPU with ``--workers``, by py-spy, before the channel gathered them).
"""

from __future__ import annotations

import asyncio


class TurnWriter:
    """Frames handed to ``write`` during a loop turn go out together when it ends (or at
    ``flush``; call it before closing the transport, or the last frames are lost)."""

    __slots__ = ("transport", "_out", "_loop")

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self._out: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def write(self, frame: bytes) -> None:
        """Queue ``frame``; dropped when the transport is gone or closing."""
        if self.transport is None or self.transport.is_closing():
            return
        self._out.append(frame)
        if len(self._out) == 1:
            if self._loop is None:  # (get_running_loop costs a getpid syscall a call)
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def write_now(self, frame: bytes) -> None:
        """Write ``frame`` at once, behind whatever is queued (order is kept)."""
        if self._out:
            self._out.append(frame)
            self.flush()
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def flush(self) -> None:
        """Write what is queued now."""
        out, self._out = self._out, []
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        if len(out) == 1:
            transport.write(out[0])
        else:
            transport.writelines(out)
