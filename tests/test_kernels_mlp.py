"""The bottom MLP in one launch (``kernels.mlp``) against its reference and the layer-by-layer
path, its refusals, and the model's forward with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_params import DEVICES
from test_kernels_model import TOL, _request, _spec

from recserve.engine.inputs import collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.weights import init_weights
from recserve.kernels.linear import linear
from recserve.kernels.mlp import MAX_HIDDEN, MAX_K0, fits, fused_mlp, fused_mlp_reference
from recserve.kernels.model import TritonModel


def _layers(dims: tuple[int, ...], dtype: torch.dtype, device: str, seed: int):
    """[(W [N, K] in the model's transposed layout, b [N])] for widths ``dims``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, n in zip(dims[:-1], dims[1:], strict=True):
        w = torch.randn(n, k, generator=gen) / k ** 0.5
        b = torch.randn(n, generator=gen) * 0.1
        out.append((w.to(device, dtype).t().contiguous().t(), b.to(device, dtype)))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(13, 96, 40, 24), (13, 40, 24, 20), (7, 33, 17)],
                         ids=["3-layers", "3-layers-odd", "2-layers"])
@pytest.mark.parametrize("rows", [1, 37])
def test_fused_mlp_matches_the_reference_and_the_layer_by_layer_path(device, dtype, dims, rows):
    """Odd widths (masked chunks), one row and a part-filled last program, written into a
    column slice of a wider poisoned buffer whose other columns stay untouched."""
    layers = _layers(dims, dtype, device, seed=sum(dims) + rows)
    x = torch.randn(rows, dims[0], generator=torch.Generator().manual_seed(rows)).to(device,
                                                                                     dtype)
    wide = torch.full((rows, dims[-1] + 9), float("nan"), device=device, dtype=dtype)
    got = fused_mlp(x, layers, out=wide[:, 4:4 + dims[-1]])
    assert got.data_ptr() == wide[:, 4:].data_ptr()
    assert torch.isnan(wide[:, :4]).all() and torch.isnan(wide[:, 4 + dims[-1]:]).all()
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (3e-2, 2e-2)
    torch.testing.assert_close(got.float(), fused_mlp_reference(x, layers).float(),
                               atol=atol, rtol=rtol)
    h = x
    for w, b in layers:
        h = linear(h, w, b, activation="relu")
    torch.testing.assert_close(got.float(), h.float(), atol=atol, rtol=rtol)
    again = fused_mlp(x, layers)
    assert torch.equal(again, got)  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_fused_mlp_rounds_an_fp32_x_to_the_weights_dtype_as_it_loads(device):
    """fp32 dense inputs with bf16 layers (the engine's staging): the same bits as x
    rounded to bf16 first, the output in bf16."""
    layers = _layers((13, 40, 24, 20), torch.bfloat16, device, seed=3)
    # bf16 values a little off (under half a bf16 step): any rounding gives them back
    rounded = torch.randn(37, 13, generator=torch.Generator().manual_seed(3)).bfloat16()
    x = (rounded.float() * (1 + 2 ** -12)).to(device)
    got = fused_mlp(x, layers)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, fused_mlp(rounded.to(device), layers))
    torch.testing.assert_close(got.float(), fused_mlp_reference(x, layers).float(),
                               atol=3e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="layer 0 weight has dtype torch.bfloat16"):
        fused_mlp(x.half(), layers)


