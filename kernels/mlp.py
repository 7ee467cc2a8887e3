"""A short chain of ReLU layers in one launch (the bottom MLP): out = relu(...relu(x W1^T + b1)...).

Why: at B=512 the dlrmv2 forward is a chain of 15 kernels, and each takes 3-16 us on the
H200 however little it does (the bottom MLP's first layer, K = 13, takes 2.9 us; about 1 us
more passes between two kernels). The bottom MLP (13 -> 512 -> 256 -> 128) is 9 us of
kernels and 2 gaps there; bench/notes-kernels.md counts fewer kernels as the way to the
60 us target. A program takes BLOCK_M rows through every layer, its activations never
leaving the SM:
- layer 1's outputs are formed CHUNK columns at a time, each chunk activated, rounded to
  the operands' dtype (as the layer-by-layer forward stores them) and at once multiplied
  into layer 2's fp32 accumulator, so no layer-1 activation is held whole;
- layer 2's outputs, activated and rounded, are then the operand of layer 3 (if any), formed
  N_CHUNK output columns at a time and stored.

Scope: two or three layers, every one bias + ReLU (the DLRM bottom MLP), the first K at
most ``MAX_K0``, the layer-2 width at most ``MAX_HIDDEN``; W in torch's Linear layout
([N, K], any strides), fp32 accumulation, fp32 operands with exact products. The same
rounding points as the layer-by-layer path, but another summation order inside layer 2
(K in CHUNK slices), so the same scores within the dtype's tolerance, not the same bits.
Deterministic: a fixed order per config. Off by default (``TritonModel.set_fused_bottom``,
``RECSERVE_FUSED_BOTTOM=1``) until a card says it pays: not yet run on one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import (
    FLOAT_DTYPES,
    SafeTuner,
    check_tensor,
    ieee_dot,
    next_pow2,
    output,
    weight_dtypes,
)
from .precompile import launcher

import triton  # isort: skip  (after _common, which may switch on the interpreter)
import triton.language as tl  # isort: skip

MAX_K0 = 64
MAX_HIDDEN = 256
# (BLOCK_M, CHUNK, N_CHUNK, num_warps): rows a program; layer-1 columns formed per step
# (each step holds a [CHUNK, layer-2 width] slice of W2 in registers: 32 x 256 bf16 is 16 KB,
# 32 registers a thread at 4 warps); layer-3 columns per step. Few rows a program suit
# small batches (B=512: 32 programs of 16 rows), more rows large ones (8192: 128 of 64).
CONFIGS = [
    {"BLOCK_M": 16, "CHUNK": 32, "N_CHUNK": 32, "num_warps": 4},
    {"BLOCK_M": 32, "CHUNK": 32, "N_CHUNK": 32, "num_warps": 4},
    {"BLOCK_M": 64, "CHUNK": 32, "N_CHUNK": 32, "num_warps": 4},
    {"BLOCK_M": 64, "CHUNK": 64, "N_CHUNK": 64, "num_warps": 8},
    {"BLOCK_M": 128, "CHUNK": 32, "N_CHUNK": 32, "num_warps": 8},
]
_tuner = SafeTuner("mlp", CONFIGS)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, exact fp32 products for fp32 operands (no TF32)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _relu_layer(a, w_ptr, b_ptr, cols, n, k, kmask, stride_wn, stride_wk,
                ROWS: tl.constexpr, WIDTH: tl.constexpr, IEEE: tl.constexpr):
    """relu(a @ W[cols]^T + b[cols]) [ROWS, WIDTH] fp32: columns ``cols`` (those below
    ``n``) of a layer whose inputs ``k`` (those in ``kmask``) are a's columns."""
    cmask = cols < n
    w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                mask=kmask[:, None] & cmask[None, :], other=0)  # [K, WIDTH]
    b = tl.load(b_ptr + cols, mask=cmask, other=0).to(tl.float32)
    return tl.maximum(_dot(a, w, tl.zeros([ROWS, WIDTH], dtype=tl.float32), IEEE) + b[None, :],
                      0.0)


