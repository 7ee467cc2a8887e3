"""Staging: pieces packed into fixed bucket-shaped buffers score like the reference.

This is the GPU executor's host-side packing and its device step (``device_step``) run on
CPU tensors, with the kernels under Triton's interpreter. Pieces arrive with their
``FlatSparse`` (as validation and the worker channel make them) or without it (in-process
callers, split pieces): both must give the same scores.
"""

import numpy as np
import pytest
import torch

from recserve.engine.demo import random_inputs
from recserve.engine.flat import flatten_sparse
from recserve.engine.gpu_slots import SlotState, device_step
from recserve.engine.inputs import SparseInput, collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, SparseFeature, Table
from recserve.engine.staging import host_buffers, pack, staging_layout
from recserve.engine.tensor_buffers import allocate, as_tensors
from recserve.engine.weights import init_weights
from recserve.kernels.model import TritonModel


def small_spec(dense_scope: str = "candidate", g_dtype: str = "fp32") -> ModelSpec:
    return ModelSpec(
        name="s",
        tables=(Table("t", 50, 8), Table("g", 11, 8, g_dtype)),
        sparse=(SparseFeature("hist", "t", "mean", "request", 6),
                SparseFeature("item", "t", scope="candidate"),
                SparseFeature("tags", "g", "sum", "candidate", 3, weighted=True)),
        dense=(DenseFeature("u", 2, "request"), DenseFeature("c", 3, dense_scope)),
        bottom_mlp=(8,), interaction=Interaction("dot"), top_mlp=(6, 1))


def with_flat(spec, pieces):
    """The pieces as validation hands them over: with their FlatSparse."""
    return [type(p)(p.num_candidates, p.sparse, p.dense,
                    flatten_sparse(spec, p.sparse, p.num_candidates)) for p in pieces]


def packed_scores(spec, weights, pieces, bucket, max_rows=16):
    model = TritonModel(spec, weights, "cpu")
    layout = staging_layout(spec, [names for _, _, names in model.groups], max_rows,
                            model.layout.x_request)
    host = host_buffers(layout)
    host.block.fill(0xF9)  # poison: pack must write every entry the step reads
    sizes = pack(layout, host, pieces, bucket)
    device = as_tensors(host)  # (the step reads the host set itself: no copy on CPU)
    slot = SlotState(host, device, torch.zeros(0), torch.zeros(0), None)
    from recserve.engine.gpu_slots import GpuModel

    scores, bad = device_step(GpuModel(spec, model, layout, [slot]), slot, bucket)
    return sizes, host, scores[:sizes.rows], bad[:sizes.requests]


@pytest.mark.parametrize("dense_scope", ["candidate", "request"])
@pytest.mark.parametrize("flat", [False, True])
def test_packed_bucket_matches_reference(dense_scope, flat):
    spec = small_spec(dense_scope)
    weights = init_weights(spec, seed=5)
    rng = np.random.default_rng(11)
    pieces = [random_inputs(spec, rng, n) for n in (3, 1, 4)]
    staged = with_flat(spec, pieces) if flat else pieces
    sizes, host, scores, bad = packed_scores(spec, weights, staged, bucket=12)
    assert (sizes.rows, sizes.requests, sizes.bucket) == (8, 3, 12)
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces))
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
    assert not bool(bad.any())
    # Padding: rows 8..11 belong to the padding request 3, whose bags are empty.
    assert host.bucket(12).row_request.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert host.bucket(12).request_offsets.tolist() == [0, 3, 4, 8] + [12] * 10
    assert sizes.nnz == sum(len(s.values) for p in pieces for s in p.sparse.values())


