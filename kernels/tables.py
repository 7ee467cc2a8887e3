"""Host side of the table-batched embedding bag: packed tables, feature slots, CSR checks,
and the launch plan (per-feature metadata, program -> feature map, alignment, argument
checks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._common import check_tensor

TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
INDEX_DTYPES = (torch.int32, torch.int64)
_META_COLS = 10  # elem_base, row_stride, rows, dim, bag_base, num_bags, out_col, first_prog,
#                  flags, tiles (a program's, see launch_plan's rows_per_prog)
_REQUEST, _MEAN, _WEIGHTED, _LONG, _KEEP = 1, 2, 4, 8, 16


@dataclass(frozen=True, slots=True)
class BagFeature:
    """Static description of one sparse feature for the launcher."""

    table: int
    """Index of its table in the ``PackedTables``."""
    out_col: int
    """First column of its slice in ``out``."""
    request_scope: bool = False
    """One bag per request (broadcast to the request's rows) instead of one per row."""
    mean: bool = False
    """Mean pooling (sum divided by the bag length) instead of sum."""
    weighted: bool = False
    """Multiply each row by its per-value weight."""
    max_bag: int = 1
    """Largest bag expected; bags this long or longer take the long-bag path."""

    def __post_init__(self) -> None:
        for name in ("table", "out_col", "max_bag"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"BagFeature.{name} is {value!r}; expected an int >= 0")


class PackedTables:
    """Tables of one dtype in one flat buffer, with int64 bases and row strides per table.

    Float tables are stored as they are (row stride = dim). int8 row-wise tables store
    each row as its uint8 codes, then its fp32 scale and offset, padded to 16 bytes:

        [codes (dim) | pad to 8 | scale, offset (8) | pad to 16]     e.g. 144 B at dim 128

    so a lookup touches one contiguous 144-byte span (5-6 sectors) instead of 128 bytes
    of codes plus 8 bytes in a separate array: two scattered reads per row made int8 as
    slow as bf16 (256 B in one span) on the H200, though it moves half the bytes.
    """

    def __init__(self, tables: Sequence[torch.Tensor],
                 scales: Sequence[torch.Tensor] | None = None,
                 shifts: Sequence[torch.Tensor] | None = None) -> None:
        if not tables:
            raise ValueError("PackedTables needs at least one table")
        dtype, device = tables[0].dtype, tables[0].device
        for i, t in enumerate(tables):
            check_tensor(f"table {i}", t, dtypes=TABLE_DTYPES, ndim=2, device=device)
            if t.dtype != dtype:
                raise ValueError(f"table {i} has dtype {t.dtype}, table 0 has {dtype}: "
                                 "pack one dtype per PackedTables")
        self.quantized = dtype == torch.uint8
        if self.quantized and (scales is None or shifts is None):
            raise ValueError("uint8 tables need per-row scales and shifts (offsets)")
        self.rows = [t.shape[0] for t in tables]
        self.dims = [t.shape[1] for t in tables]
        self.row_stride = [quantized_row_bytes(d) if self.quantized else d for d in self.dims]
        self.elem_base = [0]
        for rows, stride in zip(self.rows[:-1], self.row_stride[:-1], strict=True):
            self.elem_base.append(self.elem_base[-1] + rows * stride)
        if not self.quantized:
            self.data = torch.cat([t.reshape(-1) for t in tables])
            return
        for i, (s, o) in enumerate(zip(scales, shifts, strict=True)):
            for what, v in (("scale", s), ("shift", o)):
                check_tensor(f"table {i} {what}", v, dtypes=[torch.float32], ndim=1,
                             device=device)
                if v.shape[0] != self.rows[i]:
                    raise ValueError(f"table {i} {what} has shape {list(v.shape)}; "
                                     f"expected [{self.rows[i]}]")
        self.data = torch.cat([_quantized_rows(t, s, o)
                               for t, s, o in zip(tables, scales, shifts, strict=True)])

    def table_bytes(self, t: int) -> int:
        """Bytes table ``t`` takes in the buffer (int8 rows with their scale and offset)."""
        return self.rows[t] * self.row_stride[t] * self.data.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device


def quantized_row_bytes(dim: int) -> int:
    """Bytes per stored int8 row: codes, fp32 scale and offset at an 8-byte boundary, and
    padding to a multiple of 16 (so rows stay 16-byte aligned for vector loads)."""
    return -(-(quantized_params_at(dim) + 8) // 16) * 16


def quantized_params_at(dim: int) -> int:
    """Byte offset of a stored int8 row's scale (its offset follows)."""
    return -(-dim // 8) * 8


def _quantized_rows(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
                    ) -> torch.Tensor:
    """One table's rows in the inline layout, flat uint8."""
    rows, dim = codes.shape
    out = torch.zeros(rows, quantized_row_bytes(dim), dtype=torch.uint8, device=codes.device)
    out[:, :dim] = codes
    at = quantized_params_at(dim)
    params = torch.stack([scale, shift], dim=1).contiguous()  # [rows, 2] fp32
    out[:, at:at + 8] = params.view(torch.uint8).reshape(rows, 8)
    return out.reshape(-1)


def check_csr(offsets: torch.Tensor, bag_counts: Sequence[int], nnz: int) -> None:
    """Raise ValueError unless each feature's offsets rise monotonically within [0, nnz].

    Run on the host copy (it synchronizes on a device tensor); the kernel trusts offsets.
    """
    offsets = offsets.detach().cpu().to(torch.int64)
    base = 0
    for i, count in enumerate(bag_counts):
        part = offsets[base:base + count + 1]
        if part.shape[0] != count + 1:
            raise ValueError(f"offsets has {offsets.shape[0]} entries; feature {i} needs "
                             f"{count + 1} from position {base}")
        if part[0] < 0 or part[-1] > nnz or bool((part[1:] < part[:-1]).any()):
            raise ValueError(f"feature {i} offsets are not monotone within [0, {nnz}]: "
                             f"{part[:8].tolist()}...")
        base += count + 1


def check_bounds(starts: torch.Tensor, ends: torch.Tensor, bag_counts: Sequence[int],
                 nnz: int) -> None:
    """Raise ValueError unless every bag's (start, end) satisfies 0 <= start <= end <= nnz
    (``offsets`` with ``ends``; each feature's last slot is not read). Host copy, like
    ``check_csr``."""
    starts, ends = starts.detach().cpu().to(torch.int64), ends.detach().cpu().to(torch.int64)
    base = 0
    for i, count in enumerate(bag_counts):
        s, e = starts[base:base + count], ends[base:base + count]
        bad = (s < 0) | (e < s) | (e > nnz)
        if s.shape[0] != count or e.shape[0] != count or bool(bad.any()):
            raise ValueError(f"feature {i}: bag bounds must satisfy 0 <= start <= end <= {nnz}"
                             f" for each of its {count} bags")
        base += count + 1


_plans: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def bag_counts(features: Sequence[BagFeature], num_rows: int, num_requests: int) -> list[int]:
    """Bags per feature: R for request scope, B for candidate scope."""
    return [num_requests if f.request_scope else num_rows for f in features]


def kept_tables(packed: PackedTables, features: Sequence[BagFeature],
                budget: float) -> frozenset[int]:
    """The tables of a launch whose rows the gather may ask the L2 to keep: the smallest
    ones, in order of size, as long as together they fit ``budget`` bytes. Each sample
    reads a row of every feature, so a small table's rows come back batch after batch and
    are worth keeping; a large table's (dlrmv2's 1 GB ones) are read about once and would
    otherwise push them out."""
    sizes = sorted((packed.table_bytes(t), t) for t in {f.table for f in features})
    kept, total = set(), 0
    for size, table in sizes:
        total += size
        if total > budget:
            break
        kept.add(table)
    return frozenset(kept)


def launch_plan(packed: PackedTables, features: tuple[BagFeature, ...], num_rows: int,
                num_requests: int, bags_per_prog: int, lanes: int,
                kept: frozenset[int] = frozenset(), small_last: bool = False,
                block_rows: int = 0, rows_per_prog: int = 0, long_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-feature metadata and the program -> feature map, cached per shape bucket
    (``kept``: tables whose rows the L2 hint keeps, see ``kept_tables``; ``small_last``:
    programs in order of their table's bytes, largest first, see ``program_order``).

    ``block_rows`` > 0 (candidate-scope features only): programs block by block of that
    many rows, every feature's programs for rows 0.. first, then the next block's, so
    rows complete throughout the launch (the fused gather + dot forms each row's
    interaction as its last bag is pooled). Each map entry is then feature +
    FEATURE_SLOTS * (its bag, or its first bag / bags_per_prog), since a feature's programs
    no longer lie side by side.

    ``rows_per_prog`` > 0: a program pools several tiles of ``bags_per_prog`` short bags (or
    several long bags), one after another, as many as keep it within about that many rows
    by the feature's ``max_bag`` (at least one), so a program's fixed costs (its metadata
    and bag bounds, each a load waiting on the one before) are paid once for many rows
    (``feature_tiles``); with ``long_only`` the long-bag features only."""
    if block_rows and rows_per_prog:
        raise ValueError("block-major programs pool one tile each (rows_per_prog 0)")
    key = (tuple(packed.elem_base), tuple(packed.rows), tuple(packed.row_stride), features,
           num_rows, num_requests, bags_per_prog, lanes, kept, small_last, block_rows,
           rows_per_prog, long_only,
           str(packed.device))
    if key in _plans:
        return _plans[key]
    counts = bag_counts(features, num_rows, num_requests)
    bag_base = [0]
    for c in counts[:-1]:
        bag_base.append(bag_base[-1] + c + 1)
    is_long = [f.max_bag >= lanes for f in features]
    order = program_order(packed, features, is_long, small_last)
    meta = [[0] * _META_COLS for _ in features]
    prog_feature: list[int] = []
    for i in order:
        f, t = features[i], features[i].table
        tiles = feature_tiles(f, is_long[i], bags_per_prog,
                              rows_per_prog if is_long[i] or not long_only else 0)
        programs = -(-counts[i] // (tiles * (1 if is_long[i] else bags_per_prog)))
        flags = (_REQUEST * f.request_scope) | (_MEAN * f.mean) | (_WEIGHTED * f.weighted) \
            | (_LONG * is_long[i]) | (_KEEP * (t in kept))
        meta[i] = [packed.elem_base[t], packed.row_stride[t], packed.rows[t], packed.dims[t],
                   bag_base[i], counts[i], f.out_col, len(prog_feature), flags, tiles]
        prog_feature.extend([i] * programs)
    if block_rows:
        prog_feature = _block_major(features, order, is_long, num_rows, bags_per_prog,
                                    block_rows)
    plan = (torch.tensor(meta, dtype=torch.int64, device=packed.device),
            torch.tensor(prog_feature, dtype=torch.int32, device=packed.device), len(prog_feature))
    _plans[key] = plan
    return plan


def feature_tiles(feature: BagFeature, long: bool, bags_per_prog: int, rows_per_prog: int
                  ) -> int:
    """Tiles a program of ``feature`` pools (``launch_plan``): as many as fit
    ``rows_per_prog`` rows when every bag is ``max_bag`` long, at least one (0: one)."""
    tile_rows = max(feature.max_bag, 1) * (1 if long else bags_per_prog)
    return max(1, rows_per_prog // tile_rows)


FEATURE_SLOTS = 256
"""A block-major program map entry's feature is its value modulo this (``launch_plan``)."""


def _block_major(features: tuple[BagFeature, ...], order: list[int], is_long: list[bool],
                 num_rows: int, bags_per_prog: int, block_rows: int) -> list[int]:
    """The block-major program map of ``launch_plan``."""
    if block_rows % bags_per_prog or any(f.request_scope for f in features):
        raise ValueError(f"block-major programs need candidate-scope features and blocks of "
                         f"a multiple of {bags_per_prog} rows; got {block_rows}")
    if len(features) > FEATURE_SLOTS or num_rows >= 2 ** 31 // FEATURE_SLOTS:
        raise ValueError(f"block-major programs take at most {FEATURE_SLOTS} features and "
                         f"{2 ** 31 // FEATURE_SLOTS - 1} rows; got {len(features)}, "
                         f"{num_rows}")
    out = []
    for first in range(0, num_rows, block_rows):
        last = min(first + block_rows, num_rows)
        for i in order:
            per = 1 if is_long[i] else bags_per_prog
            out.extend(i + FEATURE_SLOTS * k for k in range(first // per, -(-last // per)))
    return out


def program_order(packed: PackedTables, features: Sequence[BagFeature], is_long: list[bool],
                  small_last: bool) -> list[int]:
    """The order of the features' programs in the grid (programs start about in grid
    order). Long-bag features first: their programs do the most work, so they must not
    start last. With ``small_last``, then the others by their table's bytes, largest first:
    the small tables' lookups (dlrmv2: 44 of 214 a sample, 18 tables of 31 MB in bf16) run
    together at the end, where their rows, read about 2.5 times a batch each, can stay in
    L2 between reads instead of being pushed out by the large tables' rows streaming past
    (1.4 M rows of 256 bytes at B=8192). Each bag is still pooled by one program in the
    same order, so the bits do not change; only which programs run beside which."""
    if small_last:
        return sorted(range(len(features)),
                      key=lambda i: (not is_long[i], -packed.table_bytes(features[i].table)))
    return sorted(range(len(features)), key=lambda i: not is_long[i])


def alignment(packed: PackedTables, features: Sequence[BagFeature], out: torch.Tensor) -> int:
    """Largest power of two (<= 16 elements) dividing every table base, row stride, dim and
    out column of this launch and out's row stride: the kernel's alignment hint (1 turns
    it off)."""
    values = [out.stride(0)]
    for f in features:
        t = f.table
        values += [packed.elem_base[t], packed.row_stride[t], packed.dims[t], f.out_col]
    align = 16
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def check_launch(packed: PackedTables, features: Sequence[BagFeature], indices: torch.Tensor,
                 offsets: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None,
                 num_requests: int) -> None:
    """Raise ValueError (showing the shapes) unless the launch arguments fit together."""
    dev = packed.device
    check_tensor("indices", indices, dtypes=INDEX_DTYPES, ndim=1, device=dev)
    check_tensor("offsets", offsets, dtypes=INDEX_DTYPES, ndim=1, device=dev)
    check_tensor("out", out, dtypes=[torch.float32, torch.float16, torch.bfloat16], ndim=2,
                 device=dev)
    if out.stride(1) != 1:
        raise ValueError(f"out (shape {list(out.shape)}, strides {out.stride()}) needs unit "
                         "column stride")
    want = sum(c + 1 for c in bag_counts(features, out.shape[0], num_requests))
    if offsets.shape[0] != want:
        raise ValueError(f"offsets has shape {list(offsets.shape)}; expected [{want}] "
                         f"(bags + 1 per feature, B={out.shape[0]}, R={num_requests})")
    for i, f in enumerate(features):
        if not 0 <= f.table < len(packed.rows):
            raise ValueError(f"feature {i} reads table {f.table}; there are {len(packed.rows)}")
        if f.out_col + packed.dims[f.table] > out.shape[1]:
            end = f.out_col + packed.dims[f.table]
            raise ValueError(f"feature {i} writes columns {f.out_col}..{end} but out has "
                             f"shape {list(out.shape)}")
    if any(f.weighted for f in features):
        if weights is None:
            raise ValueError("a feature is weighted but no weights were given")
        check_tensor("weights", weights, dtypes=[torch.float32], ndim=1, device=dev)
        if weights.shape != indices.shape:
            raise ValueError(f"weights has shape {list(weights.shape)}; indices has "
                             f"{list(indices.shape)}")
