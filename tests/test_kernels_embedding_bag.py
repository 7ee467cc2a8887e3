"""Table-batched embedding bag kernel vs its plain-torch reference.

CPU runs use Triton's interpreter (set by recserve.kernels on hosts without CUDA); the
``cuda`` parameters are the same tests on a GPU (``pytest -m gpu``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_params import DEVICES

from recserve.engine.weights import dequantize_rowwise, quantize_rowwise
from recserve.kernels.embedding_bag import (
    BagFeature,
    PackedTables,
    check_bounds,
    check_csr,
    embedding_bag,
    embedding_bag_reference,
)

# (table dtype) -> (atol, rtol) of the pooled fp32 output against the fp32 reference over
# the same stored values: only the summation order differs.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5),
       torch.bfloat16: (1e-5, 1e-5), torch.uint8: (1e-5, 1e-5)}


def _tables(dtype: torch.dtype, dims: list[int], rows: list[int], gen: torch.Generator):
    """Stored tables, their scales/shifts (int8) and the fp32 values the kernel must see."""
    stored, scales, shifts, exact = [], [], [], []
    for r, d in zip(rows, dims, strict=True):
        values = torch.rand(r, d, generator=gen) * 2 - 1
        if dtype == torch.uint8:
            codes, scale, shift = quantize_rowwise(values)
            stored.append(codes)
            scales.append(scale)
            shifts.append(shift)
            exact.append(dequantize_rowwise(codes, scale, shift))
        else:
            stored.append(values.to(dtype))
            exact.append(stored[-1].float())
    return stored, scales or None, shifts or None, exact


def _csr(features, rows_of, num_rows, num_requests, gen, index_dtype):
    """Random bags: empty, 1 and max_bag long ones, index 0 and rows-1, repeats."""
    values, offsets, pos = [], [], 0
    for f in features:
        count = num_requests if f.request_scope else num_rows
        lengths = torch.randint(0, f.max_bag + 1, (count,), generator=gen)
        lengths[0], lengths[-1] = f.max_bag, 0
        if count > 2:
            lengths[1] = 1
        rows = rows_of[f.table]
        offsets.append(pos)
        for n in lengths.tolist():
            v = torch.randint(0, rows, (n,), generator=gen)
            if n >= 3:
                v[0], v[1], v[2] = 0, rows - 1, v[0]
            values.append(v)
            pos += n
            offsets.append(pos)
    return torch.cat(values).to(index_dtype), torch.tensor(offsets, dtype=index_dtype)


def _requests(num_rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cuts = torch.sort(torch.randint(0, num_rows + 1, (3,), generator=gen)).values
    request_offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([num_rows])])
    row_request = torch.repeat_interleave(torch.arange(len(request_offsets) - 1),
                                          request_offsets[1:] - request_offsets[:-1])
    return request_offsets, row_request


def _run(dtype, dims, rows, features, device, seed, index_dtype=torch.int64, num_rows=13,
         out_dtype=torch.float32, corrupt=None, pad=7):
    gen = torch.Generator().manual_seed(seed)
    stored, scales, shifts, exact = _tables(dtype, dims, rows, gen)
    request_offsets, row_request = _requests(num_rows, gen)
    num_requests = len(request_offsets) - 1
    indices, offsets = _csr(features, rows, num_rows, num_requests, gen, index_dtype)
    if corrupt is not None:
        corrupt(indices, offsets)
    weights = torch.rand(indices.shape[0], generator=gen) * 2 - 1
    width = max(f.out_col + dims[f.table] for f in features)
    # a strided slice of a wider NaN-poisoned buffer: every written cell must be overwritten
    big = torch.full((num_rows, width + pad), float("nan"), dtype=out_dtype, device=device)
    out = big[:, 3:3 + width]
    packed = PackedTables([t.to(device) for t in stored],
                          [s.to(device) for s in scales] if scales else None,
                          [s.to(device) for s in shifts] if shifts else None)
    bad = embedding_bag(packed, features, indices.to(device), offsets.to(device), out,
                        weights=weights.to(device), row_request=row_request.to(device),
                        request_offsets=request_offsets.to(device))
    ref, ref_bad = embedding_bag_reference(exact, features, indices, offsets, num_rows,
                                           weights=weights, request_offsets=request_offsets)
    return out.float().cpu(), bad.cpu(), ref, ref_bad


def _same_bits_and_right(runs: list[tuple], dtype: torch.dtype, dims: list[int]) -> None:
    """``_run`` results of one input under different switches: every run's output and bad
    flags are the first's, bit for bit, and the first's match the reference."""
    out, bad, ref, _ = runs[0]
    for f, want in zip(_features(dims), ref, strict=True):
        got = out[:, f.out_col:f.out_col + want.shape[1]]
        torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    for other in runs[1:]:
        assert torch.equal(other[0], out) and torch.equal(other[1], bad)


def _features(dims: list[int]) -> list[BagFeature]:
    col = [0]
    for t in (0, 1, 2, 0, 1):
        col.append(col[-1] + dims[t])
    return [
        BagFeature(0, col[0], max_bag=3),
        BagFeature(1, col[1], max_bag=120),                       # long candidate bags
        BagFeature(2, col[2], request_scope=True, mean=True, max_bag=40),
        BagFeature(0, col[3], request_scope=True, weighted=True, max_bag=2),
        BagFeature(1, col[4], mean=True, weighted=True, max_bag=1),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("dims,index_dtype", [([4, 37, 12], torch.int32),
                                              ([16, 5, 256], torch.int64)])
def test_pooling_matches_reference(device, dtype, dims, index_dtype):
    features = _features(dims)
    out, bad, ref, ref_bad = _run(dtype, dims, [50, 9, 300], features, device,
                                  seed=hash((str(dtype), tuple(dims))) % 1000,
                                  index_dtype=index_dtype)
    atol, rtol = TOL[dtype]
    for f, want in zip(features, ref, strict=True):
        got = out[:, f.out_col:f.out_col + want.shape[1]]
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert not bad.any() and not ref_bad.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unroll,stages,rows", [(1, 1, 0), (2, 1, 0), (4, 1, 0), (1, 3, 0),
                                                (1, 1, 40), (2, 1, 40)])
def test_out_of_range_ids_are_flagged_and_never_read(device, unroll, stages, rows, monkeypatch):
    """(rows > 0: several tiles a program, PROGRAM_ROWS, so a bad id meets the next tile's
    prefetch)"""
    from recserve.kernels import embedding_bag as eb

    config = {**eb.CONFIGS[0], "BAGS": 4, "UNROLL": unroll, "STAGES": stages}
    monkeypatch.setattr(eb, "CONFIGS", [{**config, "PROGRAM_ROWS": rows} if rows else config])
    dims, rows = [8, 8, 8], [5, 40, 5]
    # Tables 0 and 2 surround table 1 in the packed buffer and hold huge values: a read past
    # either end of table 1 would show up in its pooled sums.
    features = [BagFeature(1, 0, max_bag=4), BagFeature(1, 8, request_scope=True, max_bag=20)]

    def corrupt(indices, offsets):
        starts = offsets[:14].tolist()  # candidate bags of feature 0
        rows_with_ids = [r for r in range(13) if starts[r + 1] > starts[r]]
        indices[starts[rows_with_ids[0]]] = -1
        indices[starts[rows_with_ids[-1]]] = 40
        req = offsets[14:].tolist()
        indices[req[0]] = 1 << 40 if indices.dtype == torch.int64 else (1 << 31) - 1

    out, bad, ref, ref_bad = _run(torch.float32, dims, rows, features, device, seed=7,
                                  corrupt=corrupt)
    assert torch.isfinite(out[:, :16]).all()
    torch.testing.assert_close(out[:, :8], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 8:16], ref[1], atol=1e-5, rtol=1e-5)
    assert bad.bool().tolist() == ref_bad.tolist()
    assert bad[0] == 1  # request 0 sent the 2^40 id in its request-scope bag
    assert ref_bad.sum() >= 2  # and the two corrupted candidate rows flagged their requests


@pytest.mark.parametrize("device", DEVICES)
def test_same_batch_gives_identical_bits(device):
    dims = [12, 12, 12]
    first = _run(torch.bfloat16, dims, [50, 9, 300], _features(dims), device, seed=3)[0]
    second = _run(torch.bfloat16, dims, [50, 9, 300], _features(dims), device, seed=3)[0]
    assert torch.equal(first, second)


def _scattered(features, offsets, num_rows, num_requests, gen):
    """The same bags moved to random places in a longer indices array: (positions of each
    old index in the new array, starts, ends, new length). Each feature's last slot is
    poisoned (it must not be read)."""
    counts = [num_requests if f.request_scope else num_rows for f in features]
    bags, base = [], 0
    for c in counts:
        bags += [(int(offsets[base + b]), int(offsets[base + b + 1])) for b in range(c)]
        base += c + 1
    order = torch.randperm(len(bags), generator=gen).tolist()
    where, starts_by_bag, pos = {}, {}, 5  # a gap before, between and after the bags
    for b in order:
        lo, hi = bags[b]
        starts_by_bag[b] = pos
        for k in range(lo, hi):
            where[k] = pos + k - lo
        pos += hi - lo + 2
    starts, ends, b = [], [], 0
    for c in counts:
        starts += [starts_by_bag[b + i] for i in range(c)] + [-9]
        ends += [starts_by_bag[b + i] + bags[b + i][1] - bags[b + i][0] for i in range(c)]
        ends += [1 << 30]
        b += c
    return where, torch.tensor(starts), torch.tensor(ends), pos + 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,index_dtype,program_rows", [(torch.bfloat16, torch.int32, 0),
                                                            (torch.uint8, torch.int64, 0),
                                                            (torch.bfloat16, torch.int64, 24)])
def test_bags_anywhere_with_ends_give_the_same_bits_as_csr(device, dtype, index_dtype,
                                                           program_rows, monkeypatch):
    """``ends``: bags in any order and with gaps (how the engine lays out a batch, request by
    request) pool to exactly what the same bags give as CSR (``program_rows``: with several
    tiles a program, whose next tile's bounds come from ``ends`` too)."""
    from recserve.kernels import embedding_bag as eb

    config = {"BAGS": 4, "LANES": 16, "UNROLL": 1, "STAGES": 1, "num_warps": 2}
    monkeypatch.setattr(eb, "_tuner", eb.SafeTuner("embedding_bag", eb.CONFIGS))
    monkeypatch.setattr(eb, "CONFIGS", [{**config, "PROGRAM_ROWS": program_rows}
                                        if program_rows else config])
    gen = torch.Generator().manual_seed(21)
    dims, rows, num_rows = [8, 24, 16], [50, 9, 300], 11
    features = _features(dims)
    stored, scales, shifts, _ = _tables(dtype, dims, rows, gen)
    request_offsets, row_request = _requests(num_rows, gen)
    num_requests = len(request_offsets) - 1
    indices, offsets = _csr(features, rows, num_rows, num_requests, gen, index_dtype)
    indices[3] = 1000  # out of its table: flagged either way
    weights = torch.rand(indices.shape[0], generator=gen)
    where, starts, ends, length = _scattered(features, offsets, num_rows, num_requests, gen)
    moved = torch.full((length,), 7, dtype=index_dtype)
    moved_weights = torch.full((length,), float("nan"))
    for old, new in where.items():
        moved[new], moved_weights[new] = indices[old], weights[old]
    packed = PackedTables([t.to(device) for t in stored],
                          [x.to(device) for x in scales] if scales else None,
                          [x.to(device) for x in shifts] if shifts else None)
    width = max(f.out_col + dims[f.table] for f in features)
    results = []
    for idx, starts_, ends_, w in ((indices, offsets, None, weights),
                                   (moved, starts.to(index_dtype), ends.to(index_dtype),
                                    moved_weights)):
        out = torch.full((num_rows, width), float("nan"), device=device)
        bad = embedding_bag(packed, features, idx.to(device), starts_.to(device), out,
                            weights=w.to(device), row_request=row_request.to(device),
                            request_offsets=request_offsets.to(device),
                            ends=None if ends_ is None else ends_.to(device))
        results.append((out.cpu(), bad.cpu()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1]) and results[0][1].any()
    check_bounds(starts, ends, [num_rows if not f.request_scope else num_requests
                                for f in features], length)


@pytest.mark.gpu
def test_bf16_output_within_bf16_rounding_on_gpu():
    dims = [128, 128, 128]
    features = _features(dims)
    out, _, ref, _ = _run(torch.bfloat16, dims, [5000, 90, 3000], features, "cuda", seed=11,
                          num_rows=300, out_dtype=torch.bfloat16)
    for f, want in zip(features, ref, strict=True):
        got = out[:, f.out_col:f.out_col + 128]
        own = (want.bfloat16().float() - want).abs().max()  # torch's own bf16 rounding
        assert (got - want).abs().max() <= 2 * own + 1e-6


def test_launcher_rejects_bad_arguments():
    packed = PackedTables([torch.zeros(4, 8)])
    feats = [BagFeature(0, 0)]
    out = torch.zeros(3, 8)
    idx, offs = torch.zeros(3, dtype=torch.int64), torch.arange(4)
    with pytest.raises(ValueError, match=r"offsets has shape \[3\]"):
        embedding_bag(packed, feats, idx, offs[:3], out)
    with pytest.raises(ValueError, match="indices has dtype torch.float32"):
        embedding_bag(packed, feats, idx.float(), offs, out)
    with pytest.raises(ValueError, match=r"writes columns 4..12 but out has shape \[3, 8\]"):
        embedding_bag(packed, [BagFeature(0, 4)], idx, offs, out)
    with pytest.raises(ValueError, match="unit column stride"):
        embedding_bag(packed, feats, idx, offs, torch.zeros(8, 3).t())
    with pytest.raises(ValueError, match="request-scope features need request_offsets"):
        embedding_bag(packed, [BagFeature(0, 0, request_scope=True)], idx, offs, out)
    with pytest.raises(ValueError, match="one dtype per PackedTables"):
        PackedTables([torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float16)])
    with pytest.raises(ValueError, match="not monotone"):
        check_csr(torch.tensor([0, 2, 1, 3]), [3], 3)
    with pytest.raises(ValueError, match=r"ends has shape \[3\]; offsets has \[4\]"):
        embedding_bag(packed, feats, idx, offs, out, ends=offs[1:])
    with pytest.raises(ValueError, match="ends has dtype torch.int32"):
        embedding_bag(packed, feats, idx, offs, out, ends=offs.int())
    with pytest.raises(ValueError, match="0 <= start <= end <= 3"):
        check_bounds(torch.tensor([0, 2, 1, 0]), torch.tensor([1, 1, 3, 0]), [3], 3)
    check_bounds(torch.tensor([2, 0, 1, -5]), torch.tensor([3, 2, 1, 99]), [3], 3)


