"""The worker <-> engine process channel layout (server/channel.py), from bytes: requests
round-trip to equal arrays for every input form, replies carry scores or typed errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from server_fixtures import loaded, multi_spec, small_spec

from recserve.engine.demo import random_inputs
from recserve.engine.flat import flatten_sparse, with_flat
from recserve.engine.scheduler import Priority
from recserve.server import channel, shared_ring
from recserve.server.codec import FrameDecoder
from recserve.server.shared_ring import SharedRing


def one_frame(data: bytes | tuple) -> memoryview:
    if isinstance(data, tuple):  # encode_score's (frame, ring region)
        data, data_at = data
        assert data_at is None
    (payload,) = FrameDecoder().feed(data)
    return memoryview(payload)


def ring(size=1 << 16) -> tuple[SharedRing, memoryview]:
    """A worker's ring and the engine process's read-only view of the same memory."""
    fd = shared_ring.create(size)
    try:
        return (SharedRing(shared_ring.map_memory(fd, size, writable=True)),
                shared_ring.map_memory(fd, size, writable=False))
    finally:
        os.close(fd)


@pytest.mark.parametrize("spec", [small_spec(), multi_spec()], ids=["small", "multi"])
@pytest.mark.parametrize("deadline", [None, 12345.25])
@pytest.mark.parametrize("where", ["frame", "ring"])
def test_score_requests_round_trip(spec, deadline, where):
    inputs = random_inputs(spec, np.random.default_rng(3), 5)
    writer, reader = ring() if where == "ring" else (None, None)
    if writer is not None:
        writer.alloc(100)  # (not at the ring's start)
    priority = Priority.HIGH if deadline is None else Priority.LOW
    data, data_at = channel.encode_score(77, spec.name, 4, inputs, deadline, spec,
                                         pinned=deadline is None, ring=writer,
                                         priority=priority)
    assert (data_at is None) == (where == "frame")
    view = one_frame(data)
    assert bytes(view[:1]) == b"S"
    header = channel.score_header(view)
    rid, name, version, n, got_deadline, pinned, _, got_at, got_priority = header
    assert (rid, name, version, n, got_deadline) == (77, spec.name, 4, 5, deadline)
    assert pinned is (deadline is None) and got_at == data_at and got_priority is priority
    back = channel.decode_inputs(view, header, spec, reader)
    assert back.num_candidates == 5
    for f in spec.sparse:
        a, b = inputs.sparse[f.name], back.sparse[f.name]
        np.testing.assert_array_equal(a.values, b.values)
        assert b.values.dtype == np.int64
        for x, y in ((a.lengths, b.lengths), (a.weights, b.weights)):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)
    for f in spec.dense:
        assert back.dense[f.name].dtype == np.float32
        np.testing.assert_array_equal(inputs.dense[f.name], back.dense[f.name])
    # the sparse inputs cross in the flat form the engine stages, as views of the frame
    want = flatten_sparse(spec, inputs.sparse, 5)
    for x, y in ((want.ids, back.flat.ids), (want.weights, back.flat.weights),
                 (want.lengths, back.flat.lengths), (want.bounds, back.flat.bounds)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert np.shares_memory(back.flat.ids, np.frombuffer(reader or view, np.uint8))
    if where == "ring":  # only the headers travel; the engine side cannot write the data
        assert len(view) < 200 and not back.flat.ids.flags.writeable
    assert back.flat.lengths.dtype == back.flat.bounds.dtype == np.int32  # the narrow wire
    assert list(back.sparse) == [f.name for f in spec.sparse] == list(back.sparse.keys())


def test_non_ascii_model_names_and_narrow_dtypes():
    spec = loaded(small_spec()).spec
    inputs = random_inputs(spec, np.random.default_rng(1), 2)
    narrow = type(inputs)(2, {k: type(v)(v.values.astype(np.int32), v.lengths, v.weights)
                              for k, v in inputs.sparse.items()}, inputs.dense)
    view = one_frame(channel.encode_score(1, "modèle", 0, narrow, None, spec))
    header = channel.score_header(view)
    assert header.name == "modèle" and header.deadline is None
    back = channel.decode_inputs(view, header, spec)
    np.testing.assert_array_equal(back.sparse["item"].values, inputs.sparse["item"].values)
    # int32 ids (as validation leaves them) cross as int32: no widening on the way
    assert all(back.sparse[f.name].values.dtype == np.int32 for f in spec.sparse)


@pytest.mark.parametrize("shape", [(0,), (7,), (7, 2)])
def test_replies_carry_scores(shape):
    scores = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    rid, got, version, error, released = channel.decode_reply(one_frame(channel.encode_reply(
        2**64 - 1, scores, 2**32 - 1, released=False)))
    assert (rid, version, error, released) == (2**64 - 1, 2**32 - 1, None, False)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, scores)


def test_replies_carry_errors_and_control_messages_round_trip():
    rid, scores, version, error, released = channel.decode_reply(one_frame(
        channel.encode_error(5, "overloaded", "queue full")))
    assert (rid, scores, error) == (5, None, {"code": "overloaded", "message": "queue full"})
    assert released
    view = one_frame(channel.encode_free(2**64 - 2))
    assert bytes(view[:1]) == b"F" and channel.decode_free(view) == 2**64 - 2
    message = {"kind": "models", "models": [{"name": "m", "version": 1}], "not_ready": None}
    view = one_frame(channel.encode_control(message))
    assert bytes(view[:1]) == b"C" and channel.decode_control(view) == message


@pytest.mark.parametrize("damage", ["bound past the ids", "negative bound", "short bounds",
                                    "lengths for other candidates"])
def test_a_malformed_flat_form_is_refused_not_staged(damage):
    """The engine stages a request's bag bounds as they arrive: the engine side refuses any
    that point outside the request's own ids (a worker bug must not become a bad read)."""
    import dataclasses

    spec = small_spec()
    inputs = with_flat(spec, random_inputs(spec, np.random.default_rng(2), 4))
    flat = inputs.flat
    bounds, lengths = flat.bounds.copy(), flat.lengths
    if damage == "bound past the ids":
        bounds[-1] += 1
    elif damage == "negative bound":
        bounds[0] = -1
    elif damage == "short bounds":
        bounds = bounds[:-1]
    else:
        lengths = lengths[:, :3]
    broken = dataclasses.replace(inputs, flat=dataclasses.replace(flat, bounds=bounds,
                                                                  lengths=lengths))
    view = one_frame(channel.encode_score(1, spec.name, 0, broken, None, spec))
    header = channel.score_header(view)
    with pytest.raises(ValueError, match="malformed sparse inputs"):
        channel.decode_inputs(view, header, spec)


def test_a_ring_request_is_refused_where_there_is_no_ring_or_past_its_end():
    spec = small_spec()
    inputs = random_inputs(spec, np.random.default_rng(4), 3)
    writer, reader = ring(4096)
    data, data_at = channel.encode_score(1, spec.name, 0, inputs, None, spec, ring=writer)
    view = one_frame(data)
    header = channel.score_header(view)
    with pytest.raises(ValueError, match="shared memory"):
        channel.decode_inputs(view, header, spec, None)
    with pytest.raises(ValueError):  # a region that does not fit the mapping
        channel.decode_inputs(view, header._replace(data_at=4000), spec, reader)
    full, _ = ring(64)  # no room: the arrays travel in the frame instead
    data, data_at = channel.encode_score(1, spec.name, 0, inputs, None, spec, ring=full)
    assert data_at is None and full.used == 0
    back = channel.decode_inputs(one_frame(data), channel.score_header(one_frame(data)), spec)
    np.testing.assert_array_equal(back.flat.ids, with_flat(spec, inputs).flat.ids)
