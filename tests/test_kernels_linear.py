"""Fused linear, dot interaction and DCNv2 cross kernels vs their plain-torch references."""

from __future__ import annotations

import pytest
import torch
from kernel_params import DEVICES

from recserve.kernels import interaction
from recserve.kernels import linear_configs as configs
from recserve.kernels._common import forget_tuning
from recserve.kernels.interaction import (
    cross_layer,
    cross_layer_reference,
    dest_map,
    dot_interaction,
    dot_interaction_reference,
    pair_columns,
)
from recserve.kernels.linear import linear, linear_reference

# fp32 on the interpreter / GPU (exact fp32 products): summation order only.
FP32_TOL = (2e-5, 2e-5)


def _assert_bf16_close(got: torch.Tensor, ref: torch.Tensor, torch_bf16: torch.Tensor) -> None:
    """bf16 kernels are judged against the fp32 reference relative to torch-bf16's error."""
    own = (torch_bf16.float() - ref).abs().max().item()
    err = (got.float() - ref).abs().max().item()
    assert err <= 2 * own + 1e-3 * ref.abs().max().item(), (err, own)


def _rand(*shape, gen, device, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.25).to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
# k = 128: a multiple of every BLOCK_K, the unmasked EVEN_K loads
@pytest.mark.parametrize("m,n,k", [(1, 5, 3), (37, 70, 50), (64, 130, 129), (16, 40, 128)])
@pytest.mark.parametrize("activation", ["none", "relu", "sigmoid"])
def test_linear_epilogues(device, m, n, k, activation):
    gen = torch.Generator().manual_seed(m * n + k)
    a, w, b = _rand(m, k, gen=gen, device=device), _rand(n, k, gen=gen, device=device), \
        _rand(n, gen=gen, device=device)
    out = torch.full((m, n + 3), float("nan"), device=device)[:, 1:1 + n]
    got = linear(a, w, b, activation=activation, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = linear_reference(a.cpu(), w.cpu(), b.cpu(), activation=activation)
    torch.testing.assert_close(got.cpu(), ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_split_rows_cross_and_final(device):
    gen = torch.Generator().manual_seed(5)
    m, n, k, r, h = 29, 48, 33, 4, 3
    a = _rand(m + 6, k, gen=gen, device=device)
    w, b = _rand(n, k, gen=gen, device=device), _rand(n, gen=gen, device=device)
    a_rows = torch.randperm(m + 6, generator=gen)[:m].to(device)
    add, add_rows = _rand(r, n, gen=gen, device=device), torch.randint(0, r, (m,), generator=gen)
    x0, x = _rand(m, n, gen=gen, device=device), _rand(m, n, gen=gen, device=device)
    final = (_rand(h, n, gen=gen, device=device), _rand(h, gen=gen, device=device),
             torch.tensor([1, 0, 1], dtype=torch.int32, device=device))
    kwargs = {"a_rows": a_rows, "add": add, "add_rows": add_rows.to(device)}
    got = linear(a, w, b, activation="relu", final=final, **kwargs)
    ref = linear_reference(a, w, b, activation="relu", final=final, **kwargs)
    assert got.shape == (m, h) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])
    got = linear(a[:m], w, b, cross=(x0, x))
    torch.testing.assert_close(got, linear_reference(a[:m], w, b, cross=(x0, x)),
                               atol=FP32_TOL[0], rtol=FP32_TOL[1])


BF16_SHAPES = [pytest.param("cpu", 8, 96, 200, marks=DEVICES[0].marks),
               pytest.param("cpu", 37, 70, 50, marks=DEVICES[0].marks)] + [
    pytest.param("cuda", m, n, k, marks=pytest.mark.gpu)
    for m, n, k in [(8, 1024, 3456), (300, 256, 512), (2048, 1024, 1024)]]