def test_alignment_hint_is_the_largest_common_power_of_two():
    from recserve.kernels.tables import alignment

    packed = PackedTables([torch.zeros(3, 32), torch.zeros(5, 16)])
    feats = [BagFeature(0, 0), BagFeature(1, 32)]
    assert alignment(packed, feats, torch.zeros(2, 48)) == 16
    assert alignment(packed, feats, torch.zeros(2, 56)) == 8      # row stride 56
    assert alignment(packed, [BagFeature(0, 0), BagFeature(1, 36)], torch.zeros(2, 64)) == 4
    odd = PackedTables([torch.zeros(3, 5), torch.zeros(5, 16)])  # second base: 15 elements
    assert alignment(odd, [BagFeature(1, 0)], torch.zeros(2, 16)) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_switches_give_identical_bits(device, dtype, monkeypatch):
    """Aligned dims (ALIGN 16), with and without the hints, the id prefetch, the 2- and
    4-step unrolls and the pipelined loops (STAGES): the same sums in the same order, so the
    same bits."""
    from recserve.kernels import embedding_bag as eb

    dims = [16, 32, 16]
    runs = []
    tuner = eb.SafeTuner("embedding_bag", eb.CONFIGS)
    monkeypatch.setattr(eb, "_tuner", tuner)
    first = eb.CONFIGS[0]
    for hints, prefetch, unroll, stages in ((True, True, 1, 1), (False, False, 1, 1),
                                            (True, False, 1, 1), (True, True, 2, 1),
                                            (True, False, 2, 1), (True, True, 1, 3),
                                            (False, False, 1, 4), (True, True, 4, 1),
                                            (True, False, 4, 1)):
        monkeypatch.setattr(eb, "ALIGN_HINTS", hints)
        monkeypatch.setattr(eb, "PREFETCH", prefetch)
        monkeypatch.setattr(eb, "CONFIGS", [{**first, "UNROLL": unroll, "STAGES": stages}])
        # out's row stride 128 (112 columns + 16): every base is a multiple of 16
        runs.append(_run(dtype, dims, [50, 9, 300], _features(dims), device, seed=5,
                         pad=16))
        assert tuner.best[list(tuner.best)[-1]]["ALIGN"] == (16 if hints else 1)
        best = tuner.best[list(tuner.best)[-1]]
        assert best["UNROLL"] == unroll and best["STAGES"] == stages
        assert best["PREFETCH"] == (prefetch and stages == 1)  # pipelined: never both
        tuner.best.clear()
    _same_bits_and_right(runs, dtype, dims)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_several_tiles_a_program_give_identical_bits(device, dtype, unroll, monkeypatch):
    """Programs pooling several tiles (PROGRAM_ROWS; 4 bags a tile, 16 lanes), with and
    without the id prefetch, and several long bags only (LONG_ONLY): the same sums in the
    same order as one tile a program, so the same bits; 29 rows, so the last program of
    each feature holds a partial tile."""
    from recserve.kernels import embedding_bag as eb
    from recserve.kernels.tables import feature_tiles

    dims = [16, 32, 16]
    features = _features(dims)
    base = {"BAGS": 4, "LANES": 16, "UNROLL": unroll, "STAGES": 1, "num_warps": 2}
    # PROGRAM_ROWS 24: short tiles 2, 3 and 6 a program; 250: the 120-hot bags 2 a program
    assert [feature_tiles(f, f.max_bag >= 16, 4, 24) for f in features] == [2, 1, 1, 3, 6]
    assert [feature_tiles(f, f.max_bag >= 16, 4, 250) for f in features] == [20, 2, 6, 31, 62]
    monkeypatch.setattr(eb, "_tuner", eb.SafeTuner("embedding_bag", eb.CONFIGS))
    runs = []
    for rows, prefetch, long_only in ((0, True, False), (24, True, False), (250, True, False),
                                      (24, False, False), (250, True, True)):
        monkeypatch.setattr(eb, "PREFETCH", prefetch)
        config = {**base, "PROGRAM_ROWS": rows, "LONG_ONLY": long_only} if rows else base
        monkeypatch.setattr(eb, "CONFIGS", [config])
        runs.append(_run(dtype, dims, [50, 9, 300], features, device, seed=11, num_rows=29,
                         pad=16))
        eb._tuner.best.clear()
    _same_bits_and_right(runs, dtype, dims)


