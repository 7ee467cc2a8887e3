"""Feature interactions: the DLRM dot interaction kernel and the DCNv2 cross layer.

Dot: each row holds T vectors of width D back to back (``v`` [B, >= T*D], vector t at
columns t*D .. t*D+D, x first); a program loads ROWS rows' [T, D] tiles, forms the Gram
matrix on the tensor cores (fp32 accumulation) and scatters the wanted pairs through a
precomputed destination map, so the output layout is free: the reference order
([x, pairs i > j row-major], or i >= j with self-interaction), or any column permutation
(the model puts request-only columns first so the next layer can split W·[u;i]).
Limits: T <= 128, D <= 512 per tile; the Gram is computed in full (T^2 D per row), which
is a few percent of the first top-MLP layer's FLOPs for DLRM shapes.

DCNv2 cross layer x_{l+1} = x0 * (V (U x_l) + b) + x_l is two fused GEMMs: ``linear`` for
U x_l, then ``linear`` with the cross epilogue (see ``cross_layer``).
"""

from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES, SafeTuner, check_tensor, ieee_dot, next_pow2, pdl_launch
from .linear import linear
from .precompile import launcher

import triton  # isort: skip  (after _common, which may switch on the interpreter)
import triton.language as tl  # isort: skip

# Tuning candidates. The first is the proven one (the H200 ran it at 48.8 us for dlrm-dot at
# B=8192, about 3x the time its 65 MB take to move): ROWS rows one after another, each
# load waiting on the previous row's store. BATCHED loads all ROWS rows' [T, D] tiles at
# once and forms their Gram matrices in one batched dot, so a program has ROWS rows in
# flight (the H200's pick since the twelfth session: 2 rows, 35-39 us at B=8192).
CONFIGS = [
    {"ROWS": 4, "BATCHED": False, "num_warps": 4},
    {"ROWS": 2, "BATCHED": True, "num_warps": 4},
    {"ROWS": 4, "BATCHED": True, "num_warps": 4},
    {"ROWS": 8, "BATCHED": True, "num_warps": 8},
]
_tuner = SafeTuner("dot_interaction", CONFIGS)
SHARED_MEMORY = 232448
"""Bytes of shared memory a program may use on Hopper (sm_90). ``tl.dot`` stages both of
its operands there: 2 x the rows' [BLOCK_T, BLOCK_D] tiles."""


def gram_bytes(rows: int, block_t: int, block_d: int, elsize: int) -> int:
    """Shared memory the Gram dot of ``rows`` rows' [BLOCK_T, BLOCK_D] tiles stages."""
    return 2 * rows * block_t * block_d * elsize


def fits(config: dict, block_t: int, block_d: int, elsize: int) -> bool:
    """Whether ``config``'s Gram tiles fit Hopper's shared memory (compile_check: fp32 with
    8 batched rows of 32 x 128 needs 262144 bytes and does not compile)."""
    rows = config["ROWS"] if config["BATCHED"] else 1
    return gram_bytes(rows, block_t, block_d, elsize) <= SHARED_MEMORY


# D is specialized: it strides the contiguous loads (16-divisible keeps them wide).
@triton.jit(do_not_specialize=["B", "x_dest"])
def _dot_interaction_kernel(
    # pointers
    v_ptr, out_ptr, dest_ptr,
    # sizes
    B, T, D, x_dest,
    # strides
    stride_vm, stride_om,
    # meta-parameters
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_X: tl.constexpr, IEEE: tl.constexpr, BATCHED: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
):
    """ROWS rows per program. v [B, T*D] (row stride stride_vm), out [B, K],
    dest [BLOCK_T, BLOCK_T] int32 (output column of pair (i, j), -1: not stored);
    with HAS_X, vector 0 is also copied to out columns x_dest .. x_dest+D."""
    if USE_GDC:  # launched early (PDL): nothing is read before the previous kernel is done
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    dest = tl.load(dest_ptr + t[:, None] * BLOCK_T + t[None, :])
    if BATCHED:
        _dot_rows_batched(v_ptr, out_ptr, dest, pid, B, T, D, x_dest, stride_vm, stride_om,
                          t, d, ROWS, HAS_X, IEEE)
        return
    for r in tl.static_range(ROWS):
        _dot_row(v_ptr, out_ptr, dest, pid * ROWS + r, B, T, D, x_dest, stride_vm, stride_om,
                 t, d, HAS_X, IEEE)