@pytest.mark.parametrize("device,m,n,k", BF16_SHAPES)
def test_linear_bf16_within_torch_bf16_error(device, m, n, k):
    gen = torch.Generator().manual_seed(k)
    a, w, b = (_rand(m, k, gen=gen, device=device), _rand(n, k, gen=gen, device=device),
               _rand(n, gen=gen, device=device))
    ref = linear_reference(a, w, b, activation="relu")
    bf = [t.bfloat16() for t in (a, w, b)]
    torch_bf16 = torch.relu(torch.nn.functional.linear(*bf))
    _assert_bf16_close(linear(*bf, activation="relu"), ref, torch_bf16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k", [(37, 13), (64, 130)])
def test_an_fp32_a_is_rounded_to_the_weights_dtype_as_it_loads(device, m, k, monkeypatch):
    """The engine's dense inputs arrive fp32 and the first bottom layer takes them so (no
    kernel to round them first): with the same config, the same bits as rounding A to W's
    dtype beforehand, the output in W's dtype."""
    pinned = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(configs, "candidates", lambda *_, **__: [pinned])
    forget_tuning()
    gen = torch.Generator().manual_seed(m + k)
    # bf16 values a little off (under half a bf16 step, away from zero): any rounding to
    # bf16 (the card's nearest-even, the interpreter's own) gives them back exactly
    rounded = _rand(m, k, gen=gen, device=device).bfloat16()
    a = rounded.float() * (1 + 2 ** -12)
    w, b = _rand(40, k, gen=gen, device=device).bfloat16(), _rand(40, gen=gen, device=device)
    got = linear(a, w, b.bfloat16(), activation="relu")
    want = linear(rounded, w, b.bfloat16(), activation="relu")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_dot_interaction_bf16_within_torch_bf16_error(device):
    gen = torch.Generator().manual_seed(3)
    b, t, d = 7, 27, 64
    v = _rand(b, t * d, gen=gen, device=device)
    pairs = pair_columns(t, False, d)
    out = torch.empty(b, d + len(pairs), device=device, dtype=torch.bfloat16)
    dot_interaction(v.bfloat16(), t, d, dest_map(t, pairs, out.shape[1], device), out, 0)
    ref = dot_interaction_reference(v.reshape(b, t, d), False)
    torch_bf16 = dot_interaction_reference(v.bfloat16().reshape(b, t, d), False).bfloat16()
    _assert_bf16_close(out, ref, torch_bf16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,d", [(2, 4), (5, 37), (27, 16)])
@pytest.mark.parametrize("self_interaction", [False, True])
def test_dot_interaction_reference_order(device, t, d, self_interaction):
    gen = torch.Generator().manual_seed(t * d)
    b = 9
    v = _rand(b, t * d + 5, gen=gen, device=device)  # extra trailing columns are ignored
    pairs = pair_columns(t, self_interaction, d)
    width = d + len(pairs)
    out = torch.full((b, width), float("nan"), device=device)
    dot_interaction(v, t, d, dest_map(t, pairs, width, device), out, x_dest=0)
    ref = dot_interaction_reference(v[:, :t * d].reshape(b, t, d).cpu(), self_interaction)
    torch.testing.assert_close(out.cpu(), ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", interaction.CONFIGS,
                         ids=lambda c: f"rows{c['ROWS']}{'-batched' if c['BATCHED'] else ''}")
@pytest.mark.parametrize("t,d,self_interaction", [(5, 37, True), (27, 64, False)])
def test_every_dot_interaction_config_matches_the_reference(device, config, t, d,
                                                            self_interaction, monkeypatch):
    """Each tuning candidate (the tuner picks one on the card; the interpreter and untuned
    runs take the first): rows one by one, or a program's rows in one batched dot, with a
    last program only partly filled (B = 9) and the columns it must not write left alone."""
    monkeypatch.setattr(interaction, "CONFIGS", [config])
    forget_tuning()
    gen = torch.Generator().manual_seed(t + d)
    b = 9
    v = _rand(b, t * d + 3, gen=gen, device=device)
    pairs = pair_columns(t, self_interaction, d + 2)  # two columns before them left alone
    out = torch.full((b, d + 2 + len(pairs) + 1), float("nan"), device=device)
    dot_interaction(v, t, d, dest_map(t, pairs, out.shape[1], device), out, x_dest=0)
    ref = dot_interaction_reference(v[:, :t * d].reshape(b, t, d).cpu(), self_interaction)
    got = torch.cat([out[:, :d], out[:, d + 2:d + 2 + len(pairs)]], dim=1).cpu()
    torch.testing.assert_close(got, ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])
    untouched = torch.cat([out[:, d:d + 2], out[:, -1:]], dim=1)
    assert bool(untouched.isnan().all())
    forget_tuning()


def test_dot_interaction_offers_only_configs_whose_gram_tiles_fit(monkeypatch):
    """The card stages both operands of a program's Gram dot in shared memory: fp32 rows of
    32 x 128 in a batch of 8 need 262144 bytes (Hopper has 232448) and are not offered;
    a shape no config fits is refused with what to do, not left to the compiler."""
    offered = []  # (what the tuner was offered; nothing launches)
    monkeypatch.setattr(interaction._tuner, "run", lambda key, launch, c: offered.append(c))
    t, d, b = 27, 128, 4

    def offer(dtype):
        v, out = torch.zeros(b, t * d, dtype=dtype), torch.zeros(b, 400, dtype=dtype)
        dot_interaction(v, t, d, dest_map(t, [], 400), out)
        return offered.pop()

    assert offer(torch.bfloat16) == interaction.CONFIGS
    fp32 = offer(torch.float32)
    assert {"ROWS": 8, "BATCHED": True, "num_warps": 8} not in fp32
    assert fp32 == [c for c in interaction.CONFIGS if c["ROWS"] < 8 or not c["BATCHED"]]
    with pytest.raises(ValueError, match="use bf16 or fp16 tables, or fewer or narrower"):
        dot_interaction(torch.zeros(b, 128 * 512), 128, 512, dest_map(128, [], 8),
                        torch.zeros(b, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_dot_interaction_permuted_destinations(device):
    gen = torch.Generator().manual_seed(1)
    b, t, d = 6, 4, 8
    v = _rand(b, t * d, gen=gen, device=device)
    natural = pair_columns(t, False, 0)
    perm = torch.randperm(len(natural), generator=gen).tolist()
    pairs = [(i, j, perm[c]) for i, j, c in natural]
    out = torch.full((b, len(pairs) + d), float("nan"), device=device)
    dot_interaction(v, t, d, dest_map(t, pairs, out.shape[1], device), out, x_dest=len(pairs))
    ref = dot_interaction_reference(v.reshape(b, t, d).cpu(), False, with_x=False)
    torch.testing.assert_close(out[:, perm].cpu(), ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])
    torch.testing.assert_close(out[:, len(pairs):].cpu(), v[:, :d].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_cross_layer(device):
    gen = torch.Generator().manual_seed(2)
    b, width, rank = 11, 40, 7
    x0, x = _rand(b, width, gen=gen, device=device), _rand(b, width, gen=gen, device=device)
    u, v = _rand(rank, width, gen=gen, device=device), _rand(width, rank, gen=gen, device=device)
    bias = _rand(width, gen=gen, device=device)
    got = cross_layer(x0, x, u, v, bias)
    torch.testing.assert_close(got.cpu(), cross_layer_reference(x0, x, u, v, bias).cpu(),
                               atol=FP32_TOL[0], rtol=FP32_TOL[1])


@pytest.mark.parametrize("device", DEVICES)
def test_cross_epilogue_order_gives_identical_bits(device, monkeypatch):
    """x0 and x loaded before the K loop (EPILOGUE_FIRST, a tuning candidate) or after it:
    the same arithmetic, so the same bits."""
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    gen = torch.Generator().manual_seed(4)
    m, n, k = 37, 70, 50
    a, w = _rand(m, k, gen=gen, device=device), _rand(n, k, gen=gen, device=device)
    bias, x0, x = (_rand(*shape, gen=gen, device=device) for shape in ((n,), (m, n), (m, n)))
    base = lc.base_configs(None, m, a.element_size())[0]
    runs = []
    for first in (False, True):
        config = {**base, "EPILOGUE_FIRST": first}
        monkeypatch.setattr(lc, "base_configs", lambda *args, c=config: [c])
        monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [config]))
        runs.append(linear(a, w, bias, cross=(x0, x)))
        assert li._tuner.best[next(iter(li._tuner.best))].get("EPILOGUE_FIRST", False) == first
    want = linear_reference(a, w, bias, cross=(x0, x))
    torch.testing.assert_close(runs[0].cpu(), want.cpu(), atol=FP32_TOL[0], rtol=FP32_TOL[1])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sm,flatten", [(1, True), (3, True), (1, False)])
@pytest.mark.parametrize("epilogue", ["cross", "relu", "final"])
def test_persistent_tiles_give_the_tiled_kernels_bits(device, per_sm, flatten, epilogue,
                                                      monkeypatch):
    """A persistent config (a 1-D grid of PER_SM programs per SM walking the tiles, the
    loops flattened or nested) computes each tile as the tiled kernel does: the same bits,
    whether a program walks several tiles (PER_SM 1: 2 programs under the interpreter for
    4-8 tiles) or the grid is cut to the tile count (PER_SM 3: 6 programs here, for 4 tiles
    of a final layer)."""
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    gen = torch.Generator().manual_seed(per_sm)
    m, n, k = 100, 70 if epilogue != "final" else 24, 50
    a, w = _rand(m, k, gen=gen, device=device), _rand(n, k, gen=gen, device=device)
    bias, x0, x = (_rand(*shape, gen=gen, device=device) for shape in ((n,), (m, n), (m, n)))
    kwargs = {"cross": (x0, x)} if epilogue == "cross" else {"activation": "relu"}
    if epilogue == "final":
        kwargs["final"] = (_rand(2, n, gen=gen, device=device), _rand(2, gen=gen, device=device),
                           torch.tensor([1, 0], dtype=torch.int32, device=device))
    base = lc.base_configs(n if epilogue == "final" else None, m, a.element_size())[0]
    runs = []
    for config in (base, {**base, "PER_SM": per_sm, "FLATTEN": flatten}):
        monkeypatch.setattr(lc, "base_configs", lambda *args, c=config: [c])
        monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [config]))
        runs.append(linear(a, w, bias, **kwargs))
        assert li._tuner.best[next(iter(li._tuner.best))] == config
    want = linear_reference(a, w, bias, **kwargs)
    torch.testing.assert_close(runs[1].cpu(), want.cpu(), atol=FP32_TOL[0], rtol=FP32_TOL[1])
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("flatten", [False, True])
def test_staggered_persistent_tiles_give_the_tiled_kernels_bits(flatten, monkeypatch):
    """STAGGER (the grid's second half waits for the first half's first K loops, through
    flags) changes when tiles run, not what they compute: the tiled kernel's bits, and
    every flag cleared again by the program that waited on it (a graph replays them as
    captured)."""
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    gen = torch.Generator().manual_seed(11)
    m, n, k = 100, 70, 50  # 4 x 2 tiles of 32 x 64 for the interpreter's 4 programs
    a, w = _rand(m, k, gen=gen, device="cpu"), _rand(n, k, gen=gen, device="cpu")
    bias, x0, x = (_rand(*shape, gen=gen, device="cpu") for shape in ((n,), (m, n), (m, n)))
    base = lc.base_configs(None, m, a.element_size())[0]
    runs = []
    for config in (base, {**base, "PER_SM": 2, "FLATTEN": flatten, "STAGGER": True}):
        monkeypatch.setattr(lc, "base_configs", lambda *args, c=config: [c])
        monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [config]))
        runs.append(linear(a, w, bias, cross=(x0, x)))
        assert li._tuner.best[next(iter(li._tuner.best))] == config
    assert torch.equal(runs[0], runs[1])
    from recserve.kernels import stagger

    flags = stagger.stagger_flags(a.device, 4)
    slots = stagger.STAGGER_SLOTS.value
    # every flag cleared, and each waiter found its partner done (the interpreter runs the
    # programs in order), so it waited no extra read; a missing signal would read 64
    assert not flags[:slots].any() and not flags[slots:].any()
    flags[slots:slots + 2] = -1
    linear(a, w, bias, cross=(x0, x))  # (tuned: launched once more)
    assert flags[slots:slots + 2].tolist() == [0, 0]  # both waiters wrote their count
    assert stagger.waits(a.device)[:2].tolist() == [0, 0]
    with pytest.raises(ValueError, match="a staggered grid of 4096 programs needs more"):
        stagger.stagger_flags(a.device, 4096)  # more waiters than flags: refused, not wrapped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subtile", [2, 4])
