"""What the card allows for the two kernels furthest from issue 6's targets, measured beside
them in one process (``kernel_variants.py --sections floors``).

- ``rows_floor``: the very rows a ``dlrmv2`` gather reads (each feature's ids as rows of
  the packed table buffer, in the gather's order), read by the simplest reader there is:
  ROWS independent rows a program, no bags, no sums in a fixed order, no bounds checks, one
  [DIM] sum a program stored so that the loads stay. The best of a few shapes is what
  reading those rows costs on this card; the gather against it says how much of the
  gather's time is the reading and how much is ours. (The H200's gather, 155 us at B=8192,
  already ran at the rate the row_size section measured for rows that all miss L2.)
- ``cross_parts``: DCNv2's V layer as served (x0 * (V t + b) + x: a GEMM with K = 512, then
  an epilogue that reads x0 and x and writes the output, as many bytes as the GEMM's
  operands many times over) against the same GEMM with a plain epilogue, the epilogue done
  apart (``torch.addcmul``), and the arithmetic and byte floors of this run's matmul and
  copy rates. If the cross layer takes about plain + bytes, the main loop and the epilogue
  run one after the other on every SM (the H200: 95 us against about 40 of bytes and 39 of
  arithmetic); about max(plain, bytes) would mean they overlap and the time goes elsewhere.
  When the tuner tried a staggered candidate (``linear_configs``, ``STAGGER``), how many of
  its waiting programs found their partner not yet done (read the flag more than once).
  And the bytes of V's operands its served tile reads through L2 (each program its A rows
  and W columns, all of K), against a copy between two buffers that stay in L2: if V's
  time follows those bytes at that rate, larger tiles are the way (bench/notes-kernels.md,
  fifteenth session: V's large tiles spilled until their epilogue was sliced).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recserve.kernels import linear as li
from recserve.kernels.stagger import waits
from recserve.kernels.tables import BagFeature, PackedTables

import triton  # isort: skip  (after recserve.kernels, which may switch on the interpreter)
import triton.language as tl  # isort: skip

L2_BUFFER_MB = 8
"""Each of the two buffers ``l2_copy_GBps`` copies between: together well inside the
50-60 MB of L2 of an H100 or H200, so after the first copy both stay there."""
READER_SHAPES = [(rows, warps) for rows in (8, 16, 32, 64, 128, 256) for warps in (4, 8)]
"""(ROWS, num_warps) tried by ``rows_floor``; the fastest that compiles is the floor. On the
H200 (seventeenth session) the time still fell at 64 rows, the largest then tried (286 us
at 32, 164 at 64), so 128 and 256 rows a program are tried too."""


@triton.jit
def _read_rows(table_ptr, rows_ptr, out_ptr, DIM: tl.constexpr, ROWS: tl.constexpr):
    """Program p reads rows rows[p * ROWS:(p + 1) * ROWS] of a [rows, DIM] table and stores
    their fp32 sum (so the compiler keeps every load); no masks: the caller pads."""
    pid = tl.program_id(0)
    rows = tl.load(rows_ptr + pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, DIM)
    tile = tl.load(table_ptr + rows[:, None] * DIM + cols[None, :])
    tl.store(out_ptr + pid * DIM + cols, tl.sum(tile.to(tl.float32), axis=0))


def gathered_rows(packed: PackedTables, feats: list[BagFeature], values: list[torch.Tensor]
                  ) -> torch.Tensor:
    """Every id of ``values`` (one tensor per feature of ``feats``) as a row of the packed
    buffer seen as [rows, dim], feature after feature as the gather reads them (int64)."""
    if packed.quantized or len(set(packed.dims)) != 1:
        raise ValueError("rows_floor reads float tables of one dim (dlrmv2's bf16 tables)")
    dim = packed.dims[0]
    return torch.cat([v.to(torch.int64) + packed.elem_base[f.table] // dim
                      for f, v in zip(feats, values, strict=True)])


def reader(packed: PackedTables, rows: torch.Tensor, shape: tuple[int, int]
           ) -> Callable[[], None]:
    """One launch of ``_read_rows`` over ``rows`` with (ROWS, num_warps) ``shape``; the rows
    are padded with their own first ids to a multiple of ROWS."""
    per, warps = shape
    pad = -len(rows) % per
    rows = torch.cat([rows, rows[:pad]]) if pad else rows
    dim = packed.dims[0]
    out = torch.empty(len(rows) // per, dim, device=rows.device, dtype=torch.float32)
    table = packed.data

    def run() -> None:
        _read_rows[(len(rows) // per,)](table, rows, out, DIM=dim, ROWS=per, num_warps=warps)

    run.out = out  # (tests check the sums)
    run.rows = rows
    return run


def rows_floor(packed: PackedTables, rows: torch.Tensor, time_us: Callable[[Callable], float],
               shapes: list[tuple[int, int]] = READER_SHAPES) -> dict:
    """The fastest reader of ``rows`` over ``shapes``, timed by ``time_us`` (a graph replay
    on the card): {"us", "shape", "M_rows_per_s", "tried": [[ROWS, warps, us or error]]}."""
    tried, best = [], None
    for shape in shapes:
        try:
            run = reader(packed, rows, shape)
            run()  # compiles; a shape the card's Triton cannot build is skipped
            us = time_us(run)
        except Exception as exc:  # noqa: BLE001 (a compile failure is a result here)
            tried.append([*shape, f"{type(exc).__name__}: {exc}"[:160]])
            continue
        tried.append([*shape, round(us, 2)])
        if best is None or us < best[0]:
            best = (us, shape)
    if best is None:
        return {"us": None, "tried": tried}
    return {"us": round(best[0], 2), "shape": list(best[1]),
            "M_rows_per_s": round(len(rows) / best[0], 1), "tried": tried}


def cross_parts(model, b: int, base: dict, time_us: Callable[[Callable], float],
                seed: int = 0) -> dict:
    """The model's first DCNv2 V layer at ``b`` rows as served, with a plain epilogue, and
    its epilogue apart, against this run's floors (``base``: copy GB/s counting read and
    write bytes, bf16 matmul TFLOP/s); the U layer beside them (a long-K GEMM)."""
    u, v, bias = model.cross[0]
    rank, width = u.shape[0], v.shape[0]
    gen = torch.Generator(device=u.device).manual_seed(seed)

    def rand(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=u.device).to(model.dtype)

    x0, x = rand(b, width), rand(b, width)
    t = li.linear(x, u)
    y, z = torch.empty_like(x), torch.empty_like(x)
    parts = {
        "cross": lambda: li.linear(t, v, bias, cross=(x0, x), out=y),
        "plain": lambda: li.linear(t, v, bias, out=y),
        "epilogue_apart": lambda: torch.addcmul(x, x0, y, out=z),
        "u": lambda: li.linear(x, u, out=t),
    }
    times = {}
    for name, fn in parts.items():
        fn()  # tunes (the linear tuner keeps one config per shape, as served)
        times[name] = round(time_us(fn), 2)
    stagger = {}
    spins = waits(u.device)
    if spins is not None:  # a staggered candidate was tuned: did its waiters wait?
        stagger = {"stagger_waiters_that_waited": int((spins > 0).sum()),
                   "stagger_max_extra_reads": int(spins.max())}
    size = x.element_size()
    epilogue_bytes = 3 * b * width * size  # x0 and x read, the output written
    arithmetic_us = 2 * b * width * rank / (base["matmul_tflops"] * 1e6)
    bytes_us = epilogue_bytes / (base["copy_GBps"] * 1e3)
    l2 = {}
    served = served_config(b, width, rank, cross=True)
    if served is not None:
        operand_bytes = l2_operand_bytes(b, width, rank, size, served)
        rate = l2_copy_GBps(u.device, time_us)
        l2 = {"served_tile": f"{served['BLOCK_M']}x{served['BLOCK_N']}",
              "l2_operand_MB": round(operand_bytes / 1e6, 1), "l2_copy_GBps": rate,
              "l2_operand_floor_us": round(operand_bytes / (rate * 1e3), 2)}
    return {"B": b, "rank": rank, "width": width, **{f"{k}_us": t for k, t in times.items()},
            "arithmetic_floor_us": round(arithmetic_us, 2),
            "epilogue_bytes_floor_us": round(bytes_us, 2),
            "one_after_the_other_us": round(times["plain"] + bytes_us, 2),
            "overlapped_us": round(max(times["plain"], bytes_us, arithmetic_us), 2), **l2,
            **stagger}


def l2_copy_GBps(device, time_us: Callable[[Callable], float], mb: int = L2_BUFFER_MB
                 ) -> float:
    """GB/s of a device copy between two ``mb`` MB buffers that stay in L2, counting the
    bytes read and written (as the run's DRAM copy rate does)."""
    src = torch.ones(mb << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src))
    return round(2 * src.numel() / (us * 1e3), 1)


