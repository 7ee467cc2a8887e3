"""bench/floors.py under the interpreter: the simplest row reader sums exactly the rows a
gather reads, and the cross layer's parts are the served layer and its pieces."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from recserve.engine.weights import init_weights
from recserve.kernels.model import TritonModel
from recserve.kernels.tables import BagFeature, PackedTables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import floors  # noqa: E402
import workloads as wl  # noqa: E402

DIM = 16


def _tables():
    gen = torch.Generator().manual_seed(0)
    tables = [torch.randn(rows, DIM, generator=gen) for rows in (7, 30, 12)]
    return tables, PackedTables(tables)


def test_gathered_rows_address_each_feature_in_its_own_table():
    tables, packed = _tables()
    feats = [BagFeature(2, 0, max_bag=2), BagFeature(0, DIM, max_bag=1)]
    values = [torch.tensor([0, 11, 5, 3]), torch.tensor([6, 0])]
    rows = floors.gathered_rows(packed, feats, values)
    flat = packed.data.view(-1, DIM)
    want = torch.cat([tables[2][values[0]], tables[0][values[1]]])
    assert torch.equal(flat[rows], want)


@pytest.mark.parametrize("shape", [(8, 4), (16, 4)])
def test_reader_sums_every_row_padded_with_its_own_ids(shape):
    tables, packed = _tables()
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, sum(packed.rows), (21,), generator=gen)  # not a multiple of ROWS
    run = floors.reader(packed, rows, shape)
    run.out.fill_(float("nan"))
    run()
    per = shape[0]
    assert len(run.rows) % per == 0 and torch.equal(run.rows[:21], rows)
    flat = packed.data.view(-1, DIM)
    want = flat[run.rows].view(-1, per, DIM).sum(1)
    torch.testing.assert_close(run.out, want, rtol=1e-5, atol=1e-5)


def test_rows_floor_keeps_the_fastest_shape_and_reports_failures():
    _, packed = _tables()
    rows = torch.arange(16)
    fake_us = {(8, 4): 3.0, (16, 4): 2.0}

    def time_us(run):
        per = len(run.rows) // len(run.out)
        if per == 32:
            raise RuntimeError("out of resources")
        return fake_us[(per, 4)]

    got = floors.rows_floor(packed, rows, time_us, [(8, 4), (16, 4), (32, 4)])
    assert got["us"] == 2.0 and got["shape"] == [16, 4]
    assert got["M_rows_per_s"] == 8.0  # 16 rows in 2 us
    assert got["tried"][2][:2] == [32, 4] and "out of resources" in got["tried"][2][2]


def test_rows_floor_refuses_quantized_or_mixed_tables():
    with pytest.raises(ValueError, match="one dim"):
        floors.gathered_rows(PackedTables([torch.randn(4, 8), torch.randn(4, 16)]),
                             [BagFeature(0, 0, 1)], [torch.tensor([1])])


def test_cross_parts_times_the_served_layer_and_its_pieces():
    spec = wl.dlrmv2_spec(50, "fp32", "dcnv2")
    model = TritonModel(spec, init_weights(spec, 0), device="cpu")
    timed = []

    def time_us(fn):
        timed.append(fn().clone())
        return 10.0

    base = {"matmul_tflops": 1.0, "copy_GBps": 100.0}
    got = floors.cross_parts(model, 4, base, time_us)
    u, v, _ = model.cross[0]
    assert (got["rank"], got["width"]) == (u.shape[0], v.shape[0])
    assert got["cross_us"] == got["plain_us"] == got["u_us"] == 10.0
    cross, plain, apart, low, l2_copy = timed  # what each part returned
    assert l2_copy.numel() == 8 << 20  # (the L2 copy last)
    assert cross.shape == plain.shape == apart.shape == (4, v.shape[0])
    assert low.shape == (4, u.shape[0])
    assert not torch.equal(cross, plain)  # the cross epilogue ran, then the plain one
    # 2 * B * width * rank flops at 1 TFLOP/s; x0, x and the output at 100 GB/s
    assert got["arithmetic_floor_us"] == round(2 * 4 * v.shape[0] * u.shape[0] / 1e6, 2)
    assert got["epilogue_bytes_floor_us"] == round(3 * 4 * v.shape[0] * 4 / 1e5, 2)
    assert got["one_after_the_other_us"] == round(10.0 + 3 * 4 * v.shape[0] * 4 / 1e5, 2)
    # the served tile's operand bytes through L2, and a copy between L2-sized buffers
    # (timed here at 10 us: 2 x 8 MB in 10 us)
    tile = floors.served_config(4, v.shape[0], u.shape[0], cross=True)
    assert tile is not None and got["served_tile"] == f"{tile['BLOCK_M']}x{tile['BLOCK_N']}"
    tiles_n = -(-v.shape[0] // tile["BLOCK_N"])
    operands = 4 * u.shape[0] * (4 * tiles_n + v.shape[0] * 1)  # fp32; one row of tiles
    assert got["l2_operand_MB"] == round(operands / 1e6, 1)
    assert got["l2_copy_GBps"] == round(2 * (8 << 20) / 1e4, 1)
    assert got["l2_operand_floor_us"] == round(operands / (got["l2_copy_GBps"] * 1e3), 2)


def test_l2_operand_bytes_count_each_tile_s_rows_and_columns():
    from recserve.kernels.linear_configs import SUBTILE_CROSS_CONFIGS

    # dlrmv2's V at B=8192 (bf16, K = 512): A [8192, 512] read once per column of tiles
    # (27 of 128), W [512, 3456] once per row of tiles (128 of 64 rows)
    tile = {"BLOCK_M": 64, "BLOCK_N": 128}
    assert floors.l2_operand_bytes(8192, 3456, 512, 2, tile) == 2 * 512 * (
        8192 * 27 + 3456 * 128)  # 679 MB
    sizes = {(c["BLOCK_M"], c["BLOCK_N"]): round(floors.l2_operand_bytes(
        8192, 3456, 512, 2, c) / 1e6) for c in SUBTILE_CROSS_CONFIGS}
    assert sizes == {(64, 128): 679, (128, 128): 453, (128, 256): 344, (256, 128): 340}


def test_gpu_check_asks_kernel_variants_only_for_sections_it_has():
    import re

    import kernel_variants as kv

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    default = re.search(r"VARIANTS_BENCH_ARGS:---sections (\S+)", script).group(1)
    assert "floors" in default.split(",")
    assert set(default.split(",")) <= set(kv.SECTIONS)


def test_forward_floors_list_every_kernel_but_the_gather_with_its_floor():
    spec = wl.dlrmv2_spec(50, "fp32", "dcnv2")
    model = TritonModel(spec, init_weights(spec, 0), device="cpu")
    base = {"matmul_tflops": 1.0, "copy_GBps": 1.0}  # 1 MFLOP or 1 KB a microsecond
    got = floors.forward_floors(model, 8, base)
    names = [k["kernel"] for k in got["kernels"]]
    assert names[:3] == ["bottom 0", "bottom 1", "bottom 2"]
    assert names[3:5] == ["cross 0 U", "cross 0 V (x0, x read too)"]
    assert names[-1].endswith("+ final") and got["launches"] == len(names) + 1
    u, v, _ = model.cross[0]
    rank, width = u.shape
    cross_u = got["kernels"][3]  # 2 * B * rank * width flops; A, W and the output's bytes
    assert cross_u["GFLOP"] == round(2 * 8 * rank * width / 1e9, 3)
    assert cross_u["MB"] == round((8 * width + rank * width + 8 * rank) * 4 / 1e6, 2)
    flops_us, bytes_us = 2 * 8 * rank * width / 1e6, (8 * width + rank * width + 8 * rank) * 4 / 1e3
    assert cross_u["floor_us"] == round(max(flops_us, bytes_us), 2)
    assert got["kernels"][4]["MB"] > cross_u["MB"]  # V also reads x0 and x
    assert got["sum_floor_us"] == round(sum(k["floor_us"] for k in got["kernels"]), 2)


def test_a_forwards_chain_floor_is_its_kernels_at_the_shortest_ones_time():
    import variants_report as kv

    one_call = [{"kernel": "_linear_kernel", "us": 3.0},
                {"kernel": "void at::native::fill", "us": 0.8},
                {"kernel": "_embedding_bag_kernel", "us": 14.7},
                {"kernel": "_linear_kernel", "us": 11.4}]
    record = {"section": "forward", "workload": "dlrmv2", "variant": "v", "graph": True,
              "B": 512, "us": 40.0, "TFLOPs": 1.0, "max_diff_vs_eager": 0.0, "ok": True,
              "kernels": {"one_call": one_call}}
    assert kv.chain_floor(record) == {"ours": 3, "shortest_us": 3.0, "floor_us": 9.8}
    assert "3 kernels of ours, the shortest 3.0 us: 9.8 us if each took that long" \
        in kv.summary([record])
    assert kv.chain_floor({**record, "kernels": {}}) is None  # no profile: nothing said


def test_kernel_variants_names_each_candidate_kind_in_its_picks():
    import variants_report as kv

    gather = {"BAGS": 8, "LANES": 8, "UNROLL": 2, "num_warps": 2, "SMALL_LAST": True}
    assert kv.config_label(gather) == "bags 8 lanes 8 unroll 2 w2 small tables last"
    plain = {**gather, "SMALL_LAST": False}
    sliced = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "SUBTILE": 4}
    assert kv.config_label(sliced) == "128x256x64 w8 sliced epilogue 4"
    assert kv.config_label({**sliced, "SUBTILE": 1}) == "128x256x64 w8"  # (1: not sliced)
    assert kv.config_label({**sliced, "SUBTILE": 1, "num_stages": 7}) == "128x256x64 s7 w8"
    assert kv.config_label({**sliced, "SUBTILE": 1, "GROUP_M": 8}) == \
        "128x256x64 w8 M tiles a group 8"
    assert kv.config_label({**sliced, "SUBTILE": 1, "GROUP_M": 0}) == "128x256x64 w8"
    fused = {**gather, "SMALL_LAST": False, "GRAM_ROWS": 4, "maxnreg": 80}
    assert kv.config_label(fused) == \
        "bags 8 lanes 8 unroll 2 w2 registers <= 80 Grams of rows together: 4"
    assert kv.config_label({**gather, "SMALL_LAST": False, "GRAM_ROWS": 1}) == \
        "bags 8 lanes 8 unroll 2 w2"
    assert kv.config_label({**gather, "PROGRAM_ROWS": 64}) == \
        "bags 8 lanes 8 unroll 2 w2 small tables last rows a program 64"
    assert kv.config_label({**plain, "PROGRAM_ROWS": 32, "LONG_ONLY": True}) == \
        "bags 8 lanes 8 unroll 2 w2 rows a program 32 (long bags)"
    # a cross layer (its candidates include the epilogue-first order): each tile's best too
    pick = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4}
    cross = {"linear_configs": [{"key": "V", "timings_ms": [
        [0.09, sliced], [0.095, {**pick, "EPILOGUE_FIRST": True}], [0.097, pick],
        [0.12, {**sliced, "SUBTILE": 1}]]}]}
    assert kv.tuner_picks(cross)[1] == (
        "    by tile: 128x256 0.0900 (w8 sliced epilogue 4), 64x128 0.0950 (w4 epilogue "
        "first)")
    record = {"configs": [{"key": "k", "timings_ms": [[0.15, gather], [0.16, gather],
                                                       [0.17, plain]]}]}
    # the winner, then the best of another kind (not the runner-up of the same kind)
    assert kv.tuner_picks(record) == [
        "k: bags 8 lanes 8 unroll 2 w2 small tables last 0.1500 ms; next of another kind "
        "bags 8 lanes 8 unroll 2 w2 0.1700 ms"]
    # a config whose registers spilled is named so (the tuner ranks it after the rest)
    big = {**sliced, "SUBTILE": 1}
    spilling = {"linear_configs": [{"key": "V", "timings_ms": [[0.1, pick], [0.09, big]],
                                    "spilled": [big]}]}
    assert kv.tuner_picks(spilling) == [
        "V: 64x128x64 w4 0.1000 ms; next of another kind 128x256x64 w8 (spills) 0.0900 ms"]
    # the fused gather + dot's picks, a register-capped one among them
    capped = {**plain, "num_warps": 4, "maxnreg": 80}
    fused = {"gather_dot_configs": [{"key": "g", "timings_ms": [[0.2, capped], [0.21, plain]]}]}
    assert kv.tuner_picks(fused) == [
        "g: bags 8 lanes 8 unroll 2 w4 registers <= 80 0.2000 ms; next of another kind "
        "bags 8 lanes 8 unroll 2 w2 0.2100 ms"]
    # the floors' V record shows its picks too (which kind served the tile it measured)
    parts = {"section": "cross_parts", "B": 8192, **{f"{k}_us": 1.0 for k in (
        "cross", "plain", "epilogue_apart", "u", "arithmetic_floor", "epilogue_bytes_floor",
        "one_after_the_other", "overlapped")}, **cross}
    assert kv.summary([parts]).splitlines()[-2:] == [f"    {p}" for p in kv.tuner_picks(cross)]