@pytest.mark.parametrize("epilogue", ["cross", "relu", "add"])
def test_sliced_epilogues_give_the_whole_tile_s_bits(device, subtile, epilogue, monkeypatch):
    """SUBTILE walks a tile's epilogue in 2 or 4 column slices, each loading its own bias,
    add rows and x0 / x: the same arithmetic per element, so the same bits as the whole
    tile's epilogue, ragged edges (M, N not multiples of the tile) included."""
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    gen = torch.Generator().manual_seed(subtile)
    m, n, k = 100, 70, 50  # 4 x 2 tiles of 32 x 64 under the interpreter: the right ragged
    a, w = _rand(m, k, gen=gen, device=device), _rand(n, k, gen=gen, device=device)
    bias, x0, x = (_rand(*shape, gen=gen, device=device) for shape in ((n,), (m, n), (m, n)))
    kwargs = {"cross": (x0, x)} if epilogue == "cross" else {"activation": "relu"}
    if epilogue == "add":  # the request-scope half of a split layer, broadcast to rows
        kwargs["add"] = _rand(3, n, gen=gen, device=device)
        kwargs["add_rows"] = torch.arange(m, device=device, dtype=torch.int32) % 3
    base = lc.base_configs(None, m, a.element_size())[0]
    runs = []
    for config in (base, {**base, "SUBTILE": subtile}):
        monkeypatch.setattr(lc, "candidates", lambda *args, c=config, **kw: [c])
        monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [config]))
        out = torch.full((m, n), float("nan"), device=device)  # poisoned: all written
        runs.append(linear(a, w, bias, out=out, **kwargs))
        assert li._tuner.best[next(iter(li._tuner.best))] == config
    want = linear_reference(a, w, bias, **kwargs)
    torch.testing.assert_close(runs[1].cpu(), want.cpu(), atol=FP32_TOL[0], rtol=FP32_TOL[1])
    assert torch.equal(runs[0], runs[1])