@pytest.mark.parametrize("dense_scope", ["candidate", "request"])
def test_a_bf16_model_takes_the_staged_fp32_dense_inputs_as_they_are(dense_scope):
    """The engine's staging holds dense inputs in fp32 and the step hands them to the
    first bottom layer as they are (it rounds them to bf16 as it loads them: no kernel of
    the graph casts them first): the same bits as the same batch with its dense inputs
    rounded beforehand. (Values a little off bf16 ones, under half a step, so that any
    rounding, the card's or the interpreter's, gives the bf16 values back.)"""
    from recserve.engine.gpu_slots import GpuModel
    from recserve.kernels.prepare import PreparedBatch

    spec = small_spec(dense_scope)
    model = TritonModel(spec, init_weights(spec, seed=17), "cpu",
                        compute_dtype=torch.bfloat16)
    rng = np.random.default_rng(17)
    pieces = [random_inputs(spec, rng, n) for n in (3, 1, 4)]
    for p in pieces:
        for name, values in p.dense.items():
            rounded = torch.from_numpy(values).bfloat16().float()
            p.dense[name] = (rounded * (1 + 2 ** -12)).numpy()
    layout = staging_layout(spec, [names for _, _, names in model.groups], 16,
                            model.layout.x_request)
    host = host_buffers(layout)
    sizes = pack(layout, host, pieces, bucket=12)
    device = as_tensors(host)
    slot = SlotState(host, device, torch.zeros(0), torch.zeros(0), None)
    views = device.bucket(12)
    assert views.dense.dtype == torch.float32
    scores, bad = device_step(GpuModel(spec, model, layout, [slot]), slot, 12)
    weights = device.weights[:views.ids.shape[0]]
    rounded = PreparedBatch(12, 13, views.row_request, views.request_offsets,
                            views.first_rows, views.dense.bfloat16(),
                            tuple((views.ids, s, e, weights) for s, e in views.groups))
    want, _ = model.forward_prepared(rounded)
    assert torch.equal(scores[:sizes.rows], want[:sizes.rows])
    assert not bool(bad.any())


def test_groups_with_features_in_any_spec_order_stage_right():
    """Two table dtypes: two gather groups, each reading a non-adjacent subset of a
    request's flat bounds (fancy-indexed rows), ids shared in one buffer."""
    spec = ModelSpec(
        name="m", tables=(Table("t", 50, 8), Table("g", 11, 8, "fp16")),
        sparse=(SparseFeature("a", "t", scope="candidate", max_bag=2),
                SparseFeature("b", "g", "mean", "request", 4),
                SparseFeature("c", "g", "sum", "candidate", 3, weighted=True),
                SparseFeature("d", "t", "sum", "request", 5, weighted=True),
                SparseFeature("e", "t", "mean", "candidate", 2)),
        dense=(DenseFeature("u", 2, "request"),), bottom_mlp=(8,),
        interaction=Interaction("dot"), top_mlp=(6, 1))
    weights = init_weights(spec, seed=8)
    rng = np.random.default_rng(8)
    pieces = [random_inputs(spec, rng, n) for n in (2, 5, 1)]
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces))
    for staged in (pieces, with_flat(spec, pieces), with_flat(spec, pieces[:1]) + pieces[1:]):
        sizes, _, scores, bad = packed_scores(spec, weights, staged, bucket=10)
        torch.testing.assert_close(scores, want, rtol=2e-3, atol=2e-3)  # fp16 table
        assert not bool(bad.any())


def test_a_flat_form_for_other_features_is_rebuilt_not_trusted():
    """A FlatSparse whose shape does not fit the spec (built for another version's features)
    is ignored and rebuilt from the per-feature inputs."""
    spec = small_spec()
    weights = init_weights(spec, seed=9)
    rng = np.random.default_rng(9)
    piece = random_inputs(spec, rng, 3)
    other = random_inputs(spec, rng, 2)  # a flat form for 2 candidates, not 3
    stale = type(piece)(3, piece.sparse, piece.dense,
                        flatten_sparse(spec, other.sparse, 2))
    _, _, got, _ = packed_scores(spec, weights, [stale], bucket=4)
    _, _, want, _ = packed_scores(spec, weights, [piece], bucket=4)
    assert torch.equal(got, want)