@triton.jit
def _dot_row(v_ptr, out_ptr, dest, row, B, T, D, x_dest, stride_vm, stride_om, t, d,
             HAS_X: tl.constexpr, IEEE: tl.constexpr, L2_ONLY: tl.constexpr = False,
             CHUNK: tl.constexpr = 0):
    """One row's Gram matrix into its wanted pairs (and vector 0 with HAS_X). L2_ONLY
    reads v past the SM's L1 (``.cg``): the fused gather + dot reads rows that other
    programs of its own launch wrote (``gather_dot``). CHUNK > 0 forms the Gram over
    CHUNK columns of the vectors at a time: fewer registers (the fused kernel's count, and
    so the gather's programs per SM), and on the interpreter the sums in another order."""
    # Row validity as tensors (t * 0 + row), not a scalar: masks must be tensors.
    t_ok = (t < T) & ((t * 0 + row) < B)
    d_ok = (d < D) & ((d * 0 + row) < B)
    base = v_ptr + row.to(tl.int64) * stride_vm
    if CHUNK > 0:
        gram = tl.zeros([t.shape[0], t.shape[0]], dtype=tl.float32)
        # a loop, not unrolled (all chunks' loads would be hoisted), and not pipelined
        # (each stage's [BLOCK_T, CHUNK] pointers held at once): one chunk's tile live
        for k in tl.range(0, D, CHUNK, num_stages=1):
            c = k + tl.arange(0, CHUNK)
            c_ok = (c < D) & ((c * 0 + row) < B)
            v = _load_rows(base + t[:, None] * D + c[None, :], t_ok[:, None] & c_ok[None, :],
                           L2_ONLY)
            gram = _gram(v, gram, IEEE)
    else:
        v = _load_rows(base + t[:, None] * D + d[None, :], t_ok[:, None] & d_ok[None, :],
                       L2_ONLY)
        if IEEE:
            v32 = v.to(tl.float32)
            gram = tl.dot(v32, tl.trans(v32), input_precision="ieee")
        else:
            gram = tl.dot(v, tl.trans(v))
    out_row = out_ptr + row.to(tl.int64) * stride_om
    tl.store(out_row + dest, gram.to(out_ptr.dtype.element_ty),
             mask=(dest >= 0) & t_ok[:, None])
    if HAS_X:
        x = _load_rows(base + d, d_ok, L2_ONLY)
        tl.store(out_row + x_dest + d, x.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _dot_rows_chunked(v_ptr, out_ptr, dest, rows, rows_ok, B, T, D, x_dest, stride_vm,
                      stride_om, t, d, HAS_X: tl.constexpr, IEEE: tl.constexpr,
                      CHUNK: tl.constexpr):
    """``_dot_row`` with CHUNK columns at a time and L2_ONLY, for several rows together
    (``rows`` [R], those with ``rows_ok``): each chunk is one [R, T, CHUNK] load and one
    batched product, so a row's L2 round trips are shared by R rows. Per element the same
    chunks are added in the same order as ``_dot_row``'s."""
    r_ok = rows_ok & (rows < B)
    t_ok = t < T
    base = v_ptr + rows.to(tl.int64) * stride_vm
    gram = tl.zeros([rows.shape[0], t.shape[0], t.shape[0]], dtype=tl.float32)
    # as in _dot_row: a loop neither unrolled nor pipelined, one chunk's tile live
    for k in tl.range(0, D, CHUNK, num_stages=1):
        c = k + tl.arange(0, CHUNK)
        tile = (t[:, None] * D + c[None, :])[None, :, :]
        ok = r_ok[:, None, None] & (t_ok[:, None] & (c < D)[None, :])[None, :, :]
        v = _load_rows(base[:, None, None] + tile, ok, True)
        if IEEE:
            v32 = v.to(tl.float32)
            gram = tl.dot(v32, tl.permute(v32, (0, 2, 1)), gram, input_precision="ieee")
        else:
            gram = tl.dot(v, tl.permute(v, (0, 2, 1)), gram)
    out_rows = out_ptr + rows.to(tl.int64) * stride_om
    keep = (dest >= 0) & t_ok[:, None]
    tl.store(out_rows[:, None, None] + dest[None, :, :], gram.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None, None] & keep[None, :, :])
    if HAS_X:
        d_ok = r_ok[:, None] & (d < D)[None, :]
        x = _load_rows(base[:, None] + d[None, :], d_ok, True)
        tl.store(out_rows[:, None] + x_dest + d[None, :], x.to(out_ptr.dtype.element_ty),
                 mask=d_ok)