def _same_bits_on_the_card_as(config: dict, plain: dict, seed: int, monkeypatch) -> None:
    """``config`` and ``plain`` (the same tile without the candidate's feature) on a cross
    layer as the card tunes it (bf16, K = 512 like DCNv2's V; 520 or more tiles of 64 or
    128, ragged in M and N): the same bits, and the reference's values within bf16's
    error."""
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    gen = torch.Generator().manual_seed(seed)
    m, n, k = 4133, 1000, 512
    dev, bf = "cuda", torch.bfloat16
    a, w = _rand(m, k, gen=gen, device=dev, dtype=bf), _rand(n, k, gen=gen, device=dev, dtype=bf)
    bias, x0, x = (_rand(*shape, gen=gen, device=dev, dtype=bf)
                   for shape in ((n,), (m, n), (m, n)))
    runs = []
    for cfg in (plain, config):
        monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [cfg]))
        monkeypatch.setattr(lc, "candidates", lambda *args, c=cfg, **kw: [c])
        runs.append(linear(a, w, bias, cross=(x0, x)))
        assert li._tuner.best[next(iter(li._tuner.best))] == cfg
    assert torch.equal(runs[0], runs[1])
    want = linear_reference(a, w, bias, cross=(x0, x))
    torch_bf16 = x0 * (a @ w.T + bias) + x
    _assert_bf16_close(runs[1], want, torch_bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(configs.DEEP_PIPELINE_CONFIGS)))