def test_an_out_of_range_id_flags_only_its_request():
    spec = small_spec()
    weights = init_weights(spec, seed=2)
    rng = np.random.default_rng(3)
    pieces = [random_inputs(spec, rng, n) for n in (2, 3, 2)]
    item = pieces[1].sparse["item"]
    values = item.values.copy()
    values[1] = 50  # table "t" has 50 rows
    pieces[1].sparse["item"] = SparseInput(values, item.lengths)
    hist = pieces[2].sparse["hist"]
    pieces[2].sparse["hist"] = SparseInput(np.array([-1, *hist.values[1:]]))
    _, _, scores, bad = packed_scores(spec, weights, pieces, bucket=8)
    assert bad.tolist() == [False, True, True]
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces[:1]))
    torch.testing.assert_close(scores[:2], want, rtol=1e-4, atol=1e-5)


def test_a_slot_reused_after_a_bad_id_flags_nothing_in_the_next_batch():
    """The forward flags into the slot's staged flags (no fill kernel of its own): the
    next batch through the same host and device sets must arrive with them cleared, by
    its own copy-in, whatever the previous batch flagged."""
    from recserve.engine.gpu_slots import GpuModel, copy_in

    spec = small_spec()
    weights = init_weights(spec, seed=16)
    rng = np.random.default_rng(16)
    model = TritonModel(spec, weights, "cpu")
    layout = staging_layout(spec, [names for _, _, names in model.groups], 16,
                            model.layout.x_request)
    host, device = host_buffers(layout), allocate(layout, "cpu")
    slot = SlotState(host, device, torch.zeros(0), torch.zeros(0), None,
                     host_tensors=as_tensors(host))
    gpu = GpuModel(spec, model, layout, [slot])
    first = [random_inputs(spec, rng, n) for n in (2, 3, 2)]
    hist = first[2].sparse["hist"]
    first[2].sparse["hist"] = SparseInput(np.array([-1, *hist.values[1:]]))
    sizes = pack(layout, host, first, bucket=12)
    copy_in(slot, sizes.bucket, sizes.nnz, None)
    _, bad = device_step(gpu, slot, 12)
    assert (bad[:sizes.requests] != 0).tolist() == [False, False, True]
    assert bad.data_ptr() == device.bucket(12).bad_flags.data_ptr()  # the staged flags
    second = [random_inputs(spec, rng, n) for n in (4, 1, 2)]
    sizes = pack(layout, host, second, bucket=12)
    copy_in(slot, sizes.bucket, sizes.nnz, None)
    scores, bad = device_step(gpu, slot, 12)
    assert not bool(bad.any())
    want = ReferenceModel(spec, weights).forward(collate(spec, second))
    torch.testing.assert_close(scores[:sizes.rows], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("huge", [(1 << 32) + 3, -(1 << 32) + 3, 1 << 62])
@pytest.mark.parametrize("pieces_before", [0, 1])
def test_huge_ids_cannot_wrap_into_range_in_int32_staging(huge, pieces_before):
    # (1 << 32) + 3 and -(1 << 32) + 3 would wrap to the valid id 3 in a plain int32 cast.
    spec = small_spec()
    weights = init_weights(spec)
    rng = np.random.default_rng(0)
    pieces = [random_inputs(spec, rng, 2) for _ in range(pieces_before + 1)]
    item = pieces[-1].sparse["item"]
    pieces[-1].sparse["item"] = SparseInput(np.array([huge, 1]), item.lengths)
    _, host, _, bad = packed_scores(spec, weights, pieces, bucket=4 * len(pieces))
    assert bad.tolist() == [False] * pieces_before + [True]


def test_unsigned_ids_are_staged_or_flagged():
    spec = small_spec()
    weights = init_weights(spec, seed=6)
    rng = np.random.default_rng(6)
    pieces = [random_inputs(spec, rng, 2) for _ in range(2)]
    item0, item1 = pieces[0].sparse["item"], pieces[1].sparse["item"]
    pieces[0].sparse["item"] = SparseInput(item0.values.astype(np.uint32), item0.lengths)
    pieces[1].sparse["item"] = SparseInput(np.array([(1 << 63) + 5, 1], np.uint64),
                                           item1.lengths)  # would wrap to a negative int64
    _, _, scores, bad = packed_scores(spec, weights, pieces, bucket=8)
    assert bad.tolist() == [False, True]
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces[:1]))
    torch.testing.assert_close(scores[:2], want, rtol=1e-4, atol=1e-5)


