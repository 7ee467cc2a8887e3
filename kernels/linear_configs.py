"""The fused linear layer's tuning candidates: which tile configs ``linear`` tries for a call
(``candidates``), on the card and under the interpreter, and which fit Hopper's shared memory.
"""

from __future__ import annotations

from . import _common  # (its interpreting(), looked up at each call: tests patch it)
from ._common import next_pow2

GPU_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    # Hopper-sized tiles for the large-M layers (3456/1024/512-wide): deeper pipeline, or
    # two 64-row wgmma groups per warp group; shared memory checked by compile_check
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    # small batches: narrow wgmma tiles, so a 512-row layer with K = 3456 spreads over
    # 4x more programs than with 64x128 (split-K configs are added per call, see linear)
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
]
# Trial candidates (``_common.trial_configs``, RECSERVE_TRIAL_CONFIGS=1): the four sets
# below, each aimed at a gap the H200 measured, and each slower there than the tiled
# configs when the H200 tuned them (twelfth session, bench/RESULTS.md): kept for another
# card or Triton to try, not tuned at every server start.
#
# Cross layers at large M (DCNv2's V: K = 512, then an epilogue that reads x0 and x, as many
# bytes as the output): on the H100 the best general config (64x128, 4 warps) ran V at 1.7x
# its 59 us memory floor with 8 warps per SM (220 registers a thread: 2 programs). These keep
# 16 warps per SM (compile_check: 8 warps at ~120 registers, or a 2-stage 64x64). H200:
# 101.6-122.2 us against 64x128 / 4 warps' 94.7.
CROSS_CANDIDATES = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
]
# Persistent cross layers (``PER_SM`` programs per SM, each walking tiles in one flattened
# loop, see linear._linear_kernel): the SASS of V showed a program's DRAM traffic only in
# its epilogue, after its K loop; here the next tile's first operand copies are in flight
# while this tile's epilogue runs (sm_90 TTGIR: the async copies of the following steps
# sit before the epilogue in the one loop). Tuned for cross layers above 1024 rows beside
# the rest; the tiles and occupancy of the best tiled configs (compile_check: 64x128 / 4
# warps 252 registers, 2 programs an SM; 128x128 / 8 warps 243, 1; 128x64 / 4 warps 246, 2).
# H200: 101.2-108.4 us against the tiled 94.7 (flattened or nested alike).
PERSISTENT_CROSS_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "PER_SM": 2},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "PER_SM": 1},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "PER_SM": 2},
    # The loops nested, not flattened, at 2 programs an SM: the other program's main loop
    # overlaps this one's epilogue (Triton's own Hopper persistent matmul kernels dropped
    # flattening for a mixed-precision case because this ran faster on an H200); also a
    # persistent candidate should the card's Triton fail to flatten.
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "PER_SM": 2,
     "FLATTEN": False},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "PER_SM": 2,
     "FLATTEN": False},
    # Staggered (fourteenth session; on the seventeenth's H200 they gave the tiled kernel's bits and
    # every waiter waited, but which config won V was not recorded): the grid's second half starts
    # when the first half is done with its first K loop, so half the programs on the card run
    # epilogues while the rest run K loops. V took 95-109 us on the H200 against about 44 of bytes
    # and 39 of arithmetic, about their sum, as if every program's K loop and epilogue ran one after
    # the other in step with all the others (bench/floors.py's cross_parts measures that); the tiled
    # and persistent configs all start in step.
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "PER_SM": 2,
     "FLATTEN": False, "STAGGER": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "PER_SM": 2,
     "STAGGER": True},
]
# Cross layers at large M with the epilogue walked in column slices (``SUBTILE``, fifteenth
# session; on the seventeenth's H200 they gave the whole tile's bits, their tuning not yet
# recorded). In serving's tuning since the twenty-first session, when the tuner began to
# pass over configs that spill (``_common.SafeTuner``): the whole-tile 128x256 and 256x128
# cross configs spill (Triton 3.6, sm_90: 94-144 local stores a tile), which leaves these
# as the large tiles' only form that can win. Each program of V reads its A rows and W
# columns through L2:
# 64x128 tiles move about 680 MB of operands for dlrmv2 at B=8192, 128x128 about 450 and
# 128x256 about 340 (bench/floors.py, l2_operand_bytes), where V's own bytes are 170 MB.
# The larger tiles lost on the H200, and sm_90's compile says why: with the whole tile's
# x0 and x live beside the accumulator, 128x256 and 256x128 spill (255 registers, ~200
# local stores and loads a tile). Sliced,
# none spill (sm_90, Triton 3.9: 128x256 in 4 slices 206 registers, 256x128 212), and
# 128x128 on 8 warps takes 113 registers instead of 178 (2 slices: 126): two programs an
# SM, so one's epilogue can overlap the other's K loop, as the 64x128 winner's do. And the
# winner itself (64x128, 4 warps: 202 registers and 96 KB of shared memory, 2 programs an
# SM) takes 112 registers in 4 slices: with 3 or 2 pipeline stages, 3 or 4 programs an SM.
SUBTILE_CROSS_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3,
     "SUBTILE": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2,
     "SUBTILE": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
     "SUBTILE": 4},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
     "SUBTILE": 4},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
     "SUBTILE": 4},
]
# Split-K with large tiles for few rows and a long K (DCNv2's U and the first top layer at
# B=512: M = 512, K = 3456). With the small-batch tiles each program re-reads its A and W
# slabs from L2 for every 32-128 output columns or 64 rows (64x32 on U: 85 MB through
# L2 for 7 MB of operands, 10.9 us on the H200); 128x128 tiles in 8 K slices keep 128
# programs busy and move about 28 MB, plus 8 MB of fp32 slices written and read back.
# H200 (graph-tuned): 16.4-19.9 us on the first top layer against 64x64's 11.7; on U
# not among the ten fastest.
SPLIT_K_TILES = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
     "SPLIT_K": 8},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
     "SPLIT_K": 4},
]
# Deeper pipelines for few rows and a long K (eighteenth session). They lost on the H200
# (nineteenth session, graph-tuned at B=512): 64x32x128 s7 10.1 us against s4's 9.8 for U,
# 64x64x64 s8 11.5 against s4's 11.1 for the first top layer, so the K loop does not wait
# on L2 as the eighteenth session guessed; trial candidates only. The guess: at B=512 the
# four K = 3456 layers (DCNv2's U, the first top layer) take 10.9-16.3 us on the
# H200 where their operands are 7-10 MB: the small-batch tiles put about one program on
# each SM, each walking 27-54 K steps, and 4 stages keep 3 steps' loads in flight while
# the step in use waits on L2. The same tiles with 6-8 stages keep 5-7 in flight (stages
# change when loads are issued, not the tile or the order of the sums: the same bits).
# Compiled for sm_90 (Triton 3.9, bf16, K a multiple of BLOCK_K): 123-172 KB of shared
# memory and 56-80 registers, one program an SM, where the small-batch layers already run
# about one.
DEEP_PIPELINE_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 7},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 8},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 6},
]
# A cross layer with few rows (DCNv2's V at B=512: M = 512, N = 3456, K = 512; 8.0 us on
# the H200 with the small-batch tiles): 64x128 tiles re-read the 3.5 MB weight once per
# 64 rows, about 53 MB through L2 with the operands of the epilogue; 128x128 tiles about
# 38 MB, on 108 programs. H200: 8.1-8.4 us against 64x128's 7.7 (graph-tuned).
SMALL_M_CROSS_TILES = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
]
# cuBLAS as a candidate (``CUBLAS``: torch's addmm, its bias and ReLU in cuBLASLt's
# epilogue) for plain layers with few rows and a long K, where the Triton tiles run
# furthest from their floors: at B=512 DCNv2's U and the first top layer took 10-16 us
# in the H200's forward against 2.5-5 us of arithmetic, and neither split-K nor deeper
# pipelines helped (bench/notes-kernels.md). Tried only where candidates are timed in a
# CUDA graph (``RECSERVE_TUNE_BY`` graph or auto): an eager timing at B=512 is the host's
# launch, and torch's is shorter than Triton's, so it would win on the host's time.
CUBLAS = {"CUBLAS": True}
# Programs in groups of M tiles (``GROUP_M``, twenty-first session): for plain layers with
# many rows and a long K (DCNv2's U, the first three top layers at B >= 2048), each tiled
# config again with GROUP_M M tiles taking every N tile before the next group. Launched
# M tile fastest, the programs on the card at once cover one or two N tiles of every M
# tile, so A ([B, 3456] bf16: 56 MB at B=8192, more than the L2) is read from DRAM about
# once per N tile; grouped, a group's 8 x 128 rows (7 MB) stay in L2 while every N tile
# reads them. The H200 ran U at 41-47 us and the first top layer at 77-89 against
# arithmetic floors of 37-39 and 73-77 (bench/RESULTS.md): a few us a layer at most.
GROUP_M = 8
CPU_CONFIGS = [{"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}]


def splits_k(m: int, k: int) -> bool:
    """Whether split-K configs are worth tuning for an [m, k] input (not on the interpreter:
    the tests force them, see tests/test_kernels_linear.py)."""
    return not _common.interpreting() and m <= 1024 and k >= 1024


def fits(c: dict, elsize: int) -> bool:
    """Whether a config's pipeline buffers fit Hopper's 227 KB of shared memory (the
    compiled kernels use num_stages - 1 buffers of A and W tiles, as compile_check saw;
    fp32 operands overflow with the largest tiles)."""
    return ((c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * elsize * (c["num_stages"] - 1)
            <= 232448)


def base_configs(final_n: int | None, m: int | None = None, elsize: int = 2) -> list[dict]:
    """Candidates for one call: small batches only try BLOCK_M <= 64 tiles, large ones only
    64x64 and up (fewer compiles per shape; the card's tuning picks among the rest); only
    configs whose buffers fit for operands of ``elsize`` bytes."""
    base = CPU_CONFIGS if _common.interpreting() else GPU_CONFIGS
    if m is not None and not _common.interpreting():
        small = [c for c in base if c["BLOCK_M"] <= 64]
        big = [c for c in base if c["BLOCK_M"] >= 64 and c["BLOCK_N"] >= 64]
        base = small if m <= 1024 else big
    if final_n is None:
        return [c for c in base if fits(c, elsize)]
    block_n = next_pow2(final_n, 16)
    seen, out = set(), []
    for c in base:
        c = {**c, "BLOCK_N": block_n, "BLOCK_M": min(c["BLOCK_M"], 64)}
        key = tuple(sorted(c.items()))
        if key not in seen and fits(c, elsize):
            seen.add(key)
            out.append(c)
    return out


def candidates(m: int, n: int, k: int, elsize: int, *, final: bool, cross: bool,
               plain: bool, library: bool = False) -> list[dict]:
    """The configs ``linear`` tunes over for one call: the base set for its rows (a final
    layer's with BLOCK_N covering its N); a cross layer's in both epilogue orders; a
    ``plain`` layer's (no final, cross, add or gathered rows) with split-K copies too when
    it has few rows and a long K. With the trial candidates on (``trial_configs``) also a
    cross layer's ``CROSS_CANDIDATES`` (above 1024 rows) or ``SMALL_M_CROSS_TILES`` (up to
    1024), in both orders, and ``PERSISTENT_CROSS_CONFIGS`` (above 1024; the epilogue
    after the loop only), a plain layer's ``SPLIT_K_TILES``,
    and any non-final layer's ``DEEP_PIPELINE_CONFIGS`` where split-K would be tried
    (few rows, a long K). A cross layer above 1024 rows always tunes
    ``SUBTILE_CROSS_CONFIGS`` too. ``library`` (a plain layer torch's addmm can take: no bias, or
    one of A's dtype) adds ``CUBLAS`` there too when candidates are timed in a graph. A
    plain layer with many rows and a long K also tries each config with its programs in
    ``GROUP_M`` groups of M tiles."""
    configs = base_configs(n if final else None, m, elsize)
    trial = _common.trial_configs()
    if cross:  # both epilogue orders compete; the card's tuner keeps the faster
        if trial:
            extra = CROSS_CANDIDATES if m > 1024 else SMALL_M_CROSS_TILES
            configs = configs + [c for c in extra if fits(c, elsize)]
        configs = configs + [{**c, "EPILOGUE_FIRST": True} for c in configs]
        if m > 1024:  # (the large tiles' form that does not spill: see SUBTILE_CROSS_CONFIGS)
            configs = configs + [c for c in SUBTILE_CROSS_CONFIGS if fits(c, elsize)]
        if trial and m > 1024:
            configs = configs + [c for c in PERSISTENT_CROSS_CONFIGS if fits(c, elsize)]
    if plain and splits_k(m, k):
        # few rows, long K (at B=512 the 3456-wide layers ran on ~128 programs, each walking
        # all of K): slices of K on more programs, then an ordered sum
        configs = configs + [{**c, "SPLIT_K": 4} for c in configs]
        if trial:
            configs = configs + [c for c in SPLIT_K_TILES if fits(c, elsize)]
    if trial and not final and not cross and splits_k(m, k):  # (no split-K copies of them)
        configs = configs + [c for c in DEEP_PIPELINE_CONFIGS if fits(c, elsize)]
    if plain and library and splits_k(m, k) and _common.tune_by() != "eager":
        configs = configs + [CUBLAS]
    if plain and groups_m(m, k):  # (a group of M tiles only matters with 2+ N tiles)
        configs = configs + [{**c, "GROUP_M": GROUP_M} for c in configs
                             if "SPLIT_K" not in c and c.get("BLOCK_N", n) < n]
    return configs


def groups_m(m: int, k: int) -> bool:
    """Whether grouped configs are worth tuning for an [m, k] input: many rows and a long
    K (not on the interpreter, which runs the first config; tests force them)."""
    return not _common.interpreting() and m > 1024 and k >= 1024