def test_deep_pipelines_give_the_4_stage_bits_on_the_card(index, monkeypatch):
    """Each deep-pipeline candidate on a layer it is tuned for (few rows, K = 3456 like
    DCNv2's U at B=512, ragged in M and N) against the same tile with 4 stages: the same
    bits, and the reference's values within bf16's error."""
    from recserve.kernels import linear as li

    config = configs.DEEP_PIPELINE_CONFIGS[index]
    gen = torch.Generator().manual_seed(index)
    m, n, k = 517, 1000, 3456
    dev, bf = "cuda", torch.bfloat16
    a, w = _rand(m, k, gen=gen, device=dev, dtype=bf), _rand(n, k, gen=gen, device=dev, dtype=bf)
    bias = _rand(n, gen=gen, device=dev, dtype=bf)
    runs = []
    for cfg in ({**config, "num_stages": 4}, config):
        monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [cfg]))
        monkeypatch.setattr(configs, "candidates", lambda *args, c=cfg, **kw: [c])
        runs.append(linear(a, w, bias, activation="relu"))
        assert li._tuner.best[next(iter(li._tuner.best))] == cfg
    assert torch.equal(runs[0], runs[1])
    want = linear_reference(a, w, bias, activation="relu")
    _assert_bf16_close(runs[1], want, torch.relu(a @ w.T + bias))


@pytest.mark.gpu
def test_tuning_reads_each_candidate_s_register_spills_on_the_card(monkeypatch):
    """The tuner passes over configs that spill by reading ``n_spills`` off what a launch
    returns: on the card each timed candidate's launch must return Triton's compiled
    kernel with it (or the rule would be silently off), and a large-tile cross layer's
    whole 256x128 tile is among those that spill (Triton 3.6, sm_90), so it is not the pick."""
    from recserve.kernels import _common
    from recserve.kernels import linear as li

    monkeypatch.setenv("RECSERVE_AUTOTUNE", "1")
    monkeypatch.delenv(_common.TUNE_BY_ENV, raising=False)
    monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", configs.GPU_CONFIGS))
    whole = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    small = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    monkeypatch.setattr(configs, "candidates", lambda *args, **kw: [whole, small])  # 2 compiles
    seen = []
    real = _common.spills
    monkeypatch.setattr(_common, "spills", lambda launched: seen.append(launched)
                        or real(launched))
    gen = torch.Generator().manual_seed(7)
    m, n, k, dev, bf = 2048, 3456, 512, "cuda", torch.bfloat16
    h, v = _rand(m, k, gen=gen, device=dev, dtype=bf), _rand(n, k, gen=gen, device=dev, dtype=bf)
    bias = _rand(n, gen=gen, device=dev, dtype=bf)
    x0, x = (_rand(m, n, gen=gen, device=dev, dtype=bf) for _ in range(2))
    linear(h, v, bias, cross=(x0, x))
    assert len(seen) == 2 and all(isinstance(s.n_spills, int) for s in seen)
    key = next(iter(li._tuner.best))
    assert li._tuner.spilled[key] == [whole] and li._tuner.best[key] == small


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(configs.SUBTILE_CROSS_CONFIGS)))
def test_sliced_cross_configs_give_the_whole_tile_s_bits_on_the_card(index, monkeypatch):
    """Each sliced cross candidate against the same tile with its whole epilogue at once."""
    config = configs.SUBTILE_CROSS_CONFIGS[index]
    whole = {key: v for key, v in config.items() if key != "SUBTILE"}
    _same_bits_on_the_card_as(config, whole, index, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(len(configs.PERSISTENT_CROSS_CONFIGS)))
def test_persistent_cross_configs_walk_many_tiles_on_the_card(index, monkeypatch):
    """Each persistent candidate, on more tiles than its grid has programs, against the
    tiled kernel with the same tile."""
    config = configs.PERSISTENT_CROSS_CONFIGS[index]
    tiled = {key: v for key, v in config.items() if key not in ("PER_SM", "STAGGER")}
    _same_bits_on_the_card_as(config, tiled, index, monkeypatch)


def test_large_split_k_tiles_join_plain_layers_with_few_rows_and_a_long_k(monkeypatch):
    from recserve.kernels import _common
    from recserve.kernels import linear_configs as lc

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv(_common.TRIAL_ENV, "1")  # (a trial candidate)

    def large(m, k, **flags):
        got = lc.candidates(m, 512, k, 2, **{"final": False, "cross": False, "plain": True,
                                            **flags})
        return [c for c in got if c["BLOCK_M"] == 128 and c.get("SPLIT_K", 1) > 1]

    assert large(512, 3456) == lc.SPLIT_K_TILES
    assert large(2048, 3456) == [] and large(512, 512) == []
    assert large(512, 3456, plain=False) == []
    monkeypatch.setenv(_common.TRIAL_ENV, "0")
    assert large(512, 3456) == []  # serving's default: not tried