def test_int32_ids_are_staged_unchanged():
    spec = small_spec()
    weights = init_weights(spec, seed=3)
    rng = np.random.default_rng(4)
    pieces = [random_inputs(spec, rng, n) for n in (2, 3)]
    narrow = [type(p)(p.num_candidates, {k: SparseInput(v.values.astype(np.int32), v.lengths,
                                                        v.weights)
                                         for k, v in p.sparse.items()}, p.dense)
              for p in pieces]
    _, _, want, _ = packed_scores(spec, weights, pieces, bucket=8)
    _, _, got, bad = packed_scores(spec, weights, narrow, bucket=8)
    assert torch.equal(got, want) and not bool(bad.any())


def test_pack_refuses_a_batch_larger_than_its_bucket():
    spec = small_spec()
    model = TritonModel(spec, init_weights(spec), "cpu")
    layout = staging_layout(spec, [n for _, _, n in model.groups], 8, model.layout.x_request)
    pieces = [random_inputs(spec, np.random.default_rng(0), 5)]
    with pytest.raises(ValueError, match="5 rows do not fit bucket 4"):
        pack(layout, host_buffers(layout), pieces, 4)


@pytest.mark.parametrize("kind", ["dense-only", "request-sparse-only"])
@pytest.mark.parametrize("flat", [False, True])
def test_models_without_some_kind_of_sparse_feature_stage_right(kind, flat):
    """No sparse feature at all, or only request-scope ones: nothing to concatenate for
    some of the buffers, and the scores still match the reference."""
    sparse = () if kind == "dense-only" else (
        SparseFeature("u", "t", "sum", "request", 3),)
    spec = ModelSpec(name="e", tables=(Table("t", 10, 4),) if sparse else (), sparse=sparse,
                     dense=(DenseFeature("c", 3, "candidate"),), bottom_mlp=(4,),
                     interaction=Interaction("dot"), top_mlp=(6, 1))
    weights = init_weights(spec, seed=4)
    rng = np.random.default_rng(4)
    pieces = [random_inputs(spec, rng, n) for n in (2, 3)]
    staged = with_flat(spec, pieces) if flat else pieces
    sizes, _, scores, bad = packed_scores(spec, weights, staged, bucket=8)
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces))
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
    assert not bool(bad.any()) and sizes.nnz == sum(
        len(s.values) for p in pieces for s in p.sparse.values())


def test_pieces_of_split_requests_stage_from_their_flat_form():
    """The engine splits a request too big for the batch's room (slice_rows): pieces of a
    request that came with its flat form keep one (cut from it), and score like the same
    rows cut feature by feature."""
    from recserve.engine.executor import slice_rows

    spec = small_spec()
    weights = init_weights(spec, seed=12)
    rng = np.random.default_rng(12)
    whole = random_inputs(spec, rng, 9)
    flat = with_flat(spec, [whole])[0]
    cuts = [(0, 2), (2, 5), (7, 2)]
    pieces = [slice_rows(spec, flat, s, c) for s, c in cuts]
    assert all(p.flat is not None for p in pieces)
    want = ReferenceModel(spec, weights).forward(
        collate(spec, [slice_rows(spec, whole, s, c) for s, c in cuts]))
    _, _, scores, bad = packed_scores(spec, weights, pieces, bucket=10)
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
    assert not bool(bad.any())


