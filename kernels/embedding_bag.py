"""Table-batched embedding bags: every sparse feature of one table dtype in ONE launch.

Scope and limits:
- Tables of one dtype (fp32, fp16, bf16, or int8 row-wise: uint8 codes with an fp32 scale
  and offset per row, stored inline after each row's codes) are packed into one flat
  buffer (``PackedTables``) with int64 bases and row strides, so one launch reads all of
  them. A model mixing table dtypes launches once
  per dtype group.
- Input is CSR: all features' indices back to back (int32 or int64), and per feature
  ``bags + 1`` absolute offsets (int32 or int64) concatenated in feature order. Or, with
  ``ends``, any order: bag b spans ``indices[offsets[b]:ends[b]]``, so a caller can lay ids
  out request by request (the engine's staging: one copy per request, not per feature).
- sum or mean pooling, optional per-value weights, fp32 accumulation, empty bags give zeros;
  the pooled vector is cast to ``out``'s dtype and written straight into its column slice
  of ``out`` (the interaction input), at any row stride.
- Candidate-scope features have one bag per output row; request-scope features have one
  bag per request, gathered once and written to every row of that request
  (``request_offsets``), so rows are never gathered per candidate.
- Bounds: an index outside [0, rows) of its table is masked (reads nothing, adds nothing)
  and sets ``bad[request]`` to 1, so the caller can fail that request alone.
- Long bags (features whose ``max_bag`` >= ``LANES``) take one bag per program and read
  ``LANES`` positions per step; their programs are ordered first so they never form the
  tail (then, as a tuning candidate, the rest by their table's bytes, the small tables'
  programs last, so their rows meet again in L2: ``SMALL_LAST``, ``tables.program_order``).
  Short bags take ``BAGS`` bags per program, one position each per step. With
  ``PROGRAM_ROWS`` a program pools several such tiles (or several long bags) one after
  another, about that many rows by each feature's ``max_bag``, fetching the next tile's
  bounds and first ids while this tile's rows load (``tables.feature_tiles``). UNROLL 2 (or 4)
  issues two (four) steps' loads at once, and ids are prefetched a step ahead (``PREFETCH``);
  STAGES > 1 pipelines the loop instead, rows staged in shared memory a few steps ahead.
- Row loads and stores are 16 bytes wide when every table base, dim and out column is a
  multiple of 16 elements (``ALIGN``, checked on the host).
- Deterministic: no atomics; every sum has a fixed order.

The kernel's device functions (row loads, the pooling loops, the store) are in ``pooling``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import SafeTuner, check_tensor, l2_bytes, next_pow2, pdl_launch, trial_configs
from .gather_dot import GROUP, ThenDot
from .pooling import _pool_program
from .precompile import launcher
from .tables import (
    INDEX_DTYPES,
    BagFeature,
    PackedTables,
    alignment,
    check_bounds,
    check_csr,
    check_launch,
    kept_tables,
    launch_plan,
)

import triton  # isort: skip  (after _common, which may switch on the interpreter)
import triton.language as tl  # isort: skip

__all__ = ["CONFIGS", "BagFeature", "PackedTables", "check_bounds", "check_csr", "embedding_bag",
           "embedding_bag_reference"]
# (BAGS, LANES, UNROLL, STAGES, num_warps); rows per tile stay <= 16 (Triton 3.6 broke at
# 32). UNROLL 2: two tiles' loads in flight per step (half the dependent steps per bag, the
# same sums in the same order). STAGES > 1: the loop is software-pipelined, rows copied
# into shared memory (cp.async) STAGES - 1 steps ahead, so more rows are in flight than
# registers allow (the gather is bound by rows in flight: bench/notes-kernels.md); the
# compiler then fetches ids ahead itself, so those configs run without PREFETCH.
CONFIGS = [
    {"BAGS": 16, "LANES": 16, "UNROLL": 1, "STAGES": 1, "num_warps": 4},
    {"BAGS": 8, "LANES": 16, "UNROLL": 1, "STAGES": 1, "num_warps": 4},
    {"BAGS": 16, "LANES": 16, "UNROLL": 1, "STAGES": 1, "num_warps": 8},
    {"BAGS": 8, "LANES": 8, "UNROLL": 1, "STAGES": 1, "num_warps": 2},
    {"BAGS": 4, "LANES": 16, "UNROLL": 1, "STAGES": 1, "num_warps": 2},
    {"BAGS": 16, "LANES": 16, "UNROLL": 2, "STAGES": 1, "num_warps": 4},
    {"BAGS": 8, "LANES": 8, "UNROLL": 2, "STAGES": 1, "num_warps": 2},
    {"BAGS": 16, "LANES": 16, "UNROLL": 1, "STAGES": 3, "num_warps": 4},
    {"BAGS": 16, "LANES": 16, "UNROLL": 1, "STAGES": 4, "num_warps": 4},
    {"BAGS": 8, "LANES": 8, "UNROLL": 1, "STAGES": 4, "num_warps": 2},
]
# Several tiles a program (PROGRAM_ROWS: about that many rows a program, by each feature's
# max_bag, ``tables.feature_tiles``; host-side, so a base config compiles once for all of
# them), the next tile's bounds and first ids fetched during this tile's rows. At B=8192
# the H200's pick (8 bags, 8 lanes, 2 warps) runs ~70k programs for dlrmv2, most of them a
# few rows after a chain of four dependent loads (program map, metadata, bag bounds, ids);
# the plain reader of the same rows fell from 286 to 106 us as its programs went from 32 to
# 256 rows (bench/notes-kernels.md, twentieth session). LONG_ONLY: the long-bag features
# only (at LANES 8 dlrmv2's 8- to 27-hot ones pool one bag a program in 1-4 steps, 40k of
# the 70k programs at B=8192). Several tiles cost the 8-bag config 22 registers (71 to 93,
# sm_90, Triton 3.6), most of them in the short-bag path, whose one-tile code LONG_ONLY
# keeps (78 registers in all).
_EIGHT = {"BAGS": 8, "LANES": 8, "UNROLL": 1, "STAGES": 1, "num_warps": 2}
_SIXTEEN = {"BAGS": 16, "LANES": 16, "UNROLL": 1, "STAGES": 1, "num_warps": 4}
CONFIGS += [{**_EIGHT, "PROGRAM_ROWS": rows} for rows in (32, 64, 128)] \
    + [{**_SIXTEEN, "PROGRAM_ROWS": rows} for rows in (64, 256)] \
    + [{**_EIGHT, "PROGRAM_ROWS": rows, "LONG_ONLY": True} for rows in (32, 64)]
# Trial candidates (``trial_configs``; fourteenth session; they lost on the seventeenth's
# H200 at B=8192: bf16 0.182 ms against 0.158, int8 0.219 against 0.171): four tiles'
# loads in flight per step (UNROLL 4: a short bag's 4 positions, a long bag's 4 x LANES),
# each tile still at most 16 rows. For the gather being bound by rows in flight, should
# ``bench/floors.py``'s plain reader of the same rows show it well under the gather's time.
TRIAL_CONFIGS = [
    {"BAGS": 8, "LANES": 16, "UNROLL": 4, "STAGES": 1, "num_warps": 4},
    {"BAGS": 16, "LANES": 16, "UNROLL": 4, "STAGES": 1, "num_warps": 8},
]
# Switches for ``bench/kernel_variants.py``: both False give the kernel of the first H200
# run (one element per load instruction, ids and rows loaded back to back). Whatever they
# say, that proven kernel is also among the tuning candidates (see ``_candidates``).
ALIGN_HINTS = True
"""Alignment hints (16-byte row loads and stores where ``alignment`` allows)."""
PREFETCH = True
"""Load each step's ids one step ahead of the rows they address."""
L2_KEEP_SHARE = 0.5
"""The share of the device's L2 that the tables kept there (``kept_tables``) may fill."""


