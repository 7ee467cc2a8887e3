"""The shared-memory ring between front-end workers and the engine process: the
allocator (property-based against a model of live regions) and the mapping."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.server import shared_ring
from recserve.server.shared_ring import ALIGN, Ring


@settings(max_examples=200, deadline=None, database=None)
@given(capacity=st.integers(ALIGN, 64 * ALIGN), data=st.data())
def test_live_regions_never_overlap_and_stay_inside(capacity, data):
    ring = Ring(capacity)
    live: dict[int, int] = {}  # start -> aligned size
    for _ in range(data.draw(st.integers(1, 60))):
        if live and data.draw(st.booleans()):
            start = data.draw(st.sampled_from(sorted(live)))
            ring.free(start)
            del live[start]
            continue
        size = data.draw(st.integers(1, capacity + ALIGN))
        start = ring.alloc(size)
        if not live and size <= ring.capacity:
            assert start is not None, "an empty ring refused a region that fits"
        if start is None:
            continue
        end = start + shared_ring.aligned(size)
        assert start % ALIGN == 0 and 0 <= start and end <= ring.capacity <= capacity
        for other, other_size in live.items():
            assert end <= other or other + other_size <= start, "regions overlap"
        live[start] = end - start
        assert ring.used >= sum(live.values())
    for start in list(live):
        ring.free(start)
    assert ring.used == 0 and ring.alloc(ring.capacity) == 0  # all of it is reusable again


def test_space_is_reused_in_allocation_order():
    ring = Ring(4 * ALIGN)
    a, b, c = ring.alloc(ALIGN), ring.alloc(ALIGN), ring.alloc(2 * ALIGN)
    assert (a, b, c) == (0, ALIGN, 2 * ALIGN) and ring.alloc(1) is None  # full
    ring.free(b)  # freed early: waits for a
    assert ring.alloc(1) is None
    ring.free(a)
    assert ring.alloc(2 * ALIGN) == 0  # a and b's space, at the front (wrapped)
    assert ring.alloc(1) is None
    ring.free(c)
    assert ring.alloc(ALIGN) == 2 * ALIGN and ring.used == 3 * ALIGN
    with pytest.raises(KeyError):
        ring.free(3 * ALIGN)  # no region starts there
    with pytest.raises(ValueError):
        Ring(ALIGN - 1)


@pytest.mark.skipif(not shared_ring.supported(), reason="needs memfd_create (Linux)")
def test_what_the_writer_maps_the_reader_sees_and_cannot_change():
    fd = shared_ring.create(1 << 16)
    try:
        writer = shared_ring.map_memory(fd, 1 << 16, writable=True)
        reader = shared_ring.map_memory(fd, 1 << 16, writable=False)
    finally:
        os.close(fd)  # the mappings outlive the descriptor
    ids = np.arange(1000, dtype=np.int32)
    np.frombuffer(writer, np.int32, ids.size, 4096)[:] = ids
    seen = np.frombuffer(reader, np.int32, ids.size, 4096)
    np.testing.assert_array_equal(seen, ids)
    assert not seen.flags.writeable
    with pytest.raises(TypeError):
        reader[0] = 1


@pytest.mark.skipif(not shared_ring.supported(), reason="needs memfd_create (Linux)")
def test_a_worker_frees_a_region_when_the_engine_process_says_so():
    """The worker's side: a reply flagged released or an ``F`` frees the request's region;
    a reply without the flag keeps it; a request that finds no room goes in the frame."""
    import asyncio

    from server_fixtures import small_spec

    from recserve.engine.demo import random_inputs
    from recserve.server import channel
    from recserve.server.backend import ModelHandle
    from recserve.server.worker import RemoteBackend

    spec = small_spec()
    handle = ModelHandle(spec.name, 1, spec)
    inputs = random_inputs(spec, np.random.default_rng(0), 40)

    class Channel:
        def __init__(self):
            self.sent = []

        def send_soon(self, data):
            self.sent.append(data)

    async def main():
        fd = shared_ring.create(1 << 16)
        ring = shared_ring.SharedRing(shared_ring.map_memory(fd, 1 << 16, writable=True))
        os.close(fd)
        backend = RemoteBackend(ring)
        backend.channel = Channel()
        asks = [asyncio.ensure_future(backend.score_request(handle, inputs, None))
                for _ in range(3)]
        await asyncio.sleep(0)
        used = ring.used
        scores = np.zeros(40, np.float32)
        backend.on_reply(channel.decode_reply(memoryview(
            channel.encode_reply(2, scores, 1, released=False))[4:]))
        after_held = ring.used
        backend.on_reply(channel.decode_reply(memoryview(
            channel.encode_reply(1, scores, 1, released=True))[4:]))
        backend.free(3)  # (an F for a request still unanswered: cancelled)
        after_first = ring.used
        backend.free(2)
        await asyncio.gather(*asks[:2])
        asks[2].cancel()
        big = random_inputs(spec, np.random.default_rng(1), 3000)  # more than the ring
        late = asyncio.ensure_future(backend.score_request(handle, big, None))
        await asyncio.sleep(0)
        late.cancel()
        return used, after_held, after_first, ring, backend

    used, after_held, after_first, ring, backend = asyncio.run(main())
    assert used > 0 and after_held == used  # nothing freed while request 2 holds its place
    assert 0 < after_first < used  # 1 and 3 freed; 2, in between, still held
    assert ring.used == 0 and backend.ring_full == 1


def test_a_worker_without_shared_memory_still_starts(monkeypatch, caplog):
    """Where the memory cannot be had (the memory limit, too many files), the engine
    process starts the worker without a ring and says so; its requests use the socket."""
    from recserve.server.config import ServerConfig
    from recserve.server.hub import Hub
    from recserve.server.worker_launch import new_ring

    def no_memory(*args):
        raise OSError(12, "Cannot allocate memory")

    from recserve.engine import shared_memory

    monkeypatch.setattr(shared_memory, "create_fd", no_memory)
    with caplog.at_level("WARNING", logger="recserve.server"):
        assert new_ring(1 << 20) is None
    assert "no shared ring for a worker" in caplog.text
    assert new_ring(0) is None
    with pytest.raises(ValueError, match="or 0 for none"):
        Hub(object(), ServerConfig(), 2, ring_bytes=1000)
