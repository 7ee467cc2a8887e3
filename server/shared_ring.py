"""Shared memory between a front-end worker and the engine process, and its allocator.

A ranking request for a large model is hundreds of KB of ids (``dlrmv2``: about 600 KB
with its bounds). Sent through the worker's socket, the engine process copies it out of
the kernel and into its read buffer before staging copies it again: measured with
bench/engine_host.py, moving those bytes was about 60 of the 140 us of event-loop CPU a
``dlrmv2`` request cost there, and that one loop feeds the GPU. With a ring, the worker
writes the arrays once into memory both processes map, the frame carries only their
headers and where they lie, and the engine process stages straight from the mapping.

The memory is a ``memfd`` (``recserve.engine.shared_memory``, passed to the worker at
spawn like its socket; the engine process keeps its descriptor, so that its packing
processes can map the ring too). The worker allocates (``Ring``); the engine
process only reads, through a read-only mapping, and says when a request's region may be
reused (``channel`` has the messages). A worker whose ring is full sends the request in
the frame as before.
"""

from __future__ import annotations

from collections import deque

from recserve.engine.shared_memory import create_fd as create  # noqa: F401 (the API here)
from recserve.engine.shared_memory import map_fd as map_memory  # noqa: F401
from recserve.engine.shared_memory import supported  # noqa: F401

ALIGN = 64  # each region (and each array in it) starts on a cache line
DEFAULT_RING_BYTES = 64 << 20  # per worker: a hundred 600 KB dlrmv2 ranking requests
MIN_RING_BYTES = 1 << 16


def aligned(size: int) -> int:
    """``size`` rounded up to ``ALIGN``."""
    return -(-size // ALIGN) * ALIGN


class Ring:
    """Regions of ``capacity`` bytes handed out in a circle, freed in any order.

    Space is reused in allocation order: a region freed early waits until every older
    one is freed too (requests finish roughly in order, and a long-lived one only delays
    reuse, it never corrupts). ``alloc`` returns None when no contiguous room is left.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < ALIGN:
            raise ValueError(f"a ring needs at least {ALIGN} bytes, got {capacity}")
        self.capacity = capacity - capacity % ALIGN  # every region is whole cache lines
        self._live: deque[list] = deque()  # [start, end, freed], oldest first
        self._by_start: dict[int, list] = {}
        self._head = 0  # where the next region starts when it fits

    @property
    def used(self) -> int:
        """Bytes between the oldest live region and the next free byte (0: empty)."""
        if not self._live:
            return 0
        tail = self._live[0][0]
        return self._head - tail if self._head > tail else self.capacity - tail + self._head

    def alloc(self, size: int) -> int | None:
        """The start of a free region of ``size`` bytes, or None when none is left."""
        size = aligned(max(size, 1))
        if size > self.capacity:
            return None
        if not self._live:
            start = 0
        else:
            tail = self._live[0][0]
            if self._head > tail:  # not wrapped: room after the head, else at the front
                if self._head + size <= self.capacity:
                    start = self._head
                elif size <= tail:
                    start = 0
                else:
                    return None
            elif self._head + size <= tail:  # wrapped: room between the head and the tail
                start = self._head
            else:
                return None
        region = [start, start + size, False]
        self._live.append(region)
        self._by_start[start] = region
        self._head = start + size
        return start

    def free(self, start: int) -> None:
        """Give back the region at ``start`` (raises KeyError when none is live there)."""
        self._by_start.pop(start)[2] = True
        while self._live and self._live[0][2]:
            self._live.popleft()
        if not self._live:
            self._head = 0


class SharedRing(Ring):
    """A ``Ring`` over memory this process writes (the worker's side of a channel)."""

    def __init__(self, memory: memoryview) -> None:
        super().__init__(len(memory))
        self.memory = memory