@triton.jit
def _embedding_bag_kernel(
    # pointers
    table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
    out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr, prog_feature_ptr, meta_ptr,
    # strides
    out_stride,
    # meta-parameters
    BAGS: tl.constexpr, LANES: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, WEIGHTED: tl.constexpr, ALIGN: tl.constexpr,
    PREFETCH: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr,
    USE_GDC: tl.constexpr = False, L2_KEEP: tl.constexpr = False,
    MULTI_TILE: tl.constexpr = 0,
):
    """One program pools BAGS short bags, or one long bag LANES positions at a time; with
    MULTI_TILE (``multi_tile``), its feature's ``tiles`` (meta) such tiles or long bags, one
    after another.

    table [sum rows * row_stride] flat (QUANT: uint8 rows with their fp32 scale and offset
    inline, see ``PackedTables``),
    indices [nnz],
    offsets [sum (bags_f + 1)] absolute into indices (bag starts), ends [the same] bag ends
    (CSR: offsets shifted by one), weights [nnz] fp32 (WEIGHTED),
    out [B, out_stride] (columns out_col .. out_col+dim per feature), bad [R] int32,
    row_request [B], request_offsets [R + 1], prog_feature [programs] int32,
    meta [F, 10] int64 (see ``_META_COLS``).
    """
    if USE_GDC:  # launched early (PDL): nothing is read before the previous kernel is done
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    _pool_program(tl.program_id(0), table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
                  out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr, prog_feature_ptr,
                  meta_ptr, out_stride, BAGS, LANES, BLOCK_D, QUANT, WEIGHTED, ALIGN, PREFETCH,
                  UNROLL, STAGES, L2_KEEP, 0, MULTI_TILE)


