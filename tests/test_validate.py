"""validate_inputs: wire inputs against a spec, without a server."""

from __future__ import annotations

import numpy as np
import pytest
from server_fixtures import small_spec

from recserve.engine.demo import random_inputs, to_wire
from recserve.server.codec import encode_array
from recserve.server.errors import BadRequest, TooLarge
from recserve.server.validate import validate_inputs

SPEC = small_spec()
N = 4


def wire(n: int = N, seed: int = 0, typed: bool = True) -> dict:
    """Valid inputs for SPEC; typed arrays, or plain lists when ``typed`` is False."""
    inputs = to_wire(SPEC, random_inputs(SPEC, np.random.default_rng(seed), n))
    return _encode(inputs, typed)


def _encode(value, typed):
    if isinstance(value, dict):
        return {k: _encode(v, typed) for k, v in value.items()}
    return encode_array(value) if typed else value.tolist()


def test_valid_typed_inputs_become_request_inputs():
    inputs = wire()
    got = validate_inputs(SPEC, N, inputs, 100)
    assert got.num_candidates == N
    item = got.sparse["item"]
    # ids come out int32 (checked against their table first), lengths int64
    assert item.values.dtype == np.int32 and item.lengths.dtype == np.int64
    assert item.lengths.tolist() == [1] * N
    assert got.sparse["user"].lengths is None
    assert got.sparse["tags"].weights.dtype == np.float32
    assert got.dense["feat"].shape == (N, 3) and got.dense["feat"].dtype == np.float32
    assert got.dense["ctx"].shape == (2,)


def test_plain_lists_give_the_same_arrays_as_typed_arrays():
    typed = validate_inputs(SPEC, N, wire(typed=True), 100)
    plain = validate_inputs(SPEC, N, wire(typed=False), 100)
    for name in typed.sparse:
        assert np.array_equal(typed.sparse[name].values, plain.sparse[name].values)
    for name in typed.dense:
        assert np.array_equal(typed.dense[name], plain.dense[name])


def test_narrow_and_wide_dtypes_are_converted():
    inputs = wire()
    inputs["item"]["values"] = encode_array(np.array([0, 1, 2, 49], dtype=np.int32))
    inputs["item"]["lengths"] = encode_array(np.ones(N, dtype=np.int32))
    inputs["feat"] = encode_array(np.ones((N, 3), dtype=np.float64))
    inputs["ctx"] = encode_array(np.ones(2, dtype=np.float16))
    got = validate_inputs(SPEC, N, inputs, 100)
    # ids sent as i4 stay int32 (never widened), lengths become int64
    assert got.sparse["item"].values.dtype == np.int32
    assert got.sparse["item"].values.tolist() == [0, 1, 2, 49]
    assert got.sparse["item"].lengths.dtype == np.int64
    assert got.dense["feat"].dtype == np.float32 and got.dense["ctx"].dtype == np.float32


def test_request_scope_sparse_accepts_an_array_or_a_values_map():
    inputs = wire()
    inputs["user"] = {"values": [3]}
    assert validate_inputs(SPEC, N, inputs, 100).sparse["user"].values.tolist() == [3]
    inputs["user"] = []  # an empty bag pools to zeros
    assert validate_inputs(SPEC, N, inputs, 100).sparse["user"].values.size == 0


def _mutate(path, value):
    def apply(inputs):
        target = inputs
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return apply


_DELETE = object()
F4 = np.float32