def served_config(m: int, n: int, k: int, cross: bool) -> dict | None:
    """The config the linear tuner serves [m, k] x [k, n] with (a cross layer or not);
    None before it has tuned that shape."""
    for key, config in li._tuner.best.items():
        if key[:3] == (m, n, k) and key[9] == cross:  # (m, n, k, h, ..., cross, ...): linear()
            return config
    return None


def l2_operand_bytes(m: int, n: int, k: int, size: int, config: dict) -> int:
    """Bytes of A [m, k] and W [k, n] a tiled GEMM's programs read through L2: A once per
    column of tiles, W once per row of tiles."""
    tiles_m = -(-m // config["BLOCK_M"])
    tiles_n = -(-n // config["BLOCK_N"])
    return size * k * (m * tiles_n + n * tiles_m)


def forward_floors(model, b: int, base: dict) -> dict:
    """Each kernel of ``model``'s forward at ``b`` candidate rows but the gather (see
    ``rows_floor``), with its floor at this run's rates: its arithmetic at the bf16 matmul
    rate or its bytes at the copy rate (each operand read once, the output written once),
    whichever is longer. Bytes count at the HBM copy rate even where L2 holds them (the
    weights and, at small B, the activations), so a floor may overstate; never less work.
    The sum is what the forward cannot go under without fusing kernels, whatever each
    kernel does, before any launch's own cost."""
    size = 2 if model.dtype in (torch.bfloat16, torch.float16) else 4
    kernels = []

    def add(name: str, flops: float, elements: float) -> None:
        arithmetic = flops / (base["matmul_tflops"] * 1e6)
        memory = elements * size / (base["copy_GBps"] * 1e3)
        kernels.append({"kernel": name, "GFLOP": round(flops / 1e9, 3),
                        "MB": round(elements * size / 1e6, 2),
                        "floor_us": round(max(arithmetic, memory), 2),
                        "bound": "arithmetic" if arithmetic >= memory else "bytes"})

    def gemm(name: str, w: torch.Tensor, extra_outputs: int = 0) -> None:
        n, k = w.shape
        add(name, 2.0 * b * n * k, b * k + n * k + b * n * (1 + extra_outputs))

    for i, (w, _) in enumerate(model.bottom):
        gemm(f"bottom {i}", w)
    kind = model.spec.interaction.kind
    if kind == "dcnv2":
        for i, (u, v, _) in enumerate(model.cross):
            gemm(f"cross {i} U", u)
            gemm(f"cross {i} V (x0, x read too)", v, extra_outputs=2)
    elif kind == "dot":
        vectors, width = model.spec.num_vectors, model.spec.interaction_dim
        dim = model.layout.e_width // vectors
        add("dot interaction", 2.0 * b * vectors * vectors * dim,
            b * (vectors * dim + width))
    for i, (w, _) in enumerate(model.top):
        gemm(f"top {i}" + (" + final" if i == len(model.top) - 1 and model.fuse_final
                           else ""), w)
    return {"B": b, "kernels": kernels, "launches": len(kernels) + 1,  # + the gather
            "sum_floor_us": round(sum(k["floor_us"] for k in kernels), 2)}