def multi_tile(config: dict) -> int:
    """The kernel's MULTI_TILE for a config: 0 one tile a program, 1 several long bags a
    program (``LONG_ONLY``), 2 several tiles of either kind (``PROGRAM_ROWS``)."""
    if not config.get("PROGRAM_ROWS"):
        return 0
    return 1 if config.get("LONG_ONLY") else 2


_tuner = SafeTuner("embedding_bag", CONFIGS)
_dot_tuner = SafeTuner("gather_dot", CONFIGS)


def _candidates(align: int, l2_keep: bool, sizes_differ: bool = False) -> list[dict]:
    """Tuning candidates: every config (and ``TRIAL_CONFIGS`` with the trial candidates
    on) with the switches' variant, with ``sizes_differ``
    (the launch's tables differ in bytes) each also with its programs ordered small tables
    last (``SMALL_LAST``, ``tables.program_order``: the same compiled kernel, another grid
    order, so no compile), with ``l2_keep`` (some
    but not all of the launch's tables are kept in L2, see ``kept_tables``; only with the
    trial candidates on, ``trial_configs``: on the H200 the hint was 8-39% slower) each
    unpipelined one also with the L2 hint, then the first H200 run's proven kernel, so a
    variant that fails to compile on the card only loses speed."""
    configs = CONFIGS + (TRIAL_CONFIGS if trial_configs() else [])
    out = [{**c, "ALIGN": align, "PREFETCH": PREFETCH and c["STAGES"] == 1} for c in configs]
    if sizes_differ:
        out += [{**c, "SMALL_LAST": True} for c in out]
    if l2_keep:
        out += [{**c, "L2_KEEP": True} for c in out if c["STAGES"] == 1]
    if align > 1 or PREFETCH:
        out.append({**CONFIGS[0], "ALIGN": 1, "PREFETCH": False})
    return out