@pytest.mark.parametrize("flat", [False, True])
def test_copy_in_moves_everything_the_device_step_reads(flat):
    """The executor's copy-in (here host -> host, no CUDA stream) moves the used prefix of
    each buffer: a device set poisoned beforehand then scores like the reference, so no
    buffer the step reads was left out or cut short."""
    from recserve.engine.gpu_slots import GpuModel, copy_in

    spec = small_spec()
    weights = init_weights(spec, seed=14)
    rng = np.random.default_rng(14)
    pieces = [random_inputs(spec, rng, n) for n in (3, 2, 4)]
    staged = with_flat(spec, pieces) if flat else pieces
    model = TritonModel(spec, weights, "cpu")
    layout = staging_layout(spec, [names for _, _, names in model.groups], 16,
                            model.layout.x_request)
    host, device = host_buffers(layout), allocate(layout, "cpu")
    device.block.fill_(0xF9)  # poison: rows, requests and bounds negative
    device.bucket(12).ids.fill_(-7)
    device.bucket(12).dense.fill_(float("nan"))
    device.weights.fill_(float("nan"))
    sizes = pack(layout, host, staged, bucket=12)
    slot = SlotState(host, device, torch.zeros(0), torch.zeros(0), None,
                     host_tensors=as_tensors(host))
    gpu = GpuModel(spec, model, layout, [slot])
    copied = copy_in(slot, sizes.bucket, sizes.nnz, None)
    views = host.bucket(12)  # one block, each part 64-byte aligned, the ids last
    parts = [views.row_request, views.request_offsets, views.first_rows, views.bad_flags,
             *(t for pair in views.groups for t in pair), views.dense]
    assert [t.size for t in parts[:4]] == [12, 14, 13, 13]
    assert [t.size for t in parts[4:-1]] == [u for u in sizes.bounds for _ in (0, 1)]
    assert views.dense.shape == (12, layout.dense_width)
    assert views.ids_at == sum(-(-t.nbytes // 64) * 64 for t in parts)
    assert copied == views.ids_at + views.ids.itemsize * sizes.nnz + 4 * sizes.nnz
    scores, bad = device_step(gpu, slot, 12)
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces))
    torch.testing.assert_close(scores[:sizes.rows], want, rtol=1e-4, atol=1e-5)
    assert not bool(bad[:sizes.requests].any())


def test_the_whole_batch_step_copies_at_fixed_sizes_scores_and_copies_out():
    """``batch_step``, what a ``graph_copies`` graph captures (here on CPU, no graph): the
    bucket's whole block and ids room in, the forward, every row's scores and flags out to
    the slot's outputs; a device set and outputs poisoned beforehand."""
    from recserve.engine.gpu_slots import GpuModel, batch_step

    spec = small_spec()
    weights = init_weights(spec, seed=15)
    rng = np.random.default_rng(15)
    pieces = with_flat(spec, [random_inputs(spec, rng, n) for n in (5, 1, 3)])
    model = TritonModel(spec, weights, "cpu")
    layout = staging_layout(spec, [names for _, _, names in model.groups], 16,
                            model.layout.x_request)
    host, device = host_buffers(layout), allocate(layout, "cpu")
    device.block.fill_(0xF9)
    device.weights.fill_(float("nan"))
    sizes = pack(layout, host, pieces, bucket=12)
    slot = SlotState(host, device, torch.full((16, 1), float("nan")),
                     torch.ones(17, dtype=torch.bool), None, host_tensors=as_tensors(host))
    batch_step(GpuModel(spec, model, layout, [slot]), slot, 12)
    want = ReferenceModel(spec, weights).forward(collate(spec, pieces))
    torch.testing.assert_close(slot.scores_out[:sizes.rows], want, rtol=1e-4, atol=1e-5)
    assert not bool(slot.bad_out[:sizes.requests].any())
    assert not bool(slot.scores_out[:12].isnan().any())  # every row of the bucket came out
    room = device.bucket(12).ids
    assert len(room) > sizes.nnz and torch.equal(room, torch.from_numpy(host.bucket(12).ids))