@pytest.mark.parametrize("device", DEVICES)
def test_several_tiles_a_program_step_past_empty_tiles(device, monkeypatch):
    """Whole tiles of empty bags between full ones, and empty long bags between long ones:
    each program still fetches its next tile's ids and pools every bag right."""
    from recserve.kernels import embedding_bag as eb

    lengths = {0: [0, 0, 0, 0, 2, 1, 0, 2, 0, 0, 0, 0, 1],  # short, 4 bags a tile
               1: [0, 20, 0, 0, 17, 0, 0, 0, 3, 0, 0, 0, 16]}  # long (16 lanes)
    features = [BagFeature(0, 0, max_bag=2), BagFeature(1, 8, max_bag=20)]
    gen = torch.Generator().manual_seed(3)
    tables = [torch.rand(30, 8, generator=gen), torch.rand(40, 8, generator=gen)]
    values, offsets, pos = [], [], 0
    for k, f in enumerate(features):
        offsets.append(pos)
        for n in lengths[k]:
            values.append(torch.randint(0, tables[f.table].shape[0], (n,), generator=gen))
            pos += n
            offsets.append(pos)
    indices, offsets = torch.cat(values), torch.tensor(offsets)
    ref, _ = embedding_bag_reference(tables, features, indices, offsets, 13)
    packed = PackedTables([t.to(device) for t in tables])
    monkeypatch.setattr(eb, "_tuner", eb.SafeTuner("embedding_bag", eb.CONFIGS))
    results = []
    for rows in (0, 16, 40, 1000):  # long bags 1, 2 or 50 a program; short tiles 2-125
        config = {"BAGS": 4, "LANES": 16, "UNROLL": 1, "STAGES": 1, "num_warps": 2}
        monkeypatch.setattr(eb, "CONFIGS", [{**config, "PROGRAM_ROWS": rows} if rows else config])
        out = torch.full((13, 16), float("nan"), device=device)
        bad = embedding_bag(packed, features, indices.to(device), offsets.to(device), out)
        assert not bad.any()
        results.append(out.cpu())
        eb._tuner.best.clear()
    torch.testing.assert_close(results[0], torch.cat(ref, dim=1), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_tiles_a_program_follow_each_features_max_bag():
    """launch_plan with rows_per_prog: each feature's programs and tiles by its max_bag (long
    bags one a tile), recorded in its metadata; the block-major order refuses it."""
    from recserve.kernels.tables import launch_plan

    packed = PackedTables([torch.zeros(10, 16), torch.zeros(5, 16)])
    feats = (BagFeature(0, 0, max_bag=1), BagFeature(1, 16, max_bag=3),
             BagFeature(0, 32, max_bag=100), BagFeature(1, 48, max_bag=20))
    meta, prog_feature, programs = launch_plan(packed, feats, 100, 100, 8, 16,
                                               rows_per_prog=64)
    # tiles: 64 // 8, 64 // 24, 1 (100 > 64), 64 // 20; bags a program 64, 16, 1, 3
    assert meta[:, 9].tolist() == [8, 2, 1, 3]
    assert programs == 2 + 7 + 100 + 34
    assert sorted(prog_feature.tolist()) == [0] * 2 + [1] * 7 + [2] * 100 + [3] * 34
    plain, _, count = launch_plan(packed, feats, 100, 100, 8, 16)
    assert plain[:, 9].tolist() == [1, 1, 1, 1] and count == 13 + 13 + 100 + 100
    long_only, _, count = launch_plan(packed, feats, 100, 100, 8, 16, rows_per_prog=64,
                                      long_only=True)
    assert long_only[:, 9].tolist() == [1, 1, 1, 3] and count == 13 + 13 + 100 + 34
    with pytest.raises(ValueError, match="one tile each"):
        launch_plan(packed, feats[:2], 32, 32, 8, 16, block_rows=16, rows_per_prog=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("unroll", [1, 2])
def test_l2_keep_hint_changes_no_bit(device, dtype, unroll, monkeypatch):
    """With L2_KEEP the rows of the kept tables (here the two smallest) are loaded with an
    evict-last hint and the others without: the same values, so the same bits as without
    the hint, and the tuner offers the hinted variant only when some tables are kept."""
    from recserve.kernels import _common
    from recserve.kernels import embedding_bag as eb

    monkeypatch.setenv(_common.TRIAL_ENV, "1")  # (the hint is a trial candidate)
    dims, rows = [16, 32, 16], [50, 9, 300]
    tuner = eb.SafeTuner("embedding_bag", eb.CONFIGS)
    monkeypatch.setattr(eb, "_tuner", tuner)
    # half of it, the budget, holds tables 1 and 0 (bf16 576 + 1600 bytes, int8 rows with
    # their scale and offset 432 + 1600), not table 2 too (9600 more)
    monkeypatch.setattr(eb, "l2_bytes", lambda device: 8000)
    runs = []
    for keep in (False, True):
        config = {**eb.CONFIGS[0], "UNROLL": unroll, "L2_KEEP": keep}
        monkeypatch.setattr(eb, "CONFIGS", [config])
        runs.append(_run(dtype, dims, rows, _features(dims), device, seed=6, pad=16))
        key = list(tuner.best)[-1]
        assert tuner.best[key].get("L2_KEEP") == keep and key[-1] == frozenset({0, 1})
        tuner.best.clear()
    _same_bits_and_right(runs, dtype, dims)
    monkeypatch.setenv(_common.TRIAL_ENV, "0")  # serving's default: no table marked kept
    monkeypatch.setattr(eb, "CONFIGS", [{**eb.CONFIGS[0], "L2_KEEP": False}])
    _run(dtype, dims, rows, _features(dims), device, seed=6, pad=16)
    assert list(tuner.best)[-1][-1] == frozenset()


def test_kept_tables_are_the_smallest_that_fit_the_budget():
    from recserve.kernels import embedding_bag as eb
    from recserve.kernels.tables import kept_tables, launch_plan

    packed = PackedTables([torch.zeros(r, 8, dtype=torch.bfloat16) for r in (100, 10, 1000, 40)])
    feats = [BagFeature(t, 0) for t in (0, 1, 2, 3, 1)]  # (bytes: 1600, 160, 16000, 640)
    assert kept_tables(packed, feats, 2400) == {1, 3, 0}
    assert kept_tables(packed, feats, 2399) == {1, 3}
    assert kept_tables(packed, feats, 100) == frozenset()
    assert kept_tables(packed, feats[2:3], 10**9) == {2}  # only the launch's own tables
    # the plan marks exactly the kept tables' features (flag 16: the kernel's hinted loads)
    meta, _, _ = launch_plan(packed, tuple(feats), 4, 4, 16, 16, frozenset({1, 3}))
    assert [bool(flags & 16) for flags in meta[:, 8].tolist()] == [False, True, False, True,
                                                                   True]
    hinted = [c for c in eb._candidates(16, True) if c.get("L2_KEEP")]
    assert hinted and all(c["STAGES"] == 1 for c in hinted)
    assert not any(c.get("L2_KEEP") for c in eb._candidates(16, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_small_tables_last_changes_no_bit(device, dtype, monkeypatch):
    """SMALL_LAST orders the grid's programs by their table's bytes (long bags still
    first): each bag is pooled by one program in the same order, so the same bits, and the
    tuner offers it only when the launch's tables differ in size."""
    from recserve.kernels import embedding_bag as eb

    ordered = [c for c in eb._candidates(16, False, True) if c.get("SMALL_LAST")]
    assert len(ordered) == len(eb.CONFIGS)  # every config also in this order
    assert not any(c.get("SMALL_LAST") for c in eb._candidates(16, False, False))
    dims, rows = [16, 32, 16], [50, 9, 300]
    tuner = eb.SafeTuner("embedding_bag", eb.CONFIGS)
    monkeypatch.setattr(eb, "_tuner", tuner)
    runs = []
    for small_last in (False, True):
        monkeypatch.setattr(eb, "CONFIGS", [{**eb.CONFIGS[0], "SMALL_LAST": small_last}])
        runs.append(_run(dtype, dims, rows, _features(dims), device, seed=8, pad=16))
        assert tuner.best[list(tuner.best)[-1]].get("SMALL_LAST", False) == small_last
        tuner.best.clear()
    _same_bits_and_right(runs, dtype, dims)


def test_program_order_puts_long_bags_first_then_the_largest_tables():
    from recserve.kernels.tables import launch_plan, program_order

    packed = PackedTables([torch.zeros(r, 8, dtype=torch.bfloat16) for r in (100, 10, 1000, 40)])
    feats = [BagFeature(0, 0, max_bag=2), BagFeature(1, 0, max_bag=30),
             BagFeature(2, 0, max_bag=1), BagFeature(3, 0, max_bag=4),
             BagFeature(1, 0, max_bag=3)]
    is_long = [f.max_bag >= 16 for f in feats]
    assert program_order(packed, feats, is_long, False) == [1, 0, 2, 3, 4]  # as listed
    # the long bag, then tables of 1000, 100, 40 and 10 rows (ties keep their order)
    assert program_order(packed, feats, is_long, True) == [1, 2, 0, 3, 4]
    _, prog_feature, programs = launch_plan(packed, tuple(feats), 4, 4, 2, 16,
                                            small_last=True)
    # one program a long bag (4), two bags a program for the others (2 each)
    assert prog_feature.tolist() == [1] * 4 + [2] * 2 + [0] * 2 + [3] * 2 + [4] * 2
    assert programs == 12


def test_untuned_launch_falls_back_to_the_next_config(monkeypatch):
    """With tuning off on a GPU, a config that fails to compile gives way to the next one
    (the gather's proven kernel is last among its candidates); the last failure raises."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv("RECSERVE_AUTOTUNE", "0")
    tuner = _common.SafeTuner("t", [{"v": 0}])
    launched = []

    def launch(cfg):
        if cfg["v"] == 0:
            raise RuntimeError("PassManager::run failed")
        launched.append(cfg["v"])

    with pytest.warns(UserWarning, match="failed for key"):
        assert tuner.run(("k",), launch, [{"v": 0}, {"v": 1}, {"v": 2}]) == {"v": 1}
    assert launched == [1]
    assert tuner.run(("k",), launch) == {"v": 1} and launched == [1, 1]  # cached
    with pytest.raises(RuntimeError, match="PassManager"):
        tuner.run(("other",), launch, [{"v": 0}])


def test_tuning_keeps_every_timing_fastest_first_and_prunes_failures(monkeypatch):
    """The tuner picks the fastest config that runs and keeps every timing (the benchmark
    reports show by how much each variant won or lost)."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.delenv("RECSERVE_AUTOTUNE", raising=False)
    cost = {0: 3.0, 1: 1.5, 2: None, 3: 2.0}  # config 2 fails to compile

    def fake_bench(fn, **_):
        fn()
        return fake_bench.ms

    def launch(cfg):
        if cost[cfg["v"]] is None:
            raise RuntimeError("ptxas error")
        fake_bench.ms = cost[cfg["v"]]

    monkeypatch.setattr(_common.triton.testing, "do_bench", fake_bench)
    tuner = _common.SafeTuner("t", [{"v": v} for v in cost])
    long_key = ("k",) + tuple(range(200))  # (a gather's key names every feature)
    with pytest.warns(UserWarning, match=r"pruned 1 of 4 config\(s\) for key \('k', 0, 1,") as seen:
        assert tuner.run(long_key, launch) == {"v": 1}
    message = str(seen[0].message)
    assert "199" not in message.split(": {")[0] and "chars)" in message  # the key, shortened
    assert "{'v': 2}: RuntimeError: ptxas error" in message
    assert [(ms, c["v"]) for ms, c in tuner.timings[long_key]] == [(1.5, 1), (2.0, 3), (3.0, 0)]


@pytest.mark.parametrize("with_outputs", [False, True])
def test_tuning_picks_a_config_that_spills_only_when_every_one_does(monkeypatch,
                                                                    with_outputs):
    """A launch that returns its compiled kernel says whether its registers spilled
    (``n_spills``, local memory): the fastest such config is the pick only when no config
    without spills runs (on the H200 a spilling V tile timed fine and ran 1.4x slower in
    the forward). Its timing is kept, after the others."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.delenv("RECSERVE_AUTOTUNE", raising=False)
    monkeypatch.delenv(_common.TUNE_BY_ENV, raising=False)
    out = torch.zeros(2)

    class Compiled:
        def __init__(self, n_spills):
            self.n_spills = n_spills

    def tune(cost: dict, spill: dict) -> tuple[dict, list]:
        def fake_bench(fn, **_):
            fn()
            return fake_bench.ms

        def launch(cfg):
            out.fill_(1.0)
            fake_bench.ms = cost[cfg["v"]]
            return Compiled(spill[cfg["v"]])

        monkeypatch.setattr(_common.triton.testing, "do_bench", fake_bench)
        tuner = _common.SafeTuner("t", [{"v": v} for v in cost])
        outputs = (lambda: [(out, 0.0)]) if with_outputs else None
        best = tuner.run(("k",), launch, outputs=outputs)
        return best, [(c["v"], ms) for ms, c in tuner.timings[("k",)]]

    best, timings = tune({0: 3.0, 1: 1.0, 2: 2.0}, {0: 0, 1: 40, 2: 0})
    assert best == {"v": 2} and timings == [(2, 2.0), (0, 3.0), (1, 1.0)]
    best, _ = tune({0: 3.0, 1: 1.0}, {0: 8, 1: 40})  # every one spills: the fastest
    assert best == {"v": 1}
    best, _ = tune({0: 3.0, 1: 1.0}, {0: 0, 1: 0})
    assert best == {"v": 1}


@pytest.mark.parametrize("dim,stride,params_at", [(128, 144, 128), (37, 48, 40), (4, 16, 8)])
def test_int8_rows_carry_their_scale_and_offset_inline(dim, stride, params_at):
    """Each stored int8 row is [codes | pad | scale, offset | pad], 16-byte aligned."""
    gen = torch.Generator().manual_seed(dim)
    codes = [torch.randint(0, 256, (rows, dim), generator=gen, dtype=torch.uint8)
             for rows in (3, 5)]
    scales = [torch.rand(c.shape[0], generator=gen) for c in codes]
    shifts = [torch.randn(c.shape[0], generator=gen) for c in codes]
    packed = PackedTables(codes, scales, shifts)
    assert packed.row_stride == [stride, stride] and packed.elem_base == [0, 3 * stride]
    stored = packed.data.view(8, stride)
    assert torch.equal(stored[:, :dim], torch.cat(codes))
    params = stored[:, params_at:params_at + 8].contiguous().view(torch.float32)
    assert torch.equal(params, torch.stack([torch.cat(scales), torch.cat(shifts)], dim=1))


def test_tuning_drops_a_config_whose_output_differs(monkeypatch):
    """With ``outputs``, every config's result must equal the first one's bit for bit
    before it is timed: one that computes something else, or writes nothing, is dropped
    (a miscompile that still runs must not become the fastest choice)."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.delenv("RECSERVE_AUTOTUNE", raising=False)
    out = torch.zeros(4)
    cost = {0: 3.0, 1: 1.0, 2: 0.5, 3: 2.0}  # 1 writes wrong values, 2 writes nothing

    def launch(cfg):
        if cfg["v"] == 1:
            out.fill_(7.0)
        elif cfg["v"] != 2:
            out.copy_(torch.arange(4.0))
        fake_bench.ms = cost[cfg["v"]]

    def fake_bench(fn, **_):
        fn()
        return fake_bench.ms

    monkeypatch.setattr(_common.triton.testing, "do_bench", fake_bench)
    tuner = _common.SafeTuner("t", [{"v": v} for v in cost])
    with pytest.warns(UserWarning, match="pruned 2 of 4 config.*output differs.*same bits"):
        best = tuner.run(("k",), launch, outputs=lambda: [(out, float("nan"))])
    assert best == {"v": 3} and out.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert [c["v"] for _, c in tuner.timings[("k",)]] == [3, 0]


def test_the_int8_decode_without_a_conversion_is_exact():
    """The gather reads a uint8 code as fp32 by setting it under 2^23's exponent and
    subtracting 2^23 (no I2F instruction): exact for every code."""
    codes = torch.arange(256, dtype=torch.int32)
    decoded = (codes | 0x4B000000).view(torch.float32) - 8388608.0
    assert torch.equal(decoded, codes.float())


def test_tuning_by_graph_times_in_a_cuda_graph_and_falls_back_to_eager(monkeypatch):
    """``RECSERVE_TUNE_BY=graph`` times candidates with ``do_bench_cudagraph`` (the device's
    time, as the engine replays its forward), each after the caller's stream has run what
    it holds (``do_bench_cudagraph`` launches on a stream of its own that does not wait for
    it); when no candidate can be timed so, the key is timed eagerly instead, with a
    warning; ``forget_tuning`` drops every pick."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.delenv("RECSERVE_AUTOTUNE", raising=False)
    eager_ms, graph_ms = {0: 1.0, 1: 2.0}, {0: 3.0, 1: 0.5}  # they disagree
    chosen, events = {}, []

    class CallerStream:
        def synchronize(self):
            events.append("caller's stream done")

    monkeypatch.setattr(_common.torch.cuda, "current_stream", CallerStream)

    def bench(table, fail=False):
        def run(fn, **_):
            events.append(f"timed {table is graph_ms and 'in a graph' or 'eagerly'}")
            fn()
            if fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            return table[chosen["v"]]
        return run

    def launch(cfg):
        chosen["v"] = cfg["v"]

    monkeypatch.setattr(_common.triton.testing, "do_bench", bench(eager_ms))
    monkeypatch.setattr(_common.triton.testing, "do_bench_cudagraph", bench(graph_ms))
    tuner = _common.SafeTuner("t", [{"v": 0}, {"v": 1}])
    monkeypatch.setenv("RECSERVE_TUNE_BY", "eager")
    assert tuner.run(("a",), launch) == {"v": 0}
    assert "caller's stream done" not in events  # (do_bench runs on the caller's stream)
    events.clear()
    monkeypatch.setenv("RECSERVE_TUNE_BY", "graph")
    assert tuner.run(("b",), launch) == {"v": 1}
    assert [c["v"] for _, c in tuner.timings[("b",)]] == [1, 0]
    assert events == ["caller's stream done", "timed in a graph"] * 2
    monkeypatch.setattr(_common.triton.testing, "do_bench_cudagraph", bench(graph_ms, True))
    with pytest.warns(UserWarning, match="no config could be timed in a CUDA graph"):
        assert tuner.run(("c",), launch) == {"v": 0}
    _common.forget_tuning()
    assert tuner.best == {} and tuner.timings == {}
    monkeypatch.setenv("RECSERVE_TUNE_BY", "fastest")
    with pytest.raises(ValueError, match="RECSERVE_TUNE_BY='fastest'"):
        tuner.run(("d",), launch)


@pytest.mark.parametrize("first_eager,first_graph,graph_fails,expected", [
    (1.0, 0.3, False, "graph"),   # eager over 1.5x the graph's: it timed the launch
    (1.0, 0.8, False, "eager"),   # close: the L2's state decides, as in the forward
    (1.0, 0.3, True, "eager"),    # cannot be captured: eager launches
])
def test_tuning_auto_times_in_a_graph_only_where_the_eager_timing_is_the_launch(
        monkeypatch, first_eager, first_graph, graph_fails, expected):
    """``RECSERVE_TUNE_BY=auto`` times a key's first candidate eagerly and in a graph, then
    every candidate in a graph where the eager timing was over ``LAUNCH_BOUND`` times the
    graph's, else every candidate eagerly."""
    from recserve.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.delenv("RECSERVE_AUTOTUNE", raising=False)
    monkeypatch.setenv("RECSERVE_TUNE_BY", "auto")
    eager_ms = {0: first_eager, 1: 0.5, 2: 2.0}  # eagerly, 1 is the fastest
    graph_ms = {0: first_graph, 1: 0.4, 2: 0.1}  # in a graph, 2 is
    chosen, timed = {}, []
    monkeypatch.setattr(_common.torch.cuda, "current_stream",
                        lambda: type("Stream", (), {"synchronize": lambda self: None})())

    def bench(table, how):
        def run(fn, **_):
            fn()
            if how == "graph" and graph_fails:
                raise RuntimeError("operation not permitted when stream is capturing")
            timed.append((how, chosen["v"]))
            return table[chosen["v"]]
        return run

    monkeypatch.setattr(_common.triton.testing, "do_bench", bench(eager_ms, "eager"))
    monkeypatch.setattr(_common.triton.testing, "do_bench_cudagraph", bench(graph_ms, "graph"))
    tuner = _common.SafeTuner("t", [{"v": 0}, {"v": 1}, {"v": 2}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback warning: auto chose eager outright)
        best = tuner.run(("k",), lambda cfg: chosen.update(cfg))
    probe = [("eager", 0)] + ([] if graph_fails else [("graph", 0)])
    assert timed == probe + [(expected, v) for v in (0, 1, 2)]
    assert best == ({"v": 2} if expected == "graph" else {"v": 1})


def test_flags_given_are_only_set_even_while_a_launch_tunes(monkeypatch):
    """Every gather launch of a forward flags into one buffer (no kernel clears it or ORs
    launches' flags): a launch sets its own requests' flags and keeps the ones an earlier
    launch set, also while it tunes, when the tuner resets each output before each
    candidate (to what it held before tuning, not to zero)."""
    from recserve.kernels import _common
    from recserve.kernels import embedding_bag as eb

    monkeypatch.setattr(_common, "interpreting", lambda: False)  # tune: two candidates
    monkeypatch.delenv("RECSERVE_AUTOTUNE", raising=False)
    monkeypatch.delenv(_common.TUNE_BY_ENV, raising=False)
    monkeypatch.setattr(eb, "_tuner", eb.SafeTuner("embedding_bag", eb.CONFIGS))
    tried = []

    def fake_bench(fn, **_):
        fn()
        tried.append(1)
        return float(len(tried))

    monkeypatch.setattr(_common.triton.testing, "do_bench", fake_bench)
    gen = torch.Generator().manual_seed(31)
    dims, rows, num_rows = [8, 8, 8], [20, 20, 20], 6
    features = [BagFeature(0, 0, max_bag=2), BagFeature(1, 8, max_bag=2)]
    stored, _, _, _ = _tables(torch.float32, dims, rows, gen)
    packed = PackedTables(stored)
    out = torch.zeros(num_rows, 16)
    bad = torch.zeros(num_rows, dtype=torch.int32)

    def launch(feature: BagFeature, bad_row: int) -> None:
        ids = torch.arange(num_rows, dtype=torch.int64) % 20
        ids[bad_row] = 99  # out of its table: flags request (row) bad_row
        offsets = torch.arange(num_rows + 1, dtype=torch.int64)
        embedding_bag(packed, [feature], ids, offsets, out, bad=bad)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (configs that differ in bits are pruned: fine)
        launch(features[0], 1)
        launch(features[1], 4)
    assert len(tried) > 2  # both launches tuned, over several candidates
    assert bad.tolist() == [0, 1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match=r"expected contiguous \[6\]"):
        embedding_bag(packed, features[:1], torch.zeros(6, dtype=torch.int64),
                      torch.arange(7, dtype=torch.int64), out,
                      bad=torch.zeros(7, dtype=torch.int32))