def embedding_bag(packed: PackedTables, features: Sequence[BagFeature], indices: torch.Tensor,
                  offsets: torch.Tensor, out: torch.Tensor, *,
                  weights: torch.Tensor | None = None, row_request: torch.Tensor | None = None,
                  request_offsets: torch.Tensor | None = None,
                  bad: torch.Tensor | None = None,
                  ends: torch.Tensor | None = None,
                  then_dot: ThenDot | None = None) -> torch.Tensor:
    """Pool every feature's bags into its slice of ``out`` [B, W] in one launch.

    ``offsets`` holds, per feature in order, bags+1 absolute positions into ``indices``
    (bags = B for candidate scope, R for request scope). Without ``ends`` they are CSR
    (bag b ends where b + 1 starts); with ``ends`` (same shape and dtype) bag b spans
    ``offsets[b]:ends[b]`` and each feature's last slot is unused, so bags may lie anywhere
    in ``indices``. ``row_request`` [B] maps rows to
    requests and ``request_offsets`` [R + 1] gives each request's rows (needed with
    request-scope features; both default to one request per row). Returns ``bad`` [R]
    int32: 1 where a request sent an index outside its table (those rows read nothing).
    A ``bad`` given is only ever set, never cleared: pass zeros, or the flags of the same
    forward's earlier launches (one buffer for every launch of a forward, so no kernel
    ORs them, and one the engine's staging zeroes with each batch's copy-in). Without it,
    a new zeroed one.
    CSR consistency (monotone offsets, or 0 <= start <= end <= nnz per bag, within
    [0, nnz]) is the caller's: see ``check_csr`` and ``check_bounds``.

    ``then_dot``: the same launch also forms the dot interaction of ``out`` (E) into
    ``then_dot.z``, each row as soon as its last bag is pooled (``gather_dot``:
    candidate-scope features only, the rest of E written before).
    """
    features = tuple(features)
    num_rows = out.shape[0]
    if request_offsets is None:
        if any(f.request_scope for f in features):
            raise ValueError("request-scope features need request_offsets")
        request_offsets = torch.arange(num_rows + 1, device=out.device, dtype=torch.int64)
    num_requests = request_offsets.shape[0] - 1
    if row_request is None:
        if num_requests != num_rows:
            raise ValueError(f"row_request is needed when R={num_requests} != B={num_rows}")
        row_request = request_offsets[:-1]
    check_launch(packed, features, indices, offsets, out, weights, num_requests)
    if then_dot is not None:
        then_dot.check(packed, features, out)
    if ends is None:
        ends = offsets[1:]  # CSR: a view, bag b's end is bag b + 1's start
    else:
        check_tensor("ends", ends, dtypes=[offsets.dtype], ndim=1, device=packed.device)
        if ends.shape != offsets.shape:
            raise ValueError(f"ends has shape {list(ends.shape)}; offsets has "
                             f"{list(offsets.shape)} (one end per start)")
    check_tensor("row_request", row_request, dtypes=INDEX_DTYPES, ndim=1, device=packed.device)
    if bad is None:
        bad = torch.zeros(num_requests, dtype=torch.int32, device=out.device)
    else:
        check_tensor("bad", bad, dtypes=[torch.int32], ndim=1, device=packed.device)
        if bad.shape[0] != num_requests or bad.stride(0) != 1:
            raise ValueError(f"bad has shape {list(bad.shape)}, stride {bad.stride()}; "
                             f"expected contiguous [{num_requests}] (one flag per request)")
    if not features or num_rows == 0:
        return bad
    block_d = next_pow2(max(packed.dims[f.table] for f in features), 16)
    weighted = any(f.weighted for f in features)
    align = alignment(packed, features, out) if ALIGN_HINTS else 1
    kept = kept_tables(packed, features, l2_bytes(packed.device) * L2_KEEP_SHARE) \
        if trial_configs() else frozenset()  # (the hint is a trial candidate)

    def launch(cfg: dict) -> object:  # (the compiled kernel: the tuner reads its spills)
        meta, prog_feature, programs = launch_plan(
            packed, features, num_rows, num_requests, cfg["BAGS"], cfg["LANES"], kept,
            cfg.get("SMALL_LAST", False), 0 if then_dot is None else GROUP,
            cfg.get("PROGRAM_ROWS", 0), cfg.get("LONG_ONLY", False))
        args = (packed.data, indices, offsets, ends, weights if weighted else indices, out, bad,
                row_request, request_offsets, prog_feature, meta)
        params = dict(BAGS=cfg["BAGS"], LANES=cfg["LANES"], BLOCK_D=block_d,
                      QUANT=packed.quantized, WEIGHTED=weighted, ALIGN=cfg["ALIGN"],
                      PREFETCH=cfg["PREFETCH"], UNROLL=cfg["UNROLL"], STAGES=cfg["STAGES"],
                      L2_KEEP=cfg.get("L2_KEEP", False), num_warps=cfg["num_warps"],
                      **pdl_launch())
        if then_dot is None:
            return launcher(_embedding_bag_kernel, (programs,))(*args, out.stride(0),
                                                            MULTI_TILE=multi_tile(cfg), **params)
        return then_dot.launch(programs, args, out, len(features), params, cfg)

    key = (packed.dtype, block_d, weighted, features, num_rows, num_requests, out.dtype,
           indices.dtype, align, PREFETCH, kept)
    some = 0 < len(kept) < len({f.table for f in features})
    sizes = {packed.table_bytes(f.table) for f in features}
    candidates = _candidates(align, some, len(sizes) > 1)
    if then_dot is None:
        tuner = _tuner
    else:  # (the fused launch counts a program's rows as one tile's: no multi-tile programs)
        tuner, key = _dot_tuner, key + then_dot.key()
        candidates = then_dot.candidates([c for c in candidates if not c.get("PROGRAM_ROWS")])
    # The flags as they are before this key tunes (earlier launches of the forward may
    # have set some): each candidate starts from them. A copy on a key's first sight only.
    flags_before = bad.clone() if key not in tuner.best else None

    def outputs() -> list[tuple[torch.Tensor, float | torch.Tensor]]:
        # What a launch writes: every config must give the same bits (same sums, same
        # order), so the tuner drops one that does not (a miscompile that still runs).
        cols = [out[:, f.out_col:f.out_col + packed.dims[f.table]] for f in features]
        z = [] if then_dot is None else [(then_dot.z, float("nan"))]
        return [(c, float("nan")) for c in cols] + [(bad, flags_before)] + z

    tuner.run(key, launch, candidates, outputs)
    return bad


