"""Staging, property-based: whatever the model and the batch, every bag's (start, end) in the
staged buffers selects exactly that bag's ids (and weights), and padding bags are empty.

Read back with numpy, no kernel: fast enough for many shapes. Covers requests with and
without their flat form, pieces of split requests, several table groups, both scopes,
weighted features, int32 and int64 ids.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.engine import staging
from recserve.engine.demo import random_inputs
from recserve.engine.executor import slice_rows
from recserve.engine.flat import with_flat
from recserve.engine.inputs import RequestInputs, SparseInput
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, SparseFeature, Table
from recserve.engine.staging import host_buffers, pack, staging_layout
from recserve.kernels.model import feature_groups

DTYPES = ("fp32", "fp16", "int8")


@st.composite
def models(draw) -> ModelSpec:
    tables = tuple(Table(f"t{i}", draw(st.integers(1, 40)), 4, draw(st.sampled_from(DTYPES)))
                   for i in range(draw(st.integers(1, 3))))
    features = []
    for i in range(draw(st.integers(1, 5))):
        features.append(SparseFeature(
            f"f{i}", draw(st.sampled_from(tables)).name, draw(st.sampled_from(["sum", "mean"])),
            draw(st.sampled_from(["candidate", "request"])), draw(st.integers(1, 6)),
            weighted=draw(st.booleans())))
    used = {f.table for f in features}
    return ModelSpec("p", tuple(t for t in tables if t.name in used), tuple(features),
                     (DenseFeature("d", 2, "candidate"),), (4,), Interaction("dot"), (3, 1))


def expected_bags(spec: ModelSpec, piece: RequestInputs, name: str) -> list[tuple]:
    """Per bag of feature ``name`` in ``piece``: (ids, weights or None)."""
    s = piece.sparse[name]
    if s.lengths is None:
        return [(s.values.tolist(), None if s.weights is None else s.weights.tolist())]
    ends = np.cumsum(s.lengths).tolist()
    out = []
    for end, n in zip(ends, s.lengths.tolist(), strict=True):
        w = None if s.weights is None else s.weights[end - n:end].tolist()
        out.append((s.values[end - n:end].tolist(), w))
    return out


@settings(max_examples=60, deadline=None, database=None)
@given(spec=models(), data=st.data())
def test_every_staged_bag_selects_exactly_its_ids(spec, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    max_rows = 12
    layout = staging_layout(spec, feature_groups(spec), max_rows, False)
    host = host_buffers(layout)
    host.block.fill(0xF7)  # poison: every slot the kernel reads must be written
    pieces, rows = [], 0
    while rows < max_rows and (not pieces or data.draw(st.booleans())):
        n = data.draw(st.integers(1, max_rows - rows))
        whole = random_inputs(spec, rng, n + data.draw(st.integers(0, 3)))
        if data.draw(st.booleans()):  # ids sent as int32 (what validation keeps)
            whole = RequestInputs(whole.num_candidates,
                                  {k: SparseInput(v.values.astype(np.int32), v.lengths,
                                                  v.weights) for k, v in whole.sparse.items()},
                                  whole.dense)
        if data.draw(st.booleans()):
            whole = with_flat(spec, whole)
        start = data.draw(st.integers(0, whole.num_candidates - n))
        pieces.append(slice_rows(spec, whole, start, n))  # n rows, maybe a split piece
        rows += n
    bucket = data.draw(st.integers(rows, max_rows))
    # both ways of adding flat pieces' bases: piece by piece, or joined then added at once
    threshold, staging._ADD_EACH_MIN = staging._ADD_EACH_MIN, data.draw(
        st.sampled_from([0, 1 << 30]))
    try:
        sizes = pack(layout, host, pieces, bucket)
    finally:
        staging._ADD_EACH_MIN = threshold
    ids, weights = host.bucket(bucket).ids[:sizes.nnz], None
    if host.weights is not None:
        weights = host.weights[:sizes.nnz]
    by_name = {f.name: f for f in spec.sparse}
    for group, (starts, ends), used in zip(layout.groups, host.bucket(bucket).groups,
                                           sizes.bounds, strict=True):
        assert len(starts) == len(ends) == used
        slot = 0
        for name in group.features:
            f = by_name[name]
            count = bucket + 1 if f.scope == "request" else bucket
            want: list = []
            for piece in pieces:
                want += expected_bags(spec, piece, name)
            want += [([], None)] * (count - len(want))  # padding rows / the padding request
            for bag, (want_ids, want_w) in enumerate(want):
                lo, hi = int(starts[slot + bag]), int(ends[slot + bag])
                assert 0 <= lo <= hi <= sizes.nnz
                assert ids[lo:hi].tolist() == want_ids, (name, bag)
                if f.weighted:
                    np.testing.assert_array_equal(weights[lo:hi], np.asarray(want_w or [],
                                                                            np.float32))
            slot += count + 1
