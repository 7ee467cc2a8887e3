"""Fused linear layers: out = epilogue(A @ W^T), fp32 accumulation, one launch per layer.

Scope and limits:
- A [M, K] (any strides; optionally rows gathered through ``a_rows``), W [N, K] in torch's
  Linear layout (a transposed contiguous copy, ``W.t().contiguous().t()``, reads coalesced),
  fp32 / fp16 / bf16 operands; fp32 operands use exact fp32 products (no TF32), and so do
  bf16 ones under the interpreter, whose bf16 ``tl.dot`` is broken (Triton 3.9).
- Epilogue, in this order: + bias[n]; + add[add_rows[m], n] (the request-scope half of a
  split layer, computed once per request and broadcast to its rows); the DCNv2 cross
  update x0 * acc + x; activation none / relu / sigmoid; cast to ``out``'s dtype.
- ``final``: the next, narrow layer (H <= 8 outputs, each sigmoid or raw) is fused in: the
  program holds the whole activated row (N <= 256) and writes only the H scores (fp32).
- Deterministic: a fixed reduction order per config. Split-K configs (tuned for few rows and
  a long K) store each K slice's fp32 tile and add the slices in order in a second kernel.
- Where candidates are timed in a CUDA graph, plain layers with few rows and a long K also
  try cuBLAS through torch (``linear_configs.CUBLAS``): the same bits run to run on one
  card (cuBLAS's promise for a given GPU model and SM count; torch gives each stream its
  own workspace).
"""

from __future__ import annotations

import torch

from . import linear_configs as lc
from ._common import (
    FLOAT_DTYPES,
    SafeTuner,
    check_tensor,
    ieee_dot,
    output,
    pdl_launch,
    processors,
    weight_dtypes,
)
from .precompile import compiling, launcher
from .stagger import STAGGER_SLOTS, stagger_flags, stagger_wait

import triton  # isort: skip  (after _common, which may switch on the interpreter)
import triton.language as tl  # isort: skip

ACTIVATIONS = {"none": 0, "relu": 1, "sigmoid": 2}
MAX_FINAL_N = 256
MAX_FINAL_H = 8
_tuner = SafeTuner("linear", lc.GPU_CONFIGS)