def embedding_bag_reference(tables: Sequence[torch.Tensor], features: Sequence[BagFeature],
                            indices: torch.Tensor, offsets: torch.Tensor, num_rows: int, *,
                            weights: torch.Tensor | None = None,
                            request_offsets: torch.Tensor | None = None
                            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Plain-torch fp32 pooling: per feature [B, dim] (broadcast for request scope), bad [R].

    ``tables`` are fp32 (dequantize int8 first). Out-of-range indices add nothing.
    """
    if request_offsets is None:
        request_offsets = torch.arange(num_rows + 1)
    request_offsets = request_offsets.cpu().to(torch.int64)
    num_requests = request_offsets.shape[0] - 1
    row_request = torch.repeat_interleave(torch.arange(num_requests),
                                          request_offsets[1:] - request_offsets[:-1])
    indices, offsets = indices.cpu().to(torch.int64), offsets.cpu().to(torch.int64)
    bad = torch.zeros(num_requests, dtype=torch.bool)
    pooled, base = [], 0
    for f in features:
        table = tables[f.table].float().cpu()
        count = num_requests if f.request_scope else num_rows
        offs = offsets[base:base + count + 1]
        base += count + 1
        idx = indices[offs[0]:offs[-1]]
        ok = (idx >= 0) & (idx < table.shape[0])
        w = ok.float()
        if f.weighted:
            w = w * weights.cpu()[offs[0]:offs[-1]]
        bag_of = torch.repeat_interleave(torch.arange(count), offs[1:] - offs[:-1])
        owner = bag_of if f.request_scope else row_request[bag_of]
        bad[owner[~ok]] = True
        sums = F.embedding_bag(torch.where(ok, idx, 0), table, offs[:-1] - offs[0],
                               mode="sum", per_sample_weights=w)
        if f.mean:
            sums = sums / (offs[1:] - offs[:-1]).clamp_min(1).float()[:, None]
        pooled.append(sums[row_request] if f.request_scope else sums)
    return pooled, bad