def test_deep_pipelines_join_long_k_layers_with_few_rows_when_asked(monkeypatch):
    from recserve.kernels import _common
    from recserve.kernels import linear_configs as lc

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv(_common.TRIAL_ENV, "1")  # (a trial candidate)

    def deep(m, k, elsize=2, **flags):
        got = lc.candidates(m, 512, k, elsize, **{"final": False, "cross": False,
                                                   "plain": True, **flags})
        return [c for c in got if c["num_stages"] > 4]

    assert deep(512, 3456) == lc.DEEP_PIPELINE_CONFIGS  # unsplit: no split-K copies
    assert deep(512, 3456, plain=False) == lc.DEEP_PIPELINE_CONFIGS  # (an added half too)
    assert deep(2048, 3456) == [] and deep(512, 512) == []
    assert deep(512, 3456, final=True) == []
    # fp32 operands: only the one whose buffers still fit Hopper's shared memory
    assert deep(512, 3456, elsize=4) == [c for c in lc.DEEP_PIPELINE_CONFIGS if lc.fits(c, 4)]
    assert 0 < len(deep(512, 3456, elsize=4)) < len(lc.DEEP_PIPELINE_CONFIGS)
    monkeypatch.setenv(_common.TRIAL_ENV, "0")
    assert deep(512, 3456) == []  # serving's default: not tried


def test_persistent_candidates_join_cross_layers_above_1024_rows(monkeypatch):
    """With the trial candidates on, cross layers above 1024 rows (DCNv2's V at the large
    buckets) tune the persistent configs beside the tiled ones; other layers and smaller
    batches do not, and serving's default tunes none. The sliced-epilogue ones join those
    layers always (the whole large tiles spill there, so the tuner passes them over)."""
    from recserve.kernels import _common
    from recserve.kernels import linear_configs as lc

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv(_common.TRIAL_ENV, "1")

    def persistent(m, **flags):
        got = lc.candidates(m, 3456, 512, 2, **{"final": False, "cross": False, "plain": False,
                                               **flags})
        return [c for c in got if "PER_SM" in c]

    assert persistent(8192, cross=True) == lc.PERSISTENT_CROSS_CONFIGS
    assert persistent(1024, cross=True) == []
    assert persistent(8192, plain=True) == []

    def sliced(m, **flags):  # (the sliced epilogue: never with the epilogue loaded first)
        got = lc.candidates(m, 3456, 512, 2, **{"final": False, "cross": False, "plain": False,
                                               **flags})
        return [c for c in got if "SUBTILE" in c]

    assert sliced(8192, cross=True) == lc.SUBTILE_CROSS_CONFIGS
    assert sliced(1024, cross=True) == [] and sliced(8192, plain=True) == []
    monkeypatch.delenv(_common.TRIAL_ENV)
    assert persistent(8192, cross=True) == []
    assert sliced(8192, cross=True) == lc.SUBTILE_CROSS_CONFIGS and sliced(1024, cross=True) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [2, 3, 8])
def test_split_k_matches_the_reference_and_repeats_its_bits(device, split, monkeypatch):
    """K in slices on separate programs, then an ordered sum (small-batch candidates): the
    last slice is short (K = 300 is no multiple of the slices; with 8 slices of one 64-wide
    step, the last three are empty and add zeros), bias and ReLU applied once."""
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    gen = torch.Generator().manual_seed(split)
    m, n, k = 37, 70, 300
    a, w = _rand(m, k, gen=gen, device=device), _rand(n, k, gen=gen, device=device)
    bias = _rand(n, gen=gen, device=device)
    config = {**lc.base_configs(None, m, a.element_size())[0], "SPLIT_K": split}
    monkeypatch.setattr(lc, "base_configs", lambda *args: [config])
    monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [config]))
    got = linear(a, w, bias, activation="relu")
    assert li._tuner.best[next(iter(li._tuner.best))]["SPLIT_K"] == split
    want = linear_reference(a, w, bias, activation="relu")
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=FP32_TOL[0], rtol=FP32_TOL[1])
    assert torch.equal(linear(a, w, bias, activation="relu"), got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [2, 3, 8])