# M (the batch) is not specialized, so one compile serves every batch size. N and K are:
# their masks sit on the contiguous axes, and only when Triton knows they are multiples of
# 16 can it keep 16-byte loads and the pipelined tensor-core path (the first H200 run,
# with N and K unspecialized, reached 92 TFLOP/s on dlrmv2's layers).
@triton.jit(do_not_specialize=["M", "H"])
def _linear_kernel(
    # pointers
    a_ptr, w_ptr, bias_ptr, out_ptr, a_rows_ptr, add_ptr, add_rows_ptr, x0_ptr, x_ptr,
    wf_ptr, bf_ptr, fact_ptr, part_ptr, stagger_ptr,
    # sizes
    M, N, K, H,
    # strides
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_addm,
    stride_x0m, stride_xm,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, A_ROWS: tl.constexpr, ADD_ROWS: tl.constexpr,
    CROSS: tl.constexpr, FINAL: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
    EPILOGUE_FIRST: tl.constexpr = False, SPLIT_K: tl.constexpr = 1,
    USE_GDC: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
    FLATTEN: tl.constexpr = True, STAGGER: tl.constexpr = False, SUBTILE: tl.constexpr = 1,
    GROUP_M: tl.constexpr = 0,
):
    """[BLOCK_M, BLOCK_N] tiles of act(A @ W^T + bias (+ add) (x0 * . + x)).

    a [M or more, K], w [N, K], bias [N], out [M, N] (or [M, H] fp32 with FINAL),
    a_rows [M], add [R, N], add_rows [M], x0/x [M, N] (CROSS), wf [H, N], bf [H], fact [H].
    One tile per program (grid: M tiles, N tiles, K slices), or with PERSISTENT a 1-D grid
    of about one program per SM slot, each walking tiles pid, pid + programs, ... (row-major
    over [M tiles, N tiles]) in one flattened loop, so the compiler can issue the next
    tile's first operand loads while this tile's epilogue runs: the shape of DCNv2's V
    layers (K = 512, a short loop, then an epilogue moving as many bytes as the output).
    FLATTEN False keeps the two loops nested (if a Triton cannot flatten them: the program
    still walks its tiles, its epilogue overlapped only by the SM's other programs).
    SPLIT_K > 1: program (m, n, s) sums K slice s only and stores the raw fp32 tile to
    part [SPLIT_K, M, N]; ``_split_k_reduce`` adds the slices in order and does the epilogue.
    STAGGER (persistent only): program p of the grid's second half starts its first tile
    when program p - programs/2 has finished its first tile's K loop (a flag in
    ``stagger_ptr``, or after a bounded wait), so that about half the programs on the card
    run their epilogues while the other half run their K loops: a test of whether V's K
    loop and epilogue run one after the other because all programs start in step. Timing
    only: no result depends on the flags.
    SUBTILE 2 or 4 (not with FINAL or EPILOGUE_FIRST): the epilogue walks the tile in that
    many column slices, each loading its own x0 and x (CROSS), so no more than a slice of
    them is live beside the accumulator: with 128x256 and 256x128 tiles the whole tile's x0
    and x spilled (sm_90: ~200 local stores and loads a tile). The same arithmetic per
    element, so the same bits.
    GROUP_M > 0 (not persistent): the grid's programs, started in launch order, take
    GROUP_M M tiles across every N tile before the next GROUP_M (``_grouped``), so the
    programs on the card at once share A's rows instead of streaming all of A once per N
    tile: for large-M layers whose A does not fit the L2. The same tiles, so the same bits.
    """
    if USE_GDC:  # launched early (PDL): nothing is read before the previous kernel is done
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if PERSISTENT:
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles = tl.cdiv(M, BLOCK_M) * tiles_n
        pid, programs = tl.program_id(0), tl.num_programs(0)
        half = programs // 2
        if STAGGER:
            if pid >= half:
                partner = pid - half
                stagger_wait(stagger_ptr + partner, stagger_ptr + STAGGER_SLOTS + partner)
        for tile in tl.range(pid, tiles, programs, flatten=FLATTEN):
            _linear_tile(
                tile // tiles_n, tile % tiles_n, 0,
                a_ptr, w_ptr, bias_ptr, out_ptr, a_rows_ptr, add_ptr, add_rows_ptr, x0_ptr,
                x_ptr, wf_ptr, bf_ptr, fact_ptr, part_ptr, M, N, K, H, stride_am, stride_ak,
                stride_wn, stride_wk, stride_om, stride_on, stride_addm, stride_x0m, stride_xm,
                BLOCK_M, BLOCK_N, BLOCK_K, ACT, HAS_BIAS, A_ROWS, ADD_ROWS, CROSS, FINAL, IEEE,
                EVEN_K, EPILOGUE_FIRST, SPLIT_K,
                stagger_ptr + pid, (tile == pid) & (pid < half), STAGGER, SUBTILE)
    else:
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        if GROUP_M > 0:
            pid_m, pid_n = _grouped(pid_m, pid_n, tl.num_programs(0), tl.num_programs(1),
                                    GROUP_M)
        _linear_tile(
            pid_m, pid_n, tl.program_id(2),
            a_ptr, w_ptr, bias_ptr, out_ptr, a_rows_ptr, add_ptr, add_rows_ptr, x0_ptr,
            x_ptr, wf_ptr, bf_ptr, fact_ptr, part_ptr, M, N, K, H, stride_am, stride_ak,
            stride_wn, stride_wk, stride_om, stride_on, stride_addm, stride_x0m, stride_xm,
            BLOCK_M, BLOCK_N, BLOCK_K, ACT, HAS_BIAS, A_ROWS, ADD_ROWS, CROSS, FINAL, IEEE,
            EVEN_K, EPILOGUE_FIRST, SPLIT_K, stagger_ptr, False, False, SUBTILE)