@triton.jit
def _load_rows(ptrs, mask, L2_ONLY: tl.constexpr):
    """A tile of v (0 where masked); with L2_ONLY past the SM's L1."""
    if L2_ONLY:
        v = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


@triton.jit
def _gram(v, acc, IEEE: tl.constexpr):
    """acc + v v^T on the tensor cores (fp32 products and sums with IEEE)."""
    if IEEE:
        v32 = v.to(tl.float32)
        acc = tl.dot(v32, tl.trans(v32), acc, input_precision="ieee")
    else:
        acc = tl.dot(v, tl.trans(v), acc)
    return acc


@triton.jit
def _dot_rows_batched(v_ptr, out_ptr, dest, pid, B, T, D, x_dest, stride_vm, stride_om, t, d,
                      ROWS: tl.constexpr, HAS_X: tl.constexpr, IEEE: tl.constexpr):
    """The program's ROWS rows together: one [ROWS, T, D] load, one batched dot."""
    rows = pid * ROWS + tl.arange(0, ROWS)
    r_ok = rows < B
    t_ok = t < T
    d_ok = d < D
    v_rows = v_ptr + rows.to(tl.int64) * stride_vm
    v = tl.load(v_rows[:, None, None] + (t[:, None] * D + d[None, :])[None, :, :],
                mask=r_ok[:, None, None] & (t_ok[:, None] & d_ok[None, :])[None, :, :],
                other=0.0)
    if IEEE:
        v32 = v.to(tl.float32)
        gram = tl.dot(v32, tl.permute(v32, (0, 2, 1)), input_precision="ieee")
    else:
        gram = tl.dot(v, tl.permute(v, (0, 2, 1)))
    out_rows = out_ptr + rows.to(tl.int64) * stride_om
    keep = (dest >= 0) & t_ok[:, None]
    tl.store(out_rows[:, None, None] + dest[None, :, :], gram.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None, None] & keep[None, :, :])
    if HAS_X:
        x = tl.load(v_rows[:, None] + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        tl.store(out_rows[:, None] + x_dest + d[None, :], x.to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & d_ok[None, :])


def pair_columns(num_vectors: int, self_interaction: bool, first_col: int) -> list[tuple]:
    """(i, j, column) of each pair in the reference order, starting at ``first_col``."""
    out, col = [], first_col
    for i in range(num_vectors):
        for j in range(i + 1 if self_interaction else i):
            out.append((i, j, col))
            col += 1
    return out


def dest_map(num_vectors: int, pairs: list[tuple], width: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's [BLOCK_T, BLOCK_T] int32 destination map for (i, j, column) pairs.

    ``width`` is the output's column count; every column must fall inside it (the kernel
    trusts the map).
    """
    block_t = next_pow2(num_vectors, 16)
    dest = torch.full((block_t, block_t), -1, dtype=torch.int32)
    for i, j, col in pairs:
        if not (0 <= j <= i < num_vectors and 0 <= col < width):
            raise ValueError(f"pair ({i}, {j}) -> column {col} is outside T={num_vectors}, "
                             f"width={width}")
        dest[i, j] = col
    return dest.to(device)


def check_row_fits(num_vectors: int, dim: int, dtype: torch.dtype) -> None:
    """Raise ValueError unless one row's Gram tiles fit a program's shared memory (a shape
    no config can form; the one-row config is always among the candidates)."""
    block_t, block_d = next_pow2(num_vectors, 16), next_pow2(dim, 16)
    need = gram_bytes(1, block_t, block_d, dtype.itemsize)
    if need > SHARED_MEMORY:
        raise ValueError(f"dot interaction of T={num_vectors} vectors of D={dim} in {dtype}: "
                         f"one row's Gram tiles need {need} bytes of shared memory, over "
                         f"the {SHARED_MEMORY} a GPU program has; use bf16 or fp16 tables, "
                         "or fewer or narrower vectors")


def check_dot_args(v: torch.Tensor, num_vectors: int, dim: int, dest: torch.Tensor,
                   out: torch.Tensor, x_dest: int | None) -> None:
    """Raise ValueError (showing the shapes) unless ``dot_interaction``'s arguments fit
    together."""
    check_tensor("v", v, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("out", out, dtypes=FLOAT_DTYPES, ndim=2, device=v.device)
    check_tensor("dest", dest, dtypes=[torch.int32], ndim=2, device=v.device)
    block_t = next_pow2(num_vectors, 16)
    if not 1 <= num_vectors <= 128 or not 1 <= dim <= 512:
        raise ValueError(f"dot interaction supports T <= 128, D <= 512; got T={num_vectors}, "
                         f"D={dim}")
    if v.shape[1] < num_vectors * dim or v.stride(1) != 1:
        raise ValueError(f"v has shape {list(v.shape)}, strides {v.stride()}; needs "
                         f"{num_vectors}*{dim} columns with unit column stride")
    if out.shape[0] != v.shape[0] or out.stride(1) != 1:
        raise ValueError(f"out has shape {list(out.shape)}, strides {out.stride()}; needs "
                         f"{v.shape[0]} rows and unit column stride")
    if list(dest.shape) != [block_t, block_t] or not dest.is_contiguous():
        raise ValueError(f"dest has shape {list(dest.shape)}; expected [{block_t}, {block_t}]")
    if x_dest is not None and not 0 <= x_dest <= out.shape[1] - dim:
        raise ValueError(f"x_dest {x_dest} + D {dim} does not fit out {list(out.shape)}")


def dot_interaction(v: torch.Tensor, num_vectors: int, dim: int, dest: torch.Tensor,
                    out: torch.Tensor, x_dest: int | None = None) -> torch.Tensor:
    """Pairwise dots of the ``num_vectors`` vectors in each row of ``v`` into ``out``.

    v [B, >= T*D] (unit column stride), dest from ``dest_map``, out [B, K]; with ``x_dest``
    vector 0 is copied to out[:, x_dest:x_dest+D] too. Returns ``out``.
    """
    check_dot_args(v, num_vectors, dim, dest, out, x_dest)
    block_t, block_d = next_pow2(num_vectors, 16), next_pow2(dim, 16)
    if v.shape[0] == 0:
        return out

    def launch(cfg: dict) -> object:  # (the compiled kernel: the tuner reads its spills)
        return launcher(_dot_interaction_kernel, (triton.cdiv(v.shape[0], cfg["ROWS"]),))(
            v, out, dest, v.shape[0], num_vectors, dim, x_dest if x_dest is not None else 0,
            v.stride(0), out.stride(0),
            ROWS=cfg["ROWS"], BLOCK_T=block_t, BLOCK_D=block_d, HAS_X=x_dest is not None,
            IEEE=ieee_dot(v.dtype), BATCHED=cfg["BATCHED"], num_warps=cfg["num_warps"],
            **pdl_launch())

    check_row_fits(num_vectors, dim, v.dtype)
    # (CONFIGS read here, so a test can pick one)
    configs = [c for c in CONFIGS if fits(c, block_t, block_d, v.element_size())]
    key = (v.dtype, out.dtype, num_vectors, dim, v.shape[0], x_dest is not None)
    _tuner.run(key, launch, configs)
    return out


def dot_interaction_reference(vectors: torch.Tensor, self_interaction: bool,
                              with_x: bool = True) -> torch.Tensor:
    """[B, T, D] -> [x (if with_x), pairs] in fp32, pairs in the reference order."""
    vectors = vectors.float()
    t = vectors.shape[1]
    gram = vectors @ vectors.transpose(1, 2)
    rows, cols = torch.tril_indices(t, t, offset=0 if self_interaction else -1)
    dots = gram[:, rows, cols]
    return torch.cat([vectors[:, 0], dots], dim=1) if with_x else dots


def cross_layer(x0: torch.Tensor, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One DCNv2 layer: x0 * (V (U x) + b) + x, as two GEMMs with fused epilogues.

    x0, x [B, D]; u [rank, D]; v [D, rank]; bias [D]. Returns [B, D] in x's dtype.
    """
    low = linear(x, u)
    return linear(low, v, bias, cross=(x0, x), out=out)


def cross_layer_reference(x0: torch.Tensor, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          bias: torch.Tensor) -> torch.Tensor:
    """fp32 DCNv2 layer."""
    x0, x = x0.float(), x.float()
    return x0 * ((x @ u.float().T) @ v.float().T + bias.float()) + x
