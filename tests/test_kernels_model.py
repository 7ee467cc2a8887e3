"""TritonModel (whole forward on the kernels) vs ReferenceModel, and the bench workloads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_params import DEVICES

from recserve.engine.inputs import RequestInputs, SparseInput, collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, Output, SparseFeature, Table
from recserve.engine.weights import init_weights
from recserve.kernels.layout import build_layout
from recserve.kernels.model import TritonModel

# compute dtype -> (atol, rtol) on scores (sigmoid outputs, and logits of size ~1-5);
# bf16: 8-bit mantissas, a few roundings per layer over ~6 layers.
TOL = {torch.float32: (2e-5, 0.0), torch.bfloat16: (2e-2, 2e-2)}
INTERACTIONS = {"dot": Interaction("dot"), "dot-self": Interaction("dot", self_interaction=True),
                "dcnv2": Interaction("dcnv2", layers=2, rank=5), "cat": Interaction("cat")}


def _spec(kind: str, dense_scopes: tuple[str, ...] = ("request", "candidate")) -> ModelSpec:
    d = 8
    tables = (Table("a", 50, d), Table("b", 20, d, "fp16"), Table("c", 30, d, "int8"),
              Table("e", 11, d, "bf16"))
    sparse = (SparseFeature("hist", "a", scope="request", max_bag=40, pooling="mean"),
              SparseFeature("item", "b", max_bag=3, weighted=True),
              SparseFeature("tags", "c", max_bag=5),
              SparseFeature("country", "a", scope="request", max_bag=2),
              SparseFeature("genre", "e", max_bag=20, pooling="mean"))
    dense = tuple(DenseFeature(f"d{i}", 3 + i, scope=s) for i, s in enumerate(dense_scopes))
    return ModelSpec("m", tables, sparse, dense, (16, d), INTERACTIONS[kind], (24, 12, 2),
                     (Output("click"), Output("watch", "logit")))


def _request(spec: ModelSpec, rng: np.random.Generator, n: int) -> RequestInputs:
    sparse = {}
    for f in spec.sparse:
        rows = spec.table(f.table).rows
        lengths = None if f.scope == "request" else rng.integers(0, f.max_bag + 1, n)
        count = int(rng.integers(0, f.max_bag + 1)) if lengths is None else int(lengths.sum())
        w = rng.random(count).astype(np.float32) if f.weighted else None
        sparse[f.name] = SparseInput(rng.integers(0, rows, count), lengths, w)
    dense = {f.name: rng.standard_normal(f.dim if f.scope == "request" else (n, f.dim))
             .astype(np.float32) for f in spec.dense}
    return RequestInputs(n, sparse, dense)


def _check(spec: ModelSpec, device: str, dtype: torch.dtype, seed: int, sizes=(3, 1, 6)):
    rng = np.random.default_rng(seed)
    weights = init_weights(spec, seed)
    batch = collate(spec, [_request(spec, rng, n) for n in sizes])
    want = ReferenceModel(spec, weights).forward(batch)
    model = TritonModel(spec, weights, device=device, compute_dtype=dtype)
    got, bad = model.forward(batch)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert bad.tolist() == [False] * len(sizes)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)
    return model, batch, got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(INTERACTIONS))
def test_forward_matches_reference(device, kind):
    model, _, _ = _check(_spec(kind), device, torch.float32, seed=len(kind))
    if kind != "dcnv2":  # the request half of the first top layer is split off
        assert model.layout.ku > 0 and model.top_u is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dot", "cat"])
def test_request_only_dense_runs_bottom_once_per_request(device, kind):
    spec = _spec(kind, dense_scopes=("request", "request"))
    assert build_layout(spec).x_request
    _check(spec, device, torch.float32, seed=4, sizes=(2, 5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(INTERACTIONS))
def test_bf16_forward_within_tolerance(device, kind):
    _check(_spec(kind), device, torch.bfloat16, seed=9, sizes=(30, 1, 200))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_id_fails_only_its_request_and_is_deterministic(device):
    spec = _spec("dot")
    rng = np.random.default_rng(3)
    weights = init_weights(spec, 3)
    requests = [_request(spec, rng, n) for n in (2, 4, 3)]
    good = ReferenceModel(spec, weights).forward(collate(spec, requests))
    ids = requests[1].sparse["tags"].values
    assert len(ids) > 0
    ids[0] = 30  # one past the last row of table c (the server would have rejected it)
    model = TritonModel(spec, weights, device=device, compute_dtype=torch.float32)
    batch = collate(spec, requests)
    first, bad = model.forward(batch)
    assert bad.tolist() == [False, True, False]
    keep = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2]) != 1
    torch.testing.assert_close(first.cpu()[keep], good[keep], atol=2e-5, rtol=0)
    second, _ = model.forward(batch)
    assert torch.equal(first, second)


def _workloads():
    path = Path(__file__).resolve().parents[1] / "bench" / "workloads.py"
    spec = importlib.util.spec_from_file_location("bench_workloads", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("interaction", ["dot", "dcnv2"])
def test_bench_workloads_peer_and_prepared_path(interaction):
    wl = _workloads()
    spec = wl.dlrmv2_spec(max_rows=40, table_dtype="fp32", interaction=interaction)
    assert spec.interaction_dim == (479 if interaction == "dot" else 3456)
    weights = init_weights(spec, 1)
    inputs = wl.fixed_hot_inputs(spec, 3, zipf=True, device="cpu", seed=2)
    requests = [RequestInputs(1, {f.name: SparseInput(
        inputs["values"][k][r * f.max_bag:(r + 1) * f.max_bag].numpy(), np.array([f.max_bag]))
        for k, f in enumerate(spec.sparse)}, {"dense": inputs["dense"][r:r + 1].numpy()})
        for r in range(3)]
    want = ReferenceModel(spec, weights).forward(collate(spec, requests))
    peer = wl.TorchPeer(spec, weights, dtype=torch.float32, concat=interaction == "dot")
    torch.testing.assert_close(peer.forward(inputs["dense"], inputs["values"],
                                            inputs["offsets"]), want, atol=1e-5, rtol=0)
    if interaction == "dot":  # the Triton path on the bench's pre-staged inputs
        model = TritonModel(spec, weights, device="cpu")
        got, bad = model.forward_prepared(wl.to_prepared(model, inputs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert not bad.any()


def test_bench_ranking_workload_matches_reference():
    wl = _workloads()
    spec = wl.ranking_spec(max_rows=60)
    rng = np.random.default_rng(4)
    weights = init_weights(spec, 2)
    batch = collate(spec, wl.ranking_requests(spec, rng, 3, zipf=True, candidates=(1, 4)))
    model = TritonModel(spec, weights, device="cpu")
    assert model.layout.ku > 0 and model.layout.x_request is False
    got, bad = model.forward(batch)
    want = ReferenceModel(spec, weights).forward(batch)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert not bad.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dot", "cat", "dcnv2"])
def test_models_without_dense_or_without_sparse(device, kind):
    inter = INTERACTIONS[kind]
    dense_only = ModelSpec("d", (), (), (DenseFeature("a", 5),), (8,), inter, (4, 1))
    sparse_only = ModelSpec("s", (Table("t", 9, 8),), (
        SparseFeature("u", "t", scope="request", max_bag=3),
        SparseFeature("c", "t", max_bag=2)), (), (), inter, (6, 1))
    for spec in (dense_only, sparse_only):
        _check(spec, device, torch.float32, seed=6, sizes=(2, 3))


@pytest.mark.gpu
@pytest.mark.timeout(240)  # (the fused launch tunes its ~20 gather configs anew)
@pytest.mark.parametrize("beside, fused", [(False, False), (True, False), (False, True)],
                         ids=["serial", "bottom-beside-gather", "fused-gather-dot"])
def test_cuda_graph_replay_matches_eager_forward(monkeypatch, beside, fused):
    """The engine's path: batches packed into one slot's fixed bucket buffers (staging),
    autotuned, captured once, replayed after each new pack: the same bits as running the
    same step eagerly (on one stream), and the reference's scores; also with the bottom
    MLP captured on a side stream beside the gather, and with the dot interaction formed
    inside the gather's launch (``set_fused_dot``: the staging's bag bounds split by
    scope, the row counters allocated inside the graph)."""
    import functools

    from recserve.engine.gpu_slots import GpuModel, capture, copy_in, device_step, new_slot
    from recserve.engine.staging import pack, staging_layout

    monkeypatch.setenv("RECSERVE_AUTOTUNE", "1")  # tune over every config (prunes failures)
    spec = _spec("dot")
    rng = np.random.default_rng(12)
    weights = init_weights(spec, 12)
    model = TritonModel(spec, weights, device="cuda")
    model.set_bottom_beside_gather(beside)
    assert model.set_fused_dot(fused) == fused
    bucket, device = 256, torch.device("cuda", 0)
    layout = staging_layout(spec, [names for _, _, names in model.groups], bucket,
                            model.layout.x_request)
    slot = new_slot(layout, device, ("h2d",))
    gpu = GpuModel(spec, model, layout, [slot])
    stream = torch.cuda.current_stream(device)
    sizes = pack(layout, slot.host, [_request(spec, rng, n) for n in (100, 50)], bucket)
    copy_in(slot, sizes.bucket, sizes.nnz, stream)
    graph, scores, bad = capture(functools.partial(device_step, gpu, slot, bucket), slot.pool,
                                 device)
    for counts in ((7, 200), (1, 1, 90)):
        pieces = [_request(spec, rng, n) for n in counts]
        sizes = pack(layout, slot.host, pieces, bucket)
        copy_in(slot, sizes.bucket, sizes.nnz, stream)
        graph.replay()
        model.set_bottom_beside_gather(False)
        want, want_bad = device_step(gpu, slot, bucket)  # eager, same inputs, same configs
        model.set_bottom_beside_gather(beside)
        assert torch.equal(scores, want) and torch.equal(bad, want_bad)
        assert not bad[:len(counts)].any()
        reference = ReferenceModel(spec, weights).forward(collate(spec, pieces))
        torch.testing.assert_close(scores[:sum(counts)].cpu(), reference, atol=2e-2,
                                   rtol=2e-2)

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dot", "dcnv2"])
def test_programmatic_dependent_launch_gives_the_same_bits(monkeypatch, kind):
    """RECSERVE_PDL=1: every kernel launches while the one before it finishes and waits
    before touching memory, so the forward gives the very bits it gives without, eager and
    replayed from a CUDA graph (int8, split-K and interaction kernels included)."""
    from recserve.kernels import _common
    from recserve.kernels.model import capture_graph

    spec = _spec(kind)
    rng = np.random.default_rng(21)
    weights = init_weights(spec, 21)
    batch = collate(spec, [_request(spec, rng, n) for n in (40, 3, 300)])
    model = TritonModel(spec, weights, device="cuda")
    monkeypatch.delenv(_common.PDL_ENV, raising=False)
    want, want_bad = model.forward(batch)
    monkeypatch.setenv(_common.PDL_ENV, "1")
    assert _common.pdl() == (torch.cuda.get_device_capability()[0] >= 9)
    got, bad = model.forward(batch)
    assert torch.equal(got, want) and torch.equal(bad, want_bad)
    prepared = model.prepare(batch)
    graph, (scores, flags) = capture_graph(model.forward_prepared, prepared)
    graph.replay()
    assert torch.equal(scores, want) and torch.equal(flags != 0, want_bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_programmatic_dependent_launch_is_off_without_a_hopper_card(monkeypatch):
    from recserve.kernels import _common

    monkeypatch.setenv(_common.PDL_ENV, "1")
    assert not _common.pdl() and _common.pdl_launch() == {}  # (the interpreter has no PDL)
    spec = _spec("dot")
    _check(spec, "cpu", torch.float32, 3)  # and the kernels run as before