def test_grouped_programs_cover_every_tile_once_with_the_same_bits(device, group,
                                                                    monkeypatch):
    """Programs renumbered in groups of M tiles (``GROUP_M``): 5 M tiles (groups of 2 or
    3 leave a short last group; 8 is larger than the grid) by 3 N tiles, each written once
    (a poisoned output), with the bits of the same config in launch order."""
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    gen = torch.Generator().manual_seed(group)
    base = lc.base_configs(None, 153, 4)[0]
    m, n, k = 4 * base["BLOCK_M"] + 7, 2 * base["BLOCK_N"] + 9, 50  # 5 x 3 tiles
    a, w = _rand(m, k, gen=gen, device=device), _rand(n, k, gen=gen, device=device)
    bias = _rand(n, gen=gen, device=device)
    results = []
    for config in (base, {**base, "GROUP_M": group}):
        monkeypatch.setattr(lc, "base_configs", lambda *args, c=config: [c])
        monkeypatch.setattr(li, "_tuner", li.SafeTuner("linear", [config]))
        out = torch.full((m, n), float("nan"), device=device)
        results.append(linear(a, w, bias, activation="relu", out=out))
    assert not results[1].isnan().any()
    assert torch.equal(results[0], results[1])


def test_grouped_configs_join_plain_layers_with_many_rows_and_a_long_k(monkeypatch):
    """GROUP_M copies of each config whose tile leaves 2+ N tiles, for plain layers above
    1024 rows with K >= 1024 (U and the first top layers at large batches) only."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)

    def grouped(m, n, k, **flags):
        got = configs.candidates(m, n, k, 2, **{"final": False, "cross": False,
                                                 "plain": True, **flags})
        return [c for c in got if "GROUP_M" in c]

    some = grouped(8192, 512, 3456)
    assert some and all(c["BLOCK_N"] < 512 and c["GROUP_M"] == configs.GROUP_M for c in some)
    plain = {tuple(sorted(c.items())) for c in configs.base_configs(None, 8192, 2)
             if c["BLOCK_N"] < 512}
    assert {tuple(sorted((k, v) for k, v in c.items() if k != "GROUP_M")) for c in some} \
        == plain
    assert grouped(512, 512, 3456) == [] and grouped(8192, 3456, 512) == []
    assert grouped(8192, 512, 3456, plain=False) == []
    assert grouped(8192, 64, 3456) == []  # (one N tile: nothing to group)


def test_launchers_reject_bad_arguments():
    a, w = torch.zeros(4, 6), torch.zeros(5, 7)
    with pytest.raises(ValueError, match=r"a has shape \[4, 6\] but weight has \[5, 7\]"):
        linear(a, w)
    with pytest.raises(ValueError, match="activation is 'gelu'"):
        linear(a, torch.zeros(5, 6), activation="gelu")
    with pytest.raises(ValueError, match="weight has dtype torch.float16"):
        linear(a.bfloat16(), torch.zeros(5, 6, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight has dtype torch.float32"):
        linear(a.half(), torch.zeros(5, 6))  # (only an fp32 A is rounded as it loads)
    with pytest.raises(ValueError, match=r"out has shape \[4, 4\]; expected \[4, 5\]"):
        linear(a, torch.zeros(5, 6), out=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="outside T=3"):
        dest_map(3, [(3, 0, 0)], 10)
    with pytest.raises(ValueError, match=r"v has shape \[2, 5\]"):
        dot_interaction(torch.zeros(2, 5), 3, 2, dest_map(3, [], 4), torch.zeros(2, 4))


def test_gpu_configs_fit_shared_memory_per_operand_size(monkeypatch):
    """The card's candidates: large-M and small-M sets, and no config whose pipeline
    buffers overflow 227 KB for the operand size (fp32 drops the largest tiles)."""
    from recserve.kernels import _common
    from recserve.kernels.linear_configs import base_configs

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    big = {(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) for c in base_configs(None, 8192, 2)}
    assert (128, 256, 4) in big and (256, 128, 3) in big
    assert all(c["BLOCK_M"] <= 64 for c in base_configs(None, 512, 2))
    fp32 = {(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"]) for c in base_configs(None, 8192, 4)}
    assert (128, 256, 4) not in fp32 and (128, 128, 3) in fp32
    final = base_configs(256, 8192, 2)
    assert final and all(c["BLOCK_N"] == 256 and c["BLOCK_M"] <= 64 for c in final)


def test_cross_layer_trial_candidates_join_only_when_asked(monkeypatch):
    """With ``RECSERVE_TRIAL_CONFIGS=1`` (kernel_variants.py --trial-configs) cross layers
    also tune ``CROSS_CANDIDATES`` above 1024 rows and ``SMALL_M_CROSS_TILES`` up to 1024,
    each in both epilogue orders; serving's default tunes neither (each would add compiles
    to every start, and neither won on the H200)."""
    from recserve.kernels import _common
    from recserve.kernels import linear as li
    from recserve.kernels import linear_configs as lc

    seen = []  # (what the tuner was offered; nothing launches)
    monkeypatch.setattr(li._tuner, "run", lambda key, launch, candidates: seen.append(
        candidates))
    k, n = 32, 48
    w = torch.randn(n, k)

    def call(m):
        x0, x = torch.randn(m, n), torch.randn(m, n)
        li.linear(torch.randn(m, k), w, torch.randn(n), cross=(x0, x))
        return seen.pop()

    monkeypatch.delenv(_common.TRIAL_ENV, raising=False)
    base, small_base = call(2048), call(1024)
    monkeypatch.setenv(_common.TRIAL_ENV, "1")
    extended = call(2048)
    extra = [c for c in extended if c not in base and "PER_SM" not in c and "SUBTILE" not in c]
    assert len(extra) == 2 * len(lc.CROSS_CANDIDATES)  # each in both epilogue orders
    assert {c.get("EPILOGUE_FIRST", False) for c in extra} == {False, True}
    small = call(1024)  # small M: none of them, but the small-M cross tiles, both orders
    assert not any(c in small for c in extra)
    assert [c for c in small if c not in small_base] == [
        {**t, **order} for order in ({}, {"EPILOGUE_FIRST": True}) for t in lc.SMALL_M_CROSS_TILES]


def test_cublas_joins_plain_long_k_layers_with_few_rows_only_when_timed_in_a_graph(monkeypatch):
    """The cuBLAS candidate: plain layers torch's addmm takes, few rows, a long K, and only
    where candidates are timed in a CUDA graph (an eager timing at B=512 is the launch,
    which torch makes shorter than Triton)."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)

    def library(m, k, method, **flags):
        monkeypatch.setenv(_common.TUNE_BY_ENV, method)
        got = configs.candidates(m, 512, k, 2, **{"final": False, "cross": False,
                                                   "plain": True, "library": True, **flags})
        return [c for c in got if c.get("CUBLAS")]

    assert library(512, 3456, "graph") == [configs.CUBLAS]
    assert library(512, 3456, "auto") == [configs.CUBLAS]
    assert library(512, 3456, "eager") == []
    assert library(2048, 3456, "graph") == [] and library(512, 512, "graph") == []
    assert library(512, 3456, "graph", plain=False) == []
    assert library(512, 3456, "graph", library=False) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,with_bias", [("relu", True), ("none", True),
                                                  ("relu", False), ("sigmoid", True)])