CASES = {
    "missing input": (_mutate(["ctx"], _DELETE), "missing inputs \\['ctx'\\]"),
    "extra input": (_mutate(["color"], [1]), "unknown inputs \\['color'\\]"),
    "float ids": (_mutate(["item", "values"], encode_array(np.zeros(N, F4))),
                  "input 'item' values has dtype f4; ids must be ints"),
    "float ids in a list": (_mutate(["user"], [1.5]), "input 'user' values has dtype f8"),
    "int dense typed": (_mutate(["feat"], encode_array(np.zeros((N, 3), np.int32))),
                        "input 'feat'.*dtype i4; expected floats"),
    "dense wrong shape": (_mutate(["feat"], encode_array(np.zeros((N, 2), F4))),
                          "input 'feat'.*has shape \\[4, 2\\]; expected \\[4, 3\\]"),
    "dense transposed": (_mutate(["feat"], encode_array(np.zeros((3, N), F4))),
                         "input 'feat'.*has shape \\[3, 4\\]; expected \\[4, 3\\]"),
    "dense too big": (_mutate(["ctx"], [0.0] * 5), "input 'ctx'.*holds 5 elements"),
    "request dense as matrix": (_mutate(["ctx"], [[0.0, 1.0]]),
                                "input 'ctx'.*has shape \\[1, 2\\]; expected \\[2\\]"),
    "lengths do not sum": (_mutate(["item", "lengths"], [1, 1, 1, 0]),
                           "input 'item' lengths sum to 3 but values has 4 entries"),
    "lengths wrong count": (_mutate(["item", "lengths"], [2, 2]),
                            "input 'item' lengths has 2 entries; expected one per candidate"),
    "negative length": (_mutate(["item", "lengths"], [1, -1, 1, 1]),
                        "input 'item' lengths\\[1\\] is -1"),
    "bag above max_bag": (_mutate(["item", "lengths"], [2, 0, 1, 1]),
                          "input 'item' lengths\\[0\\] is 2; .*\\[0, 1\\]"),
    "request bag above max_bag": (_mutate(["user"], [1, 2]),
                                  "input 'user' values: .*holds 2 elements; at most 1"),
    "index past the table": (_mutate(["item", "values"], [0, 1, 50, 51]),
                             "input 'item' values\\[2\\] is 50, outside table 'items'"),
    "negative index": (_mutate(["user"], [-1]), "input 'user' values\\[0\\] is -1"),
    "nan dense": (_mutate(["feat"], [[0.0, 0.0, 0.0]] * 3 + [[0.0, float("nan"), 0.0]]),
                  "input 'feat'.*\\[3, 1\\] is nan"),
    "inf dense": (_mutate(["ctx"], [float("inf"), 0.0]), "input 'ctx'.*\\[0\\] is inf"),
    "f8 overflows f4": (_mutate(["ctx"], encode_array(np.array([1e300, 0.0]))),
                        "\\[0\\] is inf \\(after conversion to float32\\)"),
    "nan weight": (_mutate(["history", "weights"], [float("nan")] * 6),
                   "input 'history' weights\\[0\\] is nan"),
    "missing weights": (_mutate(["tags", "weights"], _DELETE),
                        "input 'tags': missing keys \\['weights'\\]"),
    "unknown sparse key": (_mutate(["item", "offsets"], [0]), "unknown keys \\['offsets'\\]"),
    "weights on request bag given as list": (_mutate(["history"], [1, 2]),
                                             "input 'history': missing keys \\['weights'\\]"),
    "weights length": (_mutate(["history", "weights"], [1.0]), "weights have shape \\[1\\]"),
    "candidate sparse as array": (_mutate(["item"], [1, 2, 3, 4]),
                                  "input 'item' \\(candidate-scope sparse\\) is an array; "
                                  "expected \\{values"),
    "sparse as str": (_mutate(["user"], "7"), "input 'user' .*is a str"),
    "ids 2-D": (_mutate(["user"], [[1]]), "input 'user' values has shape \\[1, 1\\]"),
    "typed array lies about size": (
        _mutate(["feat"], {"dtype": "f4", "shape": [N, 3], "data": b"\x00" * 8}),
        "has 8 bytes; shape \\[4, 3\\] of f4 needs 48"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_inputs_name_the_input_and_the_problem(case):
    mutate, match = CASES[case]
    inputs = wire()
    # The cases assume these shapes (seeded): 4 single-id item bags, 6 history ids.
    inputs["item"] = {"values": [0, 1, 2, 3], "lengths": [1, 1, 1, 1]}
    inputs["history"] = {"values": [1, 2, 3, 4, 5, 6], "weights": [1.0] * 6}
    validate_inputs(SPEC, N, inputs, 100)
    mutate(inputs)
    with pytest.raises(BadRequest, match=match):
        validate_inputs(SPEC, N, inputs, 100)


@pytest.mark.parametrize(("candidates", "error", "match"), [
    (0, BadRequest, "at least 1"),
    (-3, BadRequest, "at least 1"),
    (True, BadRequest, "expected a positive int"),
    (2.0, BadRequest, "expected a positive int"),
    (101, TooLarge, "at most 100 per request"),
])
def test_candidate_count(candidates, error, match):
    with pytest.raises(error, match=match):
        validate_inputs(SPEC, candidates, wire(), 100)


def test_inputs_must_be_a_map():
    with pytest.raises(BadRequest, match="inputs is an array"):
        validate_inputs(SPEC, N, [], 100)


def test_ids_of_a_table_beyond_int32_stay_int64():
    import dataclasses

    huge = dataclasses.replace(SPEC, tables=tuple(
        dataclasses.replace(t, rows=(1 << 31) + 5) for t in SPEC.tables))
    inputs = wire()
    inputs["item"]["values"] = encode_array(np.full(N, (1 << 31) + 4, dtype=np.int64))
    inputs["item"]["lengths"] = encode_array(np.ones(N, dtype=np.int64))
    got = validate_inputs(huge, N, inputs, 100)
    assert got.sparse["item"].values.dtype == np.int64
    assert got.sparse["item"].values.tolist() == [(1 << 31) + 4] * N
