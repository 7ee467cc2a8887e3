"""The engine process's end of one front-end worker's channel (``hub``): frames in, the
worker's requests' state, and what the worker is told when a ring region is free."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from recserve.engine.shared_memory import SharedMemory

from . import channel
from .channel_end import ChannelEnd

if TYPE_CHECKING:
    from .hub import Hub


class EngineSide(ChannelEnd):
    """This process's end of one worker's channel, with its requests' state: ``running``
    (rid -> cancel, until answered), ``holding`` (rids whose ring region the backend may
    still read) and ``ring`` (the worker's shared memory, mapped read-only, or None)."""

    def __init__(self, hub: Hub, index: int, ring: SharedMemory | None = None) -> None:
        super().__init__()
        self.hub, self.index, self.ring = hub, index, ring
        self.running: dict[int, Callable[[], object] | None] = {}
        self.holding: set[int] = set()
        self.listening = asyncio.get_running_loop().create_future()

    def on_frame(self, view: memoryview) -> None:
        if view[:1] == b"S":
            self.hub.score(self, view)
        else:
            self.hub.on_control(self, channel.decode_control(view))

    def release(self, rid: int) -> None:
        """The backend reads request ``rid``'s ring region no more: say so in its reply,
        or, when that has gone already, in an ``F``."""
        self.holding.discard(rid)
        if rid not in self.running:
            self.send_soon(channel.encode_free(rid))

    def connection_lost(self, exc) -> None:
        self.hub.lost(self)
        for future in (self.listening, self.closed):
            if not future.done():
                future.set_result(False)