def test_cublas_candidate_computes_the_layer(device, dtype, activation, with_bias, monkeypatch):
    """The cuBLAS launch (torch's CPU GEMM on the interpreter's hosts) writes the layer into
    a strided ``out``: bias, activation and all; a second call gives the same bits."""
    from recserve.kernels import _common
    from recserve.kernels import linear as li

    monkeypatch.setattr(li, "_tuner", _common.SafeTuner("linear", configs.GPU_CONFIGS))
    monkeypatch.setattr(configs, "candidates", lambda *args, **kw: [configs.CUBLAS])
    gen = torch.Generator().manual_seed(9)
    m, n, k = 37, 70, 130
    a, w = _rand(m, k, gen=gen, device=device, dtype=dtype), _rand(n, k, gen=gen, device=device)
    w = w.to(dtype).t().contiguous().t()  # (torch's Linear layout, as the model stores it)
    b = _rand(n, gen=gen, device=device, dtype=dtype) if with_bias else None
    out, again = (torch.full((m, n + 3), float("nan"), dtype=dtype, device=device)[:, 1:1 + n]
                  for _ in range(2))
    got = linear(a, w, b, activation=activation, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    assert li._tuner.best[next(iter(li._tuner.best))] == configs.CUBLAS
    assert torch.equal(linear(a, w, b, activation=activation, out=again), got)
    a, w, b, got = (t.cpu() if t is not None else None for t in (a, w, b, got))
    ref = linear_reference(a, w, b, activation=activation)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])
    else:
        torch_bf16 = linear_reference(a, w, b, activation=activation).to(torch.bfloat16)
        _assert_bf16_close(got, ref, torch_bf16)


def test_a_cublas_pick_is_not_shared_with_a_bias_of_another_dtype(monkeypatch):
    """The same layer with a bias of A's dtype (cuBLAS may take it) and with an fp32 one
    (torch's addmm would refuse it): two tuning keys, so the second call never launches the
    first's cuBLAS pick."""
    from recserve.kernels import _common
    from recserve.kernels import linear as li

    monkeypatch.setattr(li, "_tuner", _common.SafeTuner("linear", configs.GPU_CONFIGS))
    monkeypatch.setattr(configs, "candidates", lambda *args, library, **kw: (
        [configs.CUBLAS] if library else configs.CPU_CONFIGS))
    gen = torch.Generator().manual_seed(4)
    a = _rand(9, 40, gen=gen, device="cpu", dtype=torch.bfloat16)
    w = _rand(24, 40, gen=gen, device="cpu", dtype=torch.bfloat16).t().contiguous().t()
    bias = _rand(24, gen=gen, device="cpu")
    first = linear(a, w, bias.to(torch.bfloat16), activation="relu")
    second = linear(a, w, bias, activation="relu")
    assert sorted(map(str, li._tuner.best.values())) == sorted(
        map(str, [configs.CUBLAS, configs.CPU_CONFIGS[0]]))
    ref = linear_reference(a, w, bias, activation="relu")
    _assert_bf16_close(first, ref, ref.to(torch.bfloat16))
    _assert_bf16_close(second, ref, ref.to(torch.bfloat16))
