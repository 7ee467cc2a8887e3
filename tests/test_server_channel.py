"""The worker <-> engine process channel layout (server/channel.py), from bytes: requests
round-trip to equal arrays for every input form, replies carry scores or typed errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from server_fixtures import loaded, multi_spec, small_spec

from recserve.engine.demo import random_inputs
from recserve.engine.flat import flatten_sparse, with_flat
from recserve.server import channel
from recserve.server.codec import FrameDecoder


def one_frame(data: bytes) -> memoryview:
    (payload,) = FrameDecoder().feed(data)
    return memoryview(payload)


@pytest.mark.parametrize("spec", [small_spec(), multi_spec()], ids=["small", "multi"])
@pytest.mark.parametrize("deadline", [None, 12345.25])
def test_score_requests_round_trip(spec, deadline):
    inputs = random_inputs(spec, np.random.default_rng(3), 5)
    view = one_frame(channel.encode_score(77, spec.name, 4, inputs, deadline, spec,
                                          pinned=deadline is None))
    assert bytes(view[:1]) == b"S"
    rid, name, version, n, got_deadline, pinned, pos = channel.score_header(view)
    assert (rid, name, version, n, got_deadline) == (77, spec.name, 4, 5, deadline)
    assert pinned is (deadline is None)
    back = channel.decode_inputs(view, pos, n, spec)
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
    assert np.shares_memory(back.flat.ids, np.frombuffer(view, np.uint8))
    assert back.flat.lengths.dtype == back.flat.bounds.dtype == np.int32  # the narrow wire
    assert list(back.sparse) == [f.name for f in spec.sparse] == list(back.sparse.keys())


def test_non_ascii_model_names_and_narrow_dtypes():
    spec = loaded(small_spec()).spec
    inputs = random_inputs(spec, np.random.default_rng(1), 2)
    narrow = type(inputs)(2, {k: type(v)(v.values.astype(np.int32), v.lengths, v.weights)
                              for k, v in inputs.sparse.items()}, inputs.dense)
    view = one_frame(channel.encode_score(1, "modèle", 0, narrow, None, spec))
    _, name, _, _, deadline, _, pos = channel.score_header(view)
    assert name == "modèle" and deadline is None
    back = channel.decode_inputs(view, pos, 2, spec)
    np.testing.assert_array_equal(back.sparse["item"].values, inputs.sparse["item"].values)
    # int32 ids (as validation leaves them) cross as int32: no widening on the way
    assert all(back.sparse[f.name].values.dtype == np.int32 for f in spec.sparse)


@pytest.mark.parametrize("shape", [(0,), (7,), (7, 2)])
def test_replies_carry_scores(shape):
    scores = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    rid, got, version, error = channel.decode_reply(one_frame(channel.encode_reply(
        2**64 - 1, scores, 2**32 - 1)))
    assert (rid, version, error) == (2**64 - 1, 2**32 - 1, None)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, scores)


def test_replies_carry_errors_and_control_messages_round_trip():
    rid, scores, version, error = channel.decode_reply(one_frame(channel.encode_error(
        5, "overloaded", "queue full")))
    assert (rid, scores, error) == (5, None, {"code": "overloaded", "message": "queue full"})
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
        channel.decode_inputs(view, header.offset, 4, spec)
