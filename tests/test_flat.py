"""FlatSparse: one request's sparse inputs back to back, and back to per-feature views."""

import numpy as np
import pytest

from recserve.engine.demo import random_inputs
from recserve.engine.executor import slice_rows
from recserve.engine.flat import FlatFeatures, flatten_sparse, split_bounds, with_flat
from recserve.engine.inputs import SparseInput
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, SparseFeature, Table


def spec_with(*features: SparseFeature) -> ModelSpec:
    return ModelSpec(name="f", tables=(Table("t", 100, 4),), sparse=features,
                     dense=(DenseFeature("d", 2, "candidate"),), bottom_mlp=(4,),
                     interaction=Interaction("dot"), top_mlp=(3, 1))


MIXED = spec_with(SparseFeature("r1", "t", "sum", "request", 5),
                  SparseFeature("c1", "t", "sum", "candidate", 3, weighted=True),
                  SparseFeature("r2", "t", "mean", "request", 2, weighted=True),
                  SparseFeature("c2", "t", "mean", "candidate", 4))


@pytest.mark.parametrize("spec", [
    MIXED,
    spec_with(SparseFeature("c", "t", "sum", "candidate", 3)),
    spec_with(SparseFeature("r", "t", "sum", "request", 3)),
], ids=["mixed", "candidate-only", "request-only"])
@pytest.mark.parametrize("n", [1, 7])
def test_bags_and_views_match_the_per_feature_inputs(spec, n):
    inputs = random_inputs(spec, np.random.default_rng(n), n)
    flat = flatten_sparse(spec, inputs.sparse, n)
    cand = [f for f in spec.sparse if f.scope == "candidate"]
    req = [f for f in spec.sparse if f.scope == "request"]
    assert flat.lengths.shape == (len(cand), n)
    assert len(flat.bounds) == len(cand) * n + len(req) + 1 and flat.bounds[0] == 0
    c_starts, c_ends, r_starts, r_ends = split_bounds(flat.bounds, len(cand), n)
    # every bag, in the documented order, holds exactly its feature's ids
    for k, f in enumerate(cand):
        s = inputs.sparse[f.name]
        ends = np.cumsum(s.lengths)
        for i in range(n):
            lo, hi = c_starts[k, i], c_ends[k, i]
            assert flat.ids[lo:hi].tolist() == s.values[ends[i] - s.lengths[i]:ends[i]].tolist()
    for j, f in enumerate(req):
        lo, hi = r_starts[j], r_ends[j]
        assert flat.ids[lo:hi].tolist() == inputs.sparse[f.name].values.tolist()
    assert flat.bounds[-1] == len(flat.ids)
    assert (flat.weights is None) == (not any(f.weighted for f in spec.sparse))
    # and the views back: equal to what went in, sharing the flat arrays' memory
    back = flat.sparse_inputs(spec)
    for f in spec.sparse:
        a, b = inputs.sparse[f.name], back[f.name]
        assert b.values.tolist() == a.values.tolist() and np.shares_memory(b.values, flat.ids)
        assert (b.lengths is None) == (a.lengths is None)
        if a.lengths is not None:
            assert b.lengths.tolist() == a.lengths.tolist()
        assert (b.weights is None) == (a.weights is None)
        if a.weights is not None:
            assert b.weights.tolist() == a.weights.tolist()


def test_unweighted_features_weigh_one_in_the_flat_weights():
    flat = with_flat(MIXED, random_inputs(MIXED, np.random.default_rng(0), 3)).flat
    _, _, starts, ends = split_bounds(flat.bounds, 2, 3)
    r1 = slice(starts[0], ends[0])  # r1 is not weighted
    assert (flat.weights[r1] == 1.0).all() and flat.weights.dtype == np.float32


def test_id_dtypes_int32_kept_others_widened_without_wrapping_into_range():
    spec = spec_with(SparseFeature("a", "t", "sum", "request", 3),
                     SparseFeature("b", "t", "sum", "request", 3))
    narrow = {"a": SparseInput(np.array([1, 2], np.int32)),
              "b": SparseInput(np.array([3], np.int32))}
    assert flatten_sparse(spec, narrow, 1).ids.dtype == np.int32
    mixed = {"a": SparseInput(np.array([1, 2], np.int32)),
             "b": SparseInput(np.array([(1 << 63) + 5], np.uint64))}
    ids = flatten_sparse(spec, mixed, 1).ids
    assert ids.dtype == np.int64 and ids.tolist()[:2] == [1, 2]
    assert ids[2] < 0  # past int64: negative, outside every table (flagged, never read)


def test_empty_bags_have_equal_bounds():
    spec = spec_with(SparseFeature("r", "t", "sum", "request", 3),
                     SparseFeature("c", "t", "sum", "candidate", 3))
    sparse = {"r": SparseInput(np.zeros(0, np.int64)),
              "c": SparseInput(np.array([4, 5], np.int64), np.array([0, 2, 0]))}
    flat = flatten_sparse(spec, sparse, 3)
    assert flat.bounds.tolist() == [0, 0, 2, 2, 2]
    assert flat.ids.tolist() == [4, 5]


@pytest.mark.parametrize("start,count", [(0, 3), (2, 4), (5, 2), (6, 1)])
def test_slicing_the_flat_form_equals_flattening_the_slice(start, count):
    inputs = random_inputs(MIXED, np.random.default_rng(start), 7)
    whole = with_flat(MIXED, inputs)
    got = slice_rows(MIXED, whole, start, count)  # through the flat form
    want = slice_rows(MIXED, inputs, start, count)  # per feature
    expected = flatten_sparse(MIXED, want.sparse, count)
    for x, y in ((expected.ids, got.flat.ids), (expected.weights, got.flat.weights),
                 (expected.lengths, got.flat.lengths), (expected.bounds, got.flat.bounds)):
        np.testing.assert_array_equal(x, y)
    for f in MIXED.sparse:
        a, b = want.sparse[f.name], got.sparse[f.name]
        np.testing.assert_array_equal(a.values, b.values)
        for x, y in ((a.lengths, b.lengths), (a.weights, b.weights)):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)
    for f in MIXED.dense:
        np.testing.assert_array_equal(want.dense[f.name], got.dense[f.name])


def test_flat_features_is_the_per_feature_mapping_made_on_demand():
    inputs = random_inputs(MIXED, np.random.default_rng(5), 3)
    features = FlatFeatures(flatten_sparse(MIXED, inputs.sparse, 3), MIXED)
    assert "c1" in features and "nope" not in features and features._made is None
    assert list(features) == [f.name for f in MIXED.sparse] and len(features) == 4
    assert features["c2"].lengths.tolist() == inputs.sparse["c2"].lengths.tolist()
    assert features._made is not None  # made once, on first access
    with pytest.raises(KeyError):
        features["nope"]