@triton.jit
def _grouped(x, y, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """The (M tile, N tile) of the program at (x, y) of a [tiles_m, tiles_n] grid, so that
    in launch order (x fastest) each GROUP_M consecutive M tiles (fewer in the last group)
    take every N tile before the next group starts."""
    order = y * tiles_m + x
    per_group = GROUP_M * tiles_n
    first_m = (order // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    within = order % per_group
    return first_m + within % rows, within // rows


@triton.jit
def _linear_tile(
    pid_m, pid_n, pid_k,
    a_ptr, w_ptr, bias_ptr, out_ptr, a_rows_ptr, add_ptr, add_rows_ptr, x0_ptr, x_ptr,
    wf_ptr, bf_ptr, fact_ptr, part_ptr, M, N, K, H, stride_am, stride_ak, stride_wn,
    stride_wk, stride_om, stride_on, stride_addm, stride_x0m, stride_xm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, A_ROWS: tl.constexpr, ADD_ROWS: tl.constexpr,
    CROSS: tl.constexpr, FINAL: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
    EPILOGUE_FIRST: tl.constexpr, SPLIT_K: tl.constexpr,
    signal_ptr, signal, STAGGER: tl.constexpr, SUBTILE: tl.constexpr,
):
    """Tile (pid_m, pid_n) of ``_linear_kernel`` (K slice pid_k of SPLIT_K); with STAGGER
    and ``signal``, the flag at ``signal_ptr`` is set once the K loop is done."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rows = offs_m.to(tl.int64)
    if A_ROWS:
        rows = tl.load(a_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    if CROSS and EPILOGUE_FIRST:
        # The cross update's x0 and x tiles (as many bytes as the layer's output) are loaded
        # before the K loop, so their latency hides behind it instead of following it
        # (DCNv2's V layers: K = 512, a short loop and a heavy epilogue). The other order
        # computes its masks and addresses after the loop, so nothing extra is live in it.
        x0, x = _cross_operands(x0_ptr, x_ptr, offs_m, offs_n, m_mask, n_mask, stride_x0m,
                                stride_xm)
    else:
        x0, x = 0.0, 0.0  # (loaded in the epilogue, if at all)
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:  # this program's K slice: whole BLOCK_K steps, the last one shorter
        k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = pid_k * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
        a_ptrs += k_lo * stride_ak
        w_ptrs += k_lo * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        # EVEN_K (K % BLOCK_K == 0): no mask along K, so the contiguous axis of both tiles
        # is unmasked and the pipelined loads stay full-width.
        k_mask = (k + offs_k) < K if not EVEN_K else offs_k < BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:  # (an fp32 A of a lower-precision W is rounded to W's dtype first)
            acc = tl.dot(a.to(w.dtype).to(tl.float32), w.to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(a.to(w.dtype), w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if STAGGER:
        if signal:  # this program's partner in the grid's second half may start now
            tl.atomic_xchg(signal_ptr, 1)
    mn_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        part = (part_ptr + pid_k.to(tl.int64) * M * N
                + offs_m[:, None].to(tl.int64) * N + offs_n[None, :])
        tl.store(part, acc, mask=mn_mask)
    elif SUBTILE > 1:  # the whole K, the epilogue slice by slice
        tl.static_assert(not FINAL and not EPILOGUE_FIRST, "SUBTILE: a plain epilogue only")
        tl.static_assert(SUBTILE == 2 or SUBTILE == 4, "SUBTILE is 1, 2 or 4")
        col = pid_n * BLOCK_N
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        if SUBTILE == 2:
            _epilogue_slice(left, col, BLOCK_N // 2, offs_m, m_mask, N, bias_ptr, out_ptr,
                            add_ptr, add_rows_ptr, x0_ptr, x_ptr, stride_om, stride_on,
                            stride_addm, stride_x0m, stride_xm, ACT, HAS_BIAS, ADD_ROWS, CROSS)
            _epilogue_slice(right, col + BLOCK_N // 2, BLOCK_N // 2, offs_m, m_mask, N,
                            bias_ptr, out_ptr, add_ptr, add_rows_ptr, x0_ptr, x_ptr, stride_om,
                            stride_on, stride_addm, stride_x0m, stride_xm, ACT, HAS_BIAS,
                            ADD_ROWS, CROSS)
        else:
            q0, q1 = _halves(left, BLOCK_M, BLOCK_N // 2)
            q2, q3 = _halves(right, BLOCK_M, BLOCK_N // 2)
            _epilogue_slice(q0, col, BLOCK_N // 4, offs_m, m_mask, N, bias_ptr, out_ptr,
                            add_ptr, add_rows_ptr, x0_ptr, x_ptr, stride_om, stride_on,
                            stride_addm, stride_x0m, stride_xm, ACT, HAS_BIAS, ADD_ROWS, CROSS)
            _epilogue_slice(q1, col + BLOCK_N // 4, BLOCK_N // 4, offs_m, m_mask, N,
                            bias_ptr, out_ptr, add_ptr, add_rows_ptr, x0_ptr, x_ptr, stride_om,
                            stride_on, stride_addm, stride_x0m, stride_xm, ACT, HAS_BIAS,
                            ADD_ROWS, CROSS)
            _epilogue_slice(q2, col + BLOCK_N // 2, BLOCK_N // 4, offs_m, m_mask, N,
                            bias_ptr, out_ptr, add_ptr, add_rows_ptr, x0_ptr, x_ptr, stride_om,
                            stride_on, stride_addm, stride_x0m, stride_xm, ACT, HAS_BIAS,
                            ADD_ROWS, CROSS)
            _epilogue_slice(q3, col + 3 * BLOCK_N // 4, BLOCK_N // 4, offs_m, m_mask, N,
                            bias_ptr, out_ptr, add_ptr, add_rows_ptr, x0_ptr, x_ptr, stride_om,
                            stride_on, stride_addm, stride_x0m, stride_xm, ACT, HAS_BIAS,
                            ADD_ROWS, CROSS)
    else:  # the whole K: the epilogue here
        acc = _epilogue(acc, offs_m, offs_n, m_mask, n_mask, mn_mask, bias_ptr, add_ptr,
                        add_rows_ptr, x0_ptr, x_ptr, stride_addm, stride_x0m, stride_xm, x0, x,
                        ACT, HAS_BIAS, ADD_ROWS, CROSS, EPILOGUE_FIRST)
        if FINAL:
            # The whole row is in this program (grid has one N tile): reduce it to H scores.
            acc = tl.where(mn_mask, acc, 0.0)
            for h in range(H):
                wf = tl.load(wf_ptr + h * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                score = tl.sum(acc * wf[None, :], axis=1) + tl.load(bf_ptr + h).to(tl.float32)
                score = tl.where(tl.load(fact_ptr + h) != 0, tl.sigmoid(score), score)
                tl.store(out_ptr + offs_m.to(tl.int64) * stride_om + h * stride_on, score,
                         mask=m_mask)
        else:
            _store(acc, out_ptr, offs_m, offs_n, mn_mask, stride_om, stride_on)


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce(part_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on,
                    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_GDC: tl.constexpr = False):
    """out = act(sum over s of part[s] + bias): the K slices added in a fixed order (s = 0,
    1, ...), so a split-K layer is as deterministic as an unsplit one."""
    if USE_GDC:  # (as in _linear_kernel)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    part = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.load(part, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part + s * M * N, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    if ACT == 2:
        acc = tl.sigmoid(acc)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_operands(x0_ptr, x_ptr, offs_m, offs_n, m_mask, n_mask, stride_x0m, stride_xm):
    """The [BLOCK_M, BLOCK_N] tiles of x0 and x for the DCNv2 cross update."""
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m[:, None].to(tl.int64)
    x0 = tl.load(x0_ptr + rows * stride_x0m + offs_n[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + rows * stride_xm + offs_n[None, :], mask=mask, other=0.0)
    return x0, x


@triton.jit
def _halves(tile, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The left and right [ROWS, COLS / 2] halves of a [ROWS, COLS] register tile."""
    pairs = tl.permute(tl.reshape(tile, (ROWS, 2, COLS // 2)), (0, 2, 1))
    return tl.split(pairs)


@triton.jit
def _epilogue_slice(acc, col, WIDTH: tl.constexpr, offs_m, m_mask, N, bias_ptr, out_ptr,
                    add_ptr, add_rows_ptr, x0_ptr, x_ptr, stride_om, stride_on, stride_addm,
                    stride_x0m, stride_xm, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ADD_ROWS: tl.constexpr, CROSS: tl.constexpr):
    """``_linear_tile``'s plain epilogue (bias, add, cross update, activation, store) for
    the columns col .. col + WIDTH of its tile (``acc``: their fp32 sums), in the same
    order per element as the whole tile's."""
    offs_n = col + tl.arange(0, WIDTH)
    n_mask = offs_n < N
    mn_mask = m_mask[:, None] & n_mask[None, :]
    acc = _epilogue(acc, offs_m, offs_n, m_mask, n_mask, mn_mask, bias_ptr, add_ptr,
                    add_rows_ptr, x0_ptr, x_ptr, stride_addm, stride_x0m, stride_xm, 0.0, 0.0,
                    ACT, HAS_BIAS, ADD_ROWS, CROSS, False)
    _store(acc, out_ptr, offs_m, offs_n, mn_mask, stride_om, stride_on)


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_mask, n_mask, mn_mask, bias_ptr, add_ptr, add_rows_ptr,
              x0_ptr, x_ptr, stride_addm, stride_x0m, stride_xm, x0, x, ACT: tl.constexpr,
              HAS_BIAS: tl.constexpr, ADD_ROWS: tl.constexpr, CROSS: tl.constexpr,
              LOADED: tl.constexpr):
    """acc (fp32 sums of the rows ``offs_m`` and columns ``offs_n``) + bias + add rows, the
    cross update x0 * . + x (x0 and x given when LOADED, else loaded here), activated."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ADD_ROWS:
        owner = tl.load(add_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        acc += tl.load(add_ptr + owner[:, None] * stride_addm + offs_n[None, :], mask=mn_mask,
                       other=0.0).to(tl.float32)
    if CROSS:
        if not LOADED:
            x0, x = _cross_operands(x0_ptr, x_ptr, offs_m, offs_n, m_mask, n_mask, stride_x0m,
                                    stride_xm)
        # one rounding whichever the order (the compiler may contract a * b + c or not)
        acc = tl.fma(x0.to(tl.float32), acc, x.to(tl.float32))
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    if ACT == 2:
        acc = tl.sigmoid(acc)
    return acc


@triton.jit
def _store(acc, out_ptr, offs_m, offs_n, mask, stride_om, stride_on):
    """The tile ``acc`` into ``out`` at rows ``offs_m`` and columns ``offs_n``, in out's type."""
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           a_rows: torch.Tensor | None, add: torch.Tensor | None, add_rows: torch.Tensor | None,
           cross: tuple[torch.Tensor, torch.Tensor] | None, m: int) -> None:
    check_tensor("a", a, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=weight_dtypes(a.dtype), ndim=2, device=a.device)
    n, k = weight.shape
    if a.shape[1] != k:
        raise ValueError(f"a has shape {list(a.shape)} but weight has {list(weight.shape)}: "
                         f"K differs ({a.shape[1]} vs {k})")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1, device=a.device)
        if bias.shape[0] != n or bias.stride(0) != 1:
            raise ValueError(f"bias has shape {list(bias.shape)}; expected contiguous [{n}]")
    if a_rows is not None:
        check_tensor("a_rows", a_rows, dtypes=[torch.int32, torch.int64], ndim=1,
                     device=a.device)
    if (add is None) != (add_rows is None):
        raise ValueError("add and add_rows come together")
    if add is not None:
        check_tensor("add", add, dtypes=FLOAT_DTYPES, ndim=2, device=a.device)
        check_tensor("add_rows", add_rows, dtypes=[torch.int32, torch.int64], ndim=1,
                     device=a.device)
        if add.shape[1] != n or add.stride(1) != 1 or add_rows.shape[0] != m:
            raise ValueError(f"add {list(add.shape)} / add_rows {list(add_rows.shape)} do not "
                             f"fit M={m}, N={n} (add needs unit column stride)")
    if cross is not None:
        for what, t in zip(("x0", "x"), cross, strict=True):
            check_tensor(what, t, dtypes=FLOAT_DTYPES, ndim=2, device=a.device)
            if list(t.shape) != [m, n] or t.stride(1) != 1:
                raise ValueError(f"cross {what} has shape {list(t.shape)}, strides "
                                 f"{t.stride()}; expected [{m}, {n}] with unit column stride")


def linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str = "none", out: torch.Tensor | None = None,
           a_rows: torch.Tensor | None = None, add: torch.Tensor | None = None,
           add_rows: torch.Tensor | None = None,
           cross: tuple[torch.Tensor, torch.Tensor] | None = None,
           final: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """act(A[a_rows] @ W^T + bias + add[add_rows]), optionally x0 * (.) + x before act.

    ``final`` = (wf [H, N], bf [H], sigmoid [H] int32) fuses the next, narrow layer and
    returns fp32 scores [M, H]; otherwise returns ``out`` [M, N] (allocated in W's dtype
    when not given; it may be a strided view, e.g. a column slice of a wider buffer).
    A is in W's dtype, or fp32 with a bf16 or fp16 W: each element rounded to W's dtype
    as it loads, the same products as rounding A first, without a kernel to do it.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}; expected one of {list(ACTIVATIONS)}")
    m = a_rows.shape[0] if a_rows is not None else a.shape[0]
    _check(a, weight, bias, a_rows, add, add_rows, cross, m)
    n, k = weight.shape
    h = 0
    if final is not None:
        wf, bf, fact = final
        h = wf.shape[0]
        if n > MAX_FINAL_N or h > MAX_FINAL_H or list(wf.shape) != [h, n] or not wf.is_contiguous():
            raise ValueError(f"final layer {list(wf.shape)} does not fit N={n} <= {MAX_FINAL_N}, "
                             f"H <= {MAX_FINAL_H} (contiguous)")
        if bf.shape != (h,) or fact.shape != (h,) or fact.dtype != torch.int32:
            raise ValueError(f"final bias {list(bf.shape)} / sigmoid flags {list(fact.shape)} "
                             f"{fact.dtype} must be [{h}] (flags int32)")
        width, out_dtype = h, torch.float32
    else:
        width, out_dtype = n, weight.dtype
    out = output(out, m, width, out_dtype, a.device)
    if m == 0:
        return out
    dummy = weight
    x0, x = cross if cross is not None else (dummy, dummy)
    wf, bf, fact = final if final is not None else (dummy, dummy, dummy)

    def launch(cfg: dict) -> object:  # (the compiled kernel: the tuner reads its spills)
        if cfg.get("CUBLAS"):
            if not compiling():  # (nothing to compile: the library's kernels are built)
                _cublas(a, weight, bias, activation, out)
            return None
        split = cfg.get("SPLIT_K", 1)
        part = dummy
        if split > 1:  # fp32 partial tiles, one [M, N] slab per K slice
            part = torch.empty(split, m, n, device=a.device, dtype=torch.float32)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
        persistent = "PER_SM" in cfg
        if persistent:  # as many programs as fit the card at once (fewer if fewer tiles)
            grid = (min(grid[0] * grid[1], cfg["PER_SM"] * processors(a.device)), 1, 1)
        stagger = persistent and cfg.get("STAGGER", False)
        kernel = launcher(_linear_kernel, grid)(
            a, weight, bias if bias is not None else dummy, out,
            a_rows if a_rows is not None else dummy, add if add is not None else dummy,
            add_rows if add_rows is not None else dummy, x0, x, wf, bf, fact, part,
            stagger_flags(a.device, grid[0]) if stagger else dummy,
            m, n, k, h,
            a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
            out.stride(0), out.stride(1), add.stride(0) if add is not None else 0,
            x0.stride(0), x.stride(0),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, A_ROWS=a_rows is not None,
            ADD_ROWS=add is not None, CROSS=cross is not None, FINAL=final is not None,
            IEEE=ieee_dot(weight.dtype), EVEN_K=k % cfg["BLOCK_K"] == 0,
            EPILOGUE_FIRST=cfg.get("EPILOGUE_FIRST", False), SPLIT_K=split,
            PERSISTENT=persistent, FLATTEN=cfg.get("FLATTEN", True), STAGGER=stagger,
            SUBTILE=cfg.get("SUBTILE", 1), GROUP_M=cfg.get("GROUP_M", 0),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **pdl_launch())
        if split > 1:
            launcher(_split_k_reduce, (triton.cdiv(m, 32), triton.cdiv(n, 128)))(
                part, bias if bias is not None else dummy, out, m, n, out.stride(0),
                out.stride(1), SPLIT_K=split, BLOCK_M=32, BLOCK_N=128,
                ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, num_warps=4,
                **pdl_launch())
        return kernel

    # (the bias's dtype, not only whether there is one: it decides the cuBLAS candidate)
    key = (m, n, k, h, a.dtype, activation, None if bias is None else bias.dtype,
           a_rows is not None, add is not None, cross is not None, a.stride(), weight.stride(),
           out.stride(), weight.dtype)
    plain = final is None and cross is None and add is None and a_rows is None
    _tuner.run(key, launch, lc.candidates(
        m, n, k, a.element_size(), final=final is not None, cross=cross is not None,
        plain=plain, library=plain and weight.dtype == a.dtype
        and (bias is None or bias.dtype == a.dtype)))
    return out


def _cublas(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            activation: str, out: torch.Tensor) -> None:
    """A plain layer through torch (cuBLAS on a card; ``linear_configs.CUBLAS``): the bias
    and a ReLU in cuBLASLt's epilogue where torch fuses them, a sigmoid after."""
    if bias is None:
        torch.mm(a, weight.t(), out=out)
        if activation == "relu":
            out.relu_()
    elif activation == "relu":
        torch._addmm_activation(bias, a, weight.t(), out=out)
    else:
        torch.addmm(bias, a, weight.t(), out=out)
    if activation == "sigmoid":
        out.sigmoid_()


def linear_reference(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     activation: str = "none", a_rows: torch.Tensor | None = None,
                     add: torch.Tensor | None = None, add_rows: torch.Tensor | None = None,
                     cross: tuple[torch.Tensor, torch.Tensor] | None = None,
                     final: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """The same computation in plain torch, fp32."""
    a = a.float()
    if a_rows is not None:
        a = a[a_rows.long()]
    y = a @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    if add is not None:
        y = y + add.float()[add_rows.long()]
    if cross is not None:
        y = cross[0].float() * y + cross[1].float()
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "sigmoid":
        y = torch.sigmoid(y)
    if final is not None:
        wf, bf, fact = final
        s = y @ wf.float().T + bf.float()
        y = torch.where(fact.bool()[None, :], torch.sigmoid(s), s)
    return y