def test_fused_mlp_says_why_it_cannot_take_the_layers():
    f32 = torch.float32
    assert fits(_layers((13, 16, 8), f32, "cpu", 0)) is None
    assert "4 layers" in fits(_layers((13, 16, 16, 16, 8), f32, "cpu", 0))
    assert "1 layers" in fits(_layers((13, 16), f32, "cpu", 0))
    assert f"at most {MAX_K0}" in fits(_layers((MAX_K0 + 1, 16, 8), f32, "cpu", 0))
    assert f"at most {MAX_HIDDEN}" in fits(_layers((13, 16, MAX_HIDDEN + 16), f32, "cpu", 0))
    (w1, b1), (w2, b2) = _layers((13, 16, 8), f32, "cpu", 0)
    assert "takes K = 16; layer 0 gives 12" in fits([(w1[:12], b1[:12]), (w2, b2)])
    assert "needs a bias of 16" in fits([(w1, None), (w2, b2)])
    layers = [(w1, b1), (w2, b2)]
    with pytest.raises(ValueError, match="x has 12 columns; the first layer takes 13"):
        fused_mlp(torch.zeros(3, 12), layers)
    with pytest.raises(ValueError, match=r"out has shape \[3, 9\]; expected \[3, 8\]"):
        fused_mlp(torch.zeros(3, 13), layers, out=torch.zeros(3, 9))
    with pytest.raises(ValueError, match="layer 1 weight"):
        fused_mlp(torch.zeros(3, 13), [(w1, b1), (w2.half(), b2)])
    assert fused_mlp(torch.zeros(0, 13), layers).shape == (0, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, dense_scopes", [("dot", ("request", "candidate")),
                                                ("dcnv2", ("request", "candidate")),
                                                ("dot", ("request", "request"))],
                         ids=["dot", "dcnv2", "dot-dense-per-request"])
def test_model_forward_with_the_bottom_mlp_in_one_launch(device, kind, dense_scopes):
    """The model's forward with ``set_fused_bottom``: the reference's scores, within the
    layer-by-layer forward's rounding, also where the bottom MLP runs once per request."""
    spec = _spec(kind, dense_scopes)
    rng = np.random.default_rng(31)
    weights = init_weights(spec, 31)
    batch = collate(spec, [_request(spec, rng, n) for n in (30, 1, 70)])
    want = ReferenceModel(spec, weights).forward(batch)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = TritonModel(spec, weights, device=device, compute_dtype=dtype)
    plain, _ = model.forward(batch)
    assert model.set_fused_bottom(True)
    got, bad = model.forward(batch)
    assert not bad.any()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got, plain, atol=atol, rtol=rtol)
    assert not model.set_fused_bottom(False)


def test_fused_bottom_is_off_where_the_layers_do_not_fit(monkeypatch):
    """One bottom layer: the model keeps the layer-by-layer path, whatever it was asked;
    ``RECSERVE_FUSED_BOTTOM=1`` turns it on for new models where it fits."""
    from dataclasses import replace

    spec = _spec("dot")
    one_layer = replace(spec, bottom_mlp=(8,))
    model = TritonModel(one_layer, init_weights(one_layer, 1), device="cpu")
    assert not model.set_fused_bottom(True)
    monkeypatch.setenv("RECSERVE_FUSED_BOTTOM", "1")
    assert TritonModel(spec, init_weights(spec, 1), device="cpu")._fused_bottom
    monkeypatch.setenv("RECSERVE_FUSED_BOTTOM", "0")
    assert not TritonModel(spec, init_weights(spec, 1), device="cpu")._fused_bottom


@pytest.mark.gpu
def test_fused_bottom_replays_from_a_cuda_graph_with_the_eager_bits():
    """On the card, every config tuned: the model's forward with the bottom MLP in one
    launch gives the same bits run after run and replayed from a CUDA graph."""
    from recserve.kernels.model import capture_graph

    spec = _spec("dot")
    rng = np.random.default_rng(5)
    weights = init_weights(spec, 5)
    batch = collate(spec, [_request(spec, rng, n) for n in (300, 7, 1000)])
    model = TritonModel(spec, weights, device="cuda")
    assert model.set_fused_bottom(True)
    prepared = model.prepare(batch)
    first, _ = model.forward_prepared(prepared)
    for _ in range(3):
        assert torch.equal(model.forward_prepared(prepared)[0], first)
    graph, (scores, _) = capture_graph(model.forward_prepared, prepared)
    scores.zero_()
    graph.replay()
    assert torch.equal(scores, first)