@triton.jit(do_not_specialize=["M"])
def _mlp_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr,
    M, K0, N1, N2, N3,
    stride_xm, stride_xk, stride_om, stride_on,
    stride_w1n, stride_w1k, stride_w2n, stride_w2k, stride_w3n, stride_w3k,
    BLOCK_M: tl.constexpr, K0P: tl.constexpr, CHUNK: tl.constexpr, N2P: tl.constexpr,
    N_CHUNK: tl.constexpr, THREE: tl.constexpr, IEEE: tl.constexpr,
):
    """Rows pid*BLOCK_M .. +BLOCK_M of x [M, K0] through 2 (or, THREE, 3) ReLU layers into
    out [M, N2 or N3]; w_l [N_l, K_l], b_l [N_l]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    k0 = tl.arange(0, K0P)
    k0mask = k0 < K0
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + k0[None, :] * stride_xk,
                mask=rmask[:, None] & k0mask[None, :], other=0).to(w1_ptr.dtype.element_ty)
    n2 = tl.arange(0, N2P)
    n2mask = n2 < N2
    c = tl.arange(0, CHUNK)
    acc2 = tl.zeros([BLOCK_M, N2P], dtype=tl.float32)
    for start in range(0, N1, CHUNK):
        n1 = start + c
        h1 = _relu_layer(x, w1_ptr, b1_ptr, n1, N1, k0, k0mask, stride_w1n, stride_w1k,
                         BLOCK_M, CHUNK, IEEE).to(w2_ptr.dtype.element_ty)  # (as stored)
        w2 = tl.load(w2_ptr + n2[None, :] * stride_w2n + n1[:, None] * stride_w2k,
                     mask=(n1 < N1)[:, None] & n2mask[None, :], other=0)  # [CHUNK, N2P]
        acc2 = _dot(h1, w2, acc2, IEEE)
    b2 = tl.load(b2_ptr + n2, mask=n2mask, other=0).to(tl.float32)
    h2 = tl.maximum(acc2 + b2[None, :], 0.0).to(out_ptr.dtype.element_ty)
    if THREE:
        nc = tl.arange(0, N_CHUNK)
        for start in range(0, N3, N_CHUNK):
            n3 = start + nc
            y = _relu_layer(h2, w3_ptr, b3_ptr, n3, N3, n2, n2mask, stride_w3n, stride_w3k,
                            BLOCK_M, N_CHUNK, IEEE)
            tl.store(out_ptr + rows64[:, None] * stride_om + n3[None, :] * stride_on,
                     y.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (n3 < N3)[None, :])
    else:
        tl.store(out_ptr + rows64[:, None] * stride_om + n2[None, :] * stride_on, h2,
                 mask=rmask[:, None] & n2mask[None, :])


def fits(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """Why ``layers`` ([(W [N, K], b [N])], torch's Linear layout) cannot run as one
    ``fused_mlp`` launch, or None when they can."""
    if not 2 <= len(layers) <= 3:
        return f"{len(layers)} layers; the fused MLP takes 2 or 3"
    k0 = layers[0][0].shape[1]
    if k0 > MAX_K0:
        return f"the first layer's K is {k0}; the fused MLP takes at most {MAX_K0}"
    if layers[1][0].shape[0] > MAX_HIDDEN:
        return (f"the second layer's width is {layers[1][0].shape[0]}; the fused MLP holds "
                f"at most {MAX_HIDDEN}")
    for i, (w, b) in enumerate(layers):
        if b is None or b.shape != (w.shape[0],):
            return f"layer {i} needs a bias of {w.shape[0]}"
        given = layers[i - 1][0].shape[0] if i else w.shape[1]
        if w.shape[1] != given:
            return f"layer {i} takes K = {w.shape[1]}; layer {i - 1} gives {given}"
    return None


def fused_mlp(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
              out: torch.Tensor | None = None) -> torch.Tensor:
    """relu(... relu(x @ W1^T + b1) ...) for 2 or 3 ``layers`` in one launch; ``out``
    [M, N_last] (allocated in the weights' dtype when not given; any strides, e.g. a column
    slice of a wider buffer). x is in the weights' dtype, or fp32, rounded to it as it
    loads (as ``linear`` does)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    why = fits(layers)
    if why is not None:
        raise ValueError(why)
    dtype = layers[0][0].dtype
    check_tensor("layer 0 weight", layers[0][0], dtypes=weight_dtypes(x.dtype), ndim=2,
                 device=x.device)
    for i, (w, b) in enumerate(layers):
        check_tensor(f"layer {i} weight", w, dtypes=[dtype], ndim=2, device=x.device)
        check_tensor(f"layer {i} bias", b, ndim=1, device=x.device)
        if b.stride(0) != 1:
            raise ValueError(f"layer {i} bias must be contiguous")
    if x.shape[1] != layers[0][0].shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns; the first layer takes "
                         f"{layers[0][0].shape[1]}")
    m, width = x.shape[0], layers[-1][0].shape[0]
    out = output(out, m, width, dtype, x.device)
    if m == 0:
        return out
    (w1, b1), (w2, b2) = layers[:2]
    w3, b3 = layers[2] if len(layers) == 3 else (w2, b2)  # (unused with two layers)

    def launch(cfg: dict) -> object:  # (the compiled kernel: the tuner reads its spills)
        return launcher(_mlp_kernel, (triton.cdiv(m, cfg["BLOCK_M"]),))(
            x, w1, b1, w2, b2, w3, b3, out,
            m, x.shape[1], w1.shape[0], w2.shape[0], w3.shape[0],
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), w3.stride(0), w3.stride(1),
            BLOCK_M=cfg["BLOCK_M"], K0P=next_pow2(x.shape[1], 16), CHUNK=cfg["CHUNK"],
            N2P=next_pow2(w2.shape[0], 16), N_CHUNK=cfg["N_CHUNK"], THREE=len(layers) == 3,
            IEEE=ieee_dot(dtype), num_warps=cfg["num_warps"])

    key = (m, tuple(tuple(w.shape) for w, _ in layers), x.dtype, x.stride(), out.stride(),
           dtype)
    _tuner.run(key, launch)
    return out


def fused_mlp_reference(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]
                        ) -> torch.Tensor:
    """The same layers in plain torch, fp32, x and each layer's output rounded to the
    weights' dtype as the layer-by-layer forward stores it."""
    dtype = layers[0][0].dtype
    h = x.to(dtype)
    for w, b in layers:
        h = torch.relu(h.float() @ w.float().T + b.float()).to(dtype)
    return h
