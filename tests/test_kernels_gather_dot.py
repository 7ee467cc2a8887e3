"""The fused gather + dot interaction (``kernels.gather_dot``) against the two-launch path
(gather, then the dot kernel) and the references.

On CPU the interpreter runs a launch's programs one after another in grid order, so the
program that completes a row is the last of the row's programs to run; a Gram formed
before every bag of its row is pooled would read the NaN the output was poisoned with.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from kernel_params import DEVICES
from test_kernels_embedding_bag import _csr, _requests, _tables
from test_kernels_model import _request

from recserve.engine.inputs import collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, Output, SparseFeature, Table
from recserve.engine.weights import init_weights
from recserve.kernels import embedding_bag as eb
from recserve.kernels.embedding_bag import (
    BagFeature,
    PackedTables,
    embedding_bag,
    embedding_bag_reference,
)
from recserve.kernels.gather_dot import GROUP, ThenDot, counters
from recserve.kernels.interaction import (
    dest_map,
    dot_interaction,
    dot_interaction_reference,
    pair_columns,
)
from recserve.kernels.model import TritonModel

D = 40  # two chunks of the fused Gram (CHUNK 32), the second ragged
# x (written before the launch), then three features: a long bag (max_bag >= LANES), a
# weighted short one and a mean-pooled short one
FEATURES = (BagFeature(0, 1 * D, max_bag=40), BagFeature(1, 2 * D, weighted=True, max_bag=3),
            BagFeature(2, 3 * D, mean=True, max_bag=5))
T = 1 + len(FEATURES)


def _launch_both(device: str, dtype: torch.dtype, num_rows: int, seed: int, corrupt=None,
                 e_dtype: torch.dtype = torch.float32):
    """One input through the fused launch and through gather-then-dot: returns both runs'
    (E, z, bad), the counters after the fused launch, and z from the fp32 references.
    ``e_dtype``: E's and z's (the model's compute dtype)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [50, 20, 7]
    stored, scales, shifts, exact = _tables(dtype, [D] * 3, rows, gen)
    request_offsets, row_request = _requests(num_rows, gen)
    indices, offsets = _csr(FEATURES, rows, num_rows, len(request_offsets) - 1, gen,
                            torch.int64)
    if corrupt is not None:
        corrupt(indices, offsets)
    weights = torch.rand(indices.shape[0], generator=gen)
    x = torch.rand(num_rows, D, generator=gen) - 0.5
    packed = PackedTables([t.to(device) for t in stored],
                          [s.to(device) for s in scales] if scales else None,
                          [s.to(device) for s in shifts] if shifts else None)
    # pairs in reverse order and x last, so the map's columns matter
    natural = pair_columns(T, False, 0)
    pairs = [(i, j, len(natural) - 1 - c) for i, j, c in natural]
    width = len(pairs) + D
    dest = dest_map(T, pairs, width, device)
    runs, counts = [], counters(num_rows, device)
    for fused in (True, False):
        e = torch.full((num_rows, T * D), float("nan"), device=device, dtype=e_dtype)
        e[:, :D] = x.to(device)
        z = torch.full((num_rows, width), float("nan"), device=device, dtype=e_dtype)
        then = ThenDot(T, D, dest, z, len(pairs), counts) if fused else None
        bad = embedding_bag(packed, FEATURES, indices.to(device), offsets.to(device), e,
                            weights=weights.to(device), row_request=row_request.to(device),
                            request_offsets=request_offsets.to(device), then_dot=then)
        if not fused:
            dot_interaction(e, T, D, dest, z, len(pairs))
        runs.append((e.cpu(), z.cpu(), bad.cpu()))
    pooled, _ = embedding_bag_reference(exact, FEATURES, indices, offsets, num_rows,
                                        weights=weights, request_offsets=request_offsets)
    vectors = torch.stack([x] + pooled, dim=1)
    want = dot_interaction_reference(vectors, self_interaction=False, with_x=False)
    want_z = torch.empty(num_rows, width)
    want_z[:, [c for _, _, c in pairs]] = want
    want_z[:, len(pairs):] = x
    return runs, counts.cpu(), want_z


def _only_gram_rows(monkeypatch, gram_rows: int) -> None:
    """Make the fused launch's first candidate (the one the interpreter runs) form its rows'
    Grams ``gram_rows`` at a time (1: row by row), with no pick kept from another test."""
    monkeypatch.setattr(eb, "_dot_tuner", eb.SafeTuner("_dot_tuner", eb.CONFIGS))
    if gram_rows > 1:
        monkeypatch.setattr(ThenDot, "candidates", staticmethod(
            lambda gather: [{**c, "GRAM_ROWS": gram_rows} for c in gather]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gram_rows", [1, 4], ids=["row-by-row", "4-rows-a-product"])
@pytest.mark.parametrize("config", [0, 3, 4, 5], ids=["bags16", "lanes8", "bags4", "unroll2"])
def test_fused_launch_matches_the_two_launches(monkeypatch, device, config, gram_rows):
    """Every row's Gram is formed once all of its bags are pooled, whatever the config's
    bags per program and long-bag lanes, row by row or 4 rows a product: E and the bad flags
    equal the two launches' bit for bit, z theirs up to the sums' order (the fused Gram adds
    32 columns at a time) and the reference's, and the counters are back at zero (3 blocks
    of the program order, the last ragged)."""
    monkeypatch.setattr(eb, "CONFIGS", [eb.CONFIGS[config]])
    for name in ("_tuner", "_dot_tuner"):  # (tuned picks are kept per key, not per config)
        monkeypatch.setattr(eb, name, eb.SafeTuner(name, eb.CONFIGS))
    _only_gram_rows(monkeypatch, gram_rows)
    num_rows = 2 * GROUP + 5
    (fused, plain), counts, want_z = _launch_both(device, torch.float32, num_rows, seed=config)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[2], plain[2])
    assert not fused[1].isnan().any() and not fused[2].any()
    torch.testing.assert_close(fused[1], plain[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused[1], want_z, atol=1e-5, rtol=1e-5)
    assert counts.shape == (num_rows,) and not counts.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gram_rows", [1, 4], ids=["row-by-row", "4-rows-a-product"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_fused_launch_reads_every_table_dtype(monkeypatch, device, dtype, gram_rows):
    """bf16 rows and int8 row-wise rows (dequantized inline) through the fused launch."""
    _only_gram_rows(monkeypatch, gram_rows)
    (fused, plain), counts, want_z = _launch_both(device, dtype, GROUP + 1, seed=3)
    assert torch.equal(fused[0], plain[0]) and not counts.any()
    torch.testing.assert_close(fused[1], plain[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused[1], want_z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gram_rows", [1, 4], ids=["row-by-row", "4-rows-a-product"])
def test_fused_launch_flags_a_bad_id_and_still_forms_every_row(monkeypatch, device,
                                                               gram_rows):
    _only_gram_rows(monkeypatch, gram_rows)

    def corrupt(indices, offsets):
        # row 0's bag of feature 2 (max_bag long): its first id one past table 2's rows
        indices[int(offsets[len(offsets) // 3 * 2])] = 7

    num_rows = GROUP + 3
    (fused, plain), counts, _ = _launch_both(device, torch.float32, num_rows, seed=11,
                                             corrupt=corrupt)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[2], plain[2])
    torch.testing.assert_close(fused[1], plain[1], atol=1e-6, rtol=1e-6)
    assert fused[2].sum() == 1  # row 0's request alone
    assert not fused[1].isnan().any() and not counts.any()


def test_fused_launch_refuses_what_it_cannot_form():
    packed = PackedTables([torch.zeros(5, D), torch.zeros(5, 2 * D)])
    dest = dest_map(2, pair_columns(2, False, 0), 1 + D)
    e = torch.zeros(4, 2 * D)
    z = torch.zeros(4, 1 + D)
    indices, offsets = torch.zeros(0, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
    cases = [
        ((BagFeature(0, D, request_scope=True),), counters(4, "cpu"), "request scope"),
        ((BagFeature(1, 0),), counters(4, "cpu"), f"has dim {2 * D}"),
        ((BagFeature(0, D),), torch.zeros(0, dtype=torch.int32), "counts must be"),
    ]
    for features, counts, message in cases:
        then = ThenDot(2, D, dest, z, 1, counts)
        offs = offsets[:2] if features[0].request_scope else offsets
        with pytest.raises(ValueError, match=message):
            embedding_bag(packed, features, indices, offs, e, then_dot=then,
                          request_offsets=torch.tensor([0, 4]),
                          row_request=torch.zeros(4, dtype=torch.int64))


def _mixed_spec(dense_scopes: tuple[str, ...] = ("request", "candidate")) -> ModelSpec:
    """A dot model whose largest group (table a, fp32) holds candidate- and request-scope
    features, a long-bag one among them, beside a bf16 group."""
    tables = (Table("a", 50, D), Table("e", 11, D, "bf16"))
    sparse = (SparseFeature("hist", "a", scope="request", max_bag=40, pooling="mean"),
              SparseFeature("seen", "a", max_bag=20),
              SparseFeature("country", "a", scope="request", max_bag=2),
              SparseFeature("genre", "e", max_bag=20, pooling="mean"),
              SparseFeature("item", "a", max_bag=3, weighted=True))
    dense = tuple(DenseFeature(f"d{i}", 3 + i, scope=s) for i, s in enumerate(dense_scopes))
    return ModelSpec("mixed", tables, sparse, dense, (16, D), Interaction("dot"), (24, 12, 2),
                     (Output("click"), Output("watch", "logit")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dense,gram_rows", [(("request", "candidate"), 1),
                                             (("request", "request"), 1),
                                             (("request", "candidate"), 4)],
                         ids=["x-per-row", "x-per-request", "x-per-row-4-rows-a-product"])
def test_model_fused_forward_gives_the_same_scores(monkeypatch, device, dense, gram_rows):
    """The fused table group's request-scope features go in a plain launch first, then its
    candidate-scope ones with the interaction; the scores are the two-launch path's (up to
    the Gram's order of sums) and the reference's, and a bad id still fails its request
    alone."""
    _only_gram_rows(monkeypatch, gram_rows)
    spec = _mixed_spec(dense)
    rng = np.random.default_rng(5)
    weights = init_weights(spec, 5)
    requests = [_request(spec, rng, n) for n in (3, 17, 1, 20)]
    assert len(requests[1].sparse["item"].values) > 0
    requests[1].sparse["item"].values[0] = 50  # one past table a's rows
    batch = collate(spec, requests)
    model = TritonModel(spec, weights, device=device, compute_dtype=torch.float32)
    plain, plain_bad = model.forward(batch)
    assert model.set_fused_dot(True) and model._fused == 0
    fused, bad = model.forward(batch)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    assert torch.equal(bad, plain_bad)
    assert bad.tolist() == [False, True, False, False]
    keep = torch.ones(41, dtype=torch.bool)
    keep[3:20] = False  # the second request's rows
    want = ReferenceModel(spec, weights).forward(collate(spec, requests[:1] + requests[2:]))
    torch.testing.assert_close(fused.cpu()[keep], want, atol=2e-5, rtol=0)


def test_model_fuses_only_dot_models_with_candidate_bags(monkeypatch):
    spec = _mixed_spec()
    cat = replace(spec, interaction=Interaction("cat"))
    request_only = replace(spec, sparse=tuple(replace(f, scope="request")
                                              for f in spec.sparse))
    for other in (cat, request_only):
        model = TritonModel(other, init_weights(other, 1), device="cpu")
        assert not model.set_fused_dot(True) and model._fused is None
    model = TritonModel(spec, init_weights(spec, 1), device="cpu")
    assert model._fused is None  # off by default
    assert model.set_fused_dot(True) and not model.set_fused_dot(False)
    monkeypatch.setenv("RECSERVE_FUSED_DOT", "1")  # on for every new model, a server's too
    assert TritonModel(spec, init_weights(spec, 1), device="cpu")._fused == 0


@pytest.mark.gpu
# Its own limit: it compiles and times every gather config twice (plain and fused, about 20
# each), beside gpu_check's other test workers, over the 60 s a GPU test gets.
@pytest.mark.timeout(240)
def test_fused_forward_on_the_card_is_deterministic_and_matches(monkeypatch):
    """On the card, where programs run at once and the counters' ordering matters: every
    gather config tuned (the tuner drops any whose bits differ from the first's), the
    fused forward gives the same bits run after run, eager and replayed from a CUDA graph,
    and the two-launch path's scores (the Gram's sums in 32-column chunks, bf16 out)."""
    from recserve.kernels.model import capture_graph

    monkeypatch.setenv("RECSERVE_AUTOTUNE", "1")
    spec = _mixed_spec()
    rng = np.random.default_rng(8)
    weights = init_weights(spec, 8)
    batch = collate(spec, [_request(spec, rng, n) for n in (300, 7, 1000, 41)])
    model = TritonModel(spec, weights, device="cuda")
    plain, plain_bad = model.forward(batch)
    model.set_fused_dot(True)
    prepared = model.prepare(batch)
    first, bad = model.forward_prepared(prepared)
    torch.testing.assert_close(first, plain, atol=1e-2, rtol=1e-2)
    assert torch.equal(bad != 0, plain_bad) and not bad.any()  # (int32 flags: see forward)
    for _ in range(3):
        again, _ = model.forward_prepared(prepared)
        assert torch.equal(again, first)
    graph, (scores, flags) = capture_graph(model.forward_prepared, prepared)
    for _ in range(3):
        scores.zero_()
        graph.replay()
        assert torch.equal(scores, first) and torch.equal(flags, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("e_dtype", [torch.bfloat16, torch.float32])
def test_four_rows_a_product_give_the_row_by_row_bits_on_the_card(monkeypatch, e_dtype):
    """The 4-rows candidates add the same 32-column chunks in the same order as row by row;
    on the card their batched product must give the same bits too, or the tuner (which
    keeps every served config's bits equal) drops them as "its output differs"."""
    zs = []
    for gram_rows in (1, 4):
        _only_gram_rows(monkeypatch, gram_rows)
        (fused, plain), counts, _ = _launch_both("cuda", torch.bfloat16, 3 * GROUP + 5,
                                                 seed=21, e_dtype=e_dtype)
        assert torch.equal(fused[0], plain[0]) and not counts.any()
        assert not fused[1].isnan().any()
        zs.append(fused[1])
    assert torch.equal(zs[0], zs[1])


def test_block_major_plan_covers_every_program_once_block_by_block():
    """The fused launch's program map: each feature's programs exactly once, all of one
    block's (long bags first) before the next block's, decoded as the kernel does."""
    from recserve.kernels.tables import FEATURE_SLOTS, launch_plan

    packed = PackedTables([torch.zeros(5, D), torch.zeros(9, D)])
    features = (BagFeature(0, 0, max_bag=3), BagFeature(1, D, max_bag=40),
                BagFeature(0, 2 * D, max_bag=2))
    rows, bags = 2 * GROUP + 5, 8
    _, prog, programs = launch_plan(packed, features, rows, rows, bags, 16, block_rows=GROUP)
    words = prog.tolist()
    decoded = [(w % FEATURE_SLOTS, w // FEATURE_SLOTS) for w in words]
    want = {(0, k) for k in range(-(-rows // bags))} | {(1, k) for k in range(rows)} \
        | {(2, k) for k in range(-(-rows // bags))}
    assert programs == len(words) == len(want) and set(decoded) == want
    first_rows = [k * (1 if f == 1 else bags) for f, k in decoded]
    blocks = [r // GROUP for r in first_rows]
    assert blocks == sorted(blocks)  # block by block
    assert [f for f, _ in decoded[:GROUP]] == [1] * GROUP  # the long bags of block 0 first
    with pytest.raises(ValueError, match="candidate-scope"):
        launch_plan(packed, (BagFeature(0, 0, request_scope=True),), rows, 3, bags, 16,
                    block_rows=GROUP)


def test_fused_candidates_are_the_gathers_that_fit_a_block_and_their_twins():
    from recserve.kernels.gather_dot import GRAM_ROWS, MAXNREG

    gather = eb._candidates(16, False, True)  # tables of several sizes: SMALL_LAST twins too
    got = ThenDot.candidates(gather)
    row_by_row = [c for c in got if "GRAM_ROWS" not in c]
    plain = [c for c in row_by_row if "maxnreg" not in c]
    assert plain == [c for c in gather if not c.get("SMALL_LAST")]
    capped = [c for c in row_by_row if "maxnreg" in c]
    assert capped and all(c["maxnreg"] == MAXNREG and c["num_warps"] == 4 and c["ALIGN"] > 1
                          for c in capped)
    # each aligned one again with its rows' Grams formed GRAM_ROWS at a time
    together = [c for c in got if "GRAM_ROWS" in c]
    assert together == [{**c, "GRAM_ROWS": GRAM_ROWS} for c in row_by_row if c["ALIGN"] > 1]
    assert ThenDot.candidates([{**eb.CONFIGS[0], "BAGS": 32, "ALIGN": 16}]) == []
