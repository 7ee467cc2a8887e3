"""The fused scoring path: a gather launch that forms each row's dot interaction as soon as
every feature of the row is pooled (issue 6, item 4).

The plain path is two launches: the gather writes the pooled vectors into E, then the dot
kernel reads all of E back (56 MB for ``dlrm-dot`` at B=8192) and writes Z. Here the
gather's own programs finish the job. Each program, after storing its bags, adds 1 to the
counter of each row it pooled; a program that brings a row's count to F (every feature of
the row pooled) forms that row's Gram matrix at once, from vectors just written and still
in L2, and writes its Z row. The interaction's arithmetic then runs beside other
programs' row loads instead of in a launch of its own, and E is read back from L2, not
from device memory. Per row, not per block of rows: the last program to finish a row
forms only the rows it finished (one for a long-bag program, at most BAGS), so the Gram
steps left at the end of the launch are short and spread over many programs.

Why not one program per sample, gathering all of its features and dotting them: the
gather would lose its per-feature programs, the split of long bags, its tuned configs and,
at small B, its parallelism (a sample's 214 lookups one after another).

Program order: block by block of GROUP rows (``tables.launch_plan``'s ``block_rows``), so
rows complete throughout the launch instead of all when the last feature's programs run.

Ordering: a program's threads all store, meet at a barrier, then add to the counters with
acquire-release atomics at GPU scope; a program that completes rows reads them past its L1
(``.cg``). It also puts those counters back to 0, so the counters are zero after every
complete launch: tuning launches and graph replays reuse them. Two launches that may run
at once need their own counters (the model allocates them per forward).

Limits: candidate-scope features only, since a request-scope bag is written to all of its
request's rows (the model gathers those in a plain launch first); every other vector of E
(x, request-scope features, other dtype groups) must be written before this launch (stream
order); every feature's dim must be the interaction's D.

Bits: E and the bad flags are the plain gather's (the same pooling code). The Gram is the
dot kernel's one-row code (``interaction._dot_row``) formed 32 columns at a time (fewer
registers, so more gather programs an SM), so Z may differ from the dot kernel's in the
last bits; the fused path is deterministic run to run.

Measured (H200, seventeenth session, bench/RESULTS.md): it loses. The dlrm-dot forward took
395 us against 319 at B=8192: this launch took 267 us where the plain gather took 158 and
the dot kernel 35. A program forms its rows' Grams one row after another, each four L2
round trips, while holding its SM slot; the dot kernel forms many rows' Grams in one
tensor-core product. So it is off by default (``TritonModel.set_fused_dot``). Its
candidates now also form a program's completed rows GRAM_ROWS at a time, one batched
product a chunk: on the H200 (nineteenth session) such a candidate won the launch's tuning
(255 us against 263 row by row, the same bits) and the forward still took 385 us against
320.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._common import ieee_dot, next_pow2
from .interaction import _dot_row, _dot_rows_chunked, check_dot_args, check_row_fits
from .pooling import _pool_program
from .precompile import launcher
from .tables import FEATURE_SLOTS, BagFeature, PackedTables

import triton  # isort: skip  (after _common, which may switch on the interpreter)
import triton.language as tl  # isort: skip

GROUP = 16
"""Rows per block of the program order (``tables.launch_plan``'s ``block_rows``): every
feature's programs for one block's rows, then the next block's, so rows complete one block
after another. A multiple of every config's BAGS."""
MAXNREG = 80
"""A register cap the aligned 4-warp configs are also tuned with. Compiled for sm_90 here
(Triton 3.9, bench/RESULTS.md), the Gram step takes those with UNROLL 2 or 4 or STAGES 3
to 91-96 registers, 5 programs an SM; capped at 80 they keep 6 programs an SM with 1-2
local stores (with UNROLL 1 the cap changes little: 78-80 registers, 6 an SM either way).
The 2-warp configs are tuned as they are (104-124 registers: 8-9 programs an SM against
12-14 plain); the card decides."""
GRAM_ROWS = 4
"""Rows whose Grams the GRAM_ROWS candidates form together (``_dot_rows_chunked``). On the
H200 the row-by-row Gram step cost the launch about 105 us at B=8192 (bench/RESULTS.md,
seventeenth session): each row's four chunks are four L2 round trips, one after another.
Four rows a product share them. The rows' accumulators and operands cost registers:
compiled for sm_90 (Triton 3.9, 27 vectors) the 4-warp configs take 138-142 (3 programs an
SM against 5-6 row by row), so their capped twins (MAXNREG, 29-44 local stores) are tuned
too. On the H200 (nineteenth session) a capped 4-rows twin won the launch's tuning at
B=8192 (255 us against 263 row by row), still above the plain gather and the dot kernel
together (191 us): the path stays off."""


@triton.jit(do_not_specialize=["B", "x_dest"])
def _gather_dot_kernel(
    # pointers: the gather's, then the interaction's
    table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
    out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr, prog_feature_ptr, meta_ptr,
    z_ptr, dest_ptr, counts_ptr,
    # sizes and strides
    out_stride, B, F, T, D, x_dest, stride_z,
    # meta-parameters: the gather's, then the interaction's
    BAGS: tl.constexpr, LANES: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, WEIGHTED: tl.constexpr, ALIGN: tl.constexpr,
    PREFETCH: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr,
    FEATURE_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_X: tl.constexpr, IEEE: tl.constexpr, CHUNK: tl.constexpr = 32,
    GRAM_ROWS: tl.constexpr = 1,
    USE_GDC: tl.constexpr = False, L2_KEEP: tl.constexpr = False,
):
    """The gather of ``embedding_bag._embedding_bag_kernel`` (out = E), then, for each row
    whose last bag this program pooled, the row's dot interaction (``interaction._dot_row``:
    E -> z). counts [B] int32, zero at the start and left zero; F: the launch's features
    (each pools one bag per row). GRAM_ROWS > 1: the rows this program completed are formed
    GRAM_ROWS at a time (``interaction._dot_rows_chunked``), one batched product a chunk."""
    if USE_GDC:  # launched early (PDL): nothing is read before the previous kernel is done
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    first, pooled = _pool_program(tl.program_id(0), table_ptr, indices_ptr, offsets_ptr,
                                  ends_ptr, weights_ptr, out_ptr, bad_ptr, row_request_ptr,
                                  request_offsets_ptr, prog_feature_ptr, meta_ptr, out_stride,
                                  BAGS, LANES, BLOCK_D, QUANT, WEIGHTED, ALIGN, PREFETCH,
                                  UNROLL, STAGES, L2_KEEP, FEATURE_SLOTS)
    tl.debug_barrier()  # every thread's rows are stored before the counts say so
    k = tl.arange(0, BAGS)  # (a long-bag program pooled one row: k = 0)
    mine = k < pooled
    rows = first + k
    before = tl.atomic_add(counts_ptr + rows, tl.full([BAGS], 1, tl.int32), mask=mine,
                           sem="acq_rel", scope="gpu")
    done = (mine & (before == F - 1)).to(tl.int32)  # rows whose last bag this program pooled
    if tl.max(done, axis=0) > 0:
        tl.atomic_xchg(counts_ptr + rows, tl.zeros([BAGS], tl.int32), mask=done != 0)
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        if GRAM_ROWS == 1:
            for j in range(0, pooled):
                if tl.sum(tl.where(k == j, done, 0), axis=0) > 0:
                    dest = tl.load(dest_ptr + t[:, None] * BLOCK_T + t[None, :])
                    _dot_row(out_ptr, z_ptr, dest, first + j, B, T, D, x_dest, out_stride,
                             stride_z, t, d, HAS_X, IEEE, True, CHUNK)
        else:
            g = tl.arange(0, GRAM_ROWS)
            for j in range(0, pooled, GRAM_ROWS):
                # done of rows first + j .. first + j + GRAM_ROWS - 1 (0 past pooled)
                done_here = tl.sum(tl.where(k[None, :] == (j + g)[:, None], done[None, :], 0),
                                   axis=1)
                if tl.max(done_here, axis=0) > 0:
                    dest = tl.load(dest_ptr + t[:, None] * BLOCK_T + t[None, :])
                    _dot_rows_chunked(out_ptr, z_ptr, dest, first + j + g, done_here != 0, B,
                                      T, D, x_dest, out_stride, stride_z, t, d, HAS_X, IEEE,
                                      CHUNK)


@dataclass(frozen=True)
class ThenDot:
    """The dot interaction a gather launch finishes with (``embedding_bag(then_dot=)``):
    the arguments of ``interaction.dot_interaction`` (E is the gather's ``out``), plus the
    launch's row counters."""

    num_vectors: int
    dim: int
    dest: torch.Tensor
    """``interaction.dest_map``'s [BLOCK_T, BLOCK_T] pair -> column map."""
    z: torch.Tensor
    """[B, K] interaction output."""
    x_dest: int | None
    """Where vector 0 goes in z (None: not copied)."""
    counts: torch.Tensor
    """[>= B] int32, all zero (``counters``); left zero by each launch."""

    def check(self, packed: PackedTables, features: Sequence[BagFeature],
              e: torch.Tensor) -> None:
        """Raise ValueError unless this launch can form the interaction (see the module's
        limits)."""
        check_dot_args(e, self.num_vectors, self.dim, self.dest, self.z, self.x_dest)
        for i, f in enumerate(features):
            if f.request_scope:
                raise ValueError(f"feature {i} is request scope: the fused gather + dot "
                                 "takes candidate-scope features only (gather the others "
                                 "in a plain launch first)")
            if packed.dims[f.table] != self.dim:
                raise ValueError(f"feature {i} has dim {packed.dims[f.table]}; the dot "
                                 f"interaction's vectors have {self.dim}")
        check_row_fits(self.num_vectors, self.dim, e.dtype)
        if self.counts.dtype != torch.int32 or self.counts.device != e.device \
                or self.counts.dim() != 1 or self.counts.shape[0] < e.shape[0]:
            raise ValueError(f"counts must be int32 [>= {e.shape[0]}] on {e.device} (see "
                             "gather_dot.counters)")

    def key(self) -> tuple:
        """What the tuning depends on besides the gather's own key."""
        return (self.num_vectors, self.dim, self.z.dtype, self.x_dest is not None)

    @staticmethod
    def candidates(gather: list[dict]) -> list[dict]:
        """The gather's candidate configs that fit the block-major order (a short-bag
        program's bags lie in one block), then the 4-warp ones again with at most MAXNREG
        registers (not the unaligned fallback: capped, it spills 176 local stores), then
        each aligned one again forming its rows GRAM_ROWS at a time. Not the
        small-tables-last orders: block by block, every feature's programs of a block run
        together whatever their order (and each candidate costs a card run's tuning a
        compile)."""
        usable = [c for c in gather if GROUP % c["BAGS"] == 0 and not c.get("SMALL_LAST")]
        out = usable + [{**c, "maxnreg": MAXNREG} for c in usable
                        if c["num_warps"] == 4 and c["ALIGN"] > 1]
        return out + [{**c, "GRAM_ROWS": GRAM_ROWS} for c in out if c["ALIGN"] > 1]

    def launch(self, programs: int, gather_args: tuple, e: torch.Tensor, num_features: int,
               params: dict, config: dict) -> None:
        """``_gather_dot_kernel`` over ``programs`` with the gather's pointer arguments and
        meta-parameters (``params``) for ``config``."""
        cap = {"maxnreg": config["maxnreg"]} if "maxnreg" in config else {}
        params = {**params, "GRAM_ROWS": config.get("GRAM_ROWS", 1)}
        launcher(_gather_dot_kernel, (programs,))(
            *gather_args, self.z, self.dest, self.counts,
            e.stride(0), e.shape[0], num_features, self.num_vectors, self.dim,
            self.x_dest if self.x_dest is not None else 0, self.z.stride(0),
            FEATURE_SLOTS=FEATURE_SLOTS, BLOCK_T=next_pow2(self.num_vectors, 16),
            HAS_X=self.x_dest is not None, IEEE=ieee_dot(e.dtype), **params, **cap)


def counters(num_rows: int, device: torch.device | str) -> torch.Tensor:
    """Zeroed row counters for one fused launch of ``num_rows`` rows."""
    return torch.zeros(num_rows, dtype=torch.int32, device=device)
