"""Fixed-size staging buffers for one model, and packing a batch's pieces straight into them.

The GPU executor owns, per slot, one host set (pinned) and one device set of these
buffers, allocated once when a model is built. A batch of R requests and ``rows`` rows
is padded to its bucket B with one extra "padding request" owning the padding rows,
so every bucket has fixed tensor shapes (a static input for a CUDA graph):

  row_request [B], request_offsets [B + 2], first_rows [B + 1]   (R_cap = B + 1)
  dense fp32 [B or R_cap, dense_in_dim]
  per table group: indices [cap], offsets [sum over features of bags + 1], weights [cap]

Bags beyond the real requests and rows are empty, dense padding is zero, so padding
rows compute finite scores that are never read. Only the used prefix of each buffer
travels to the device. Ids are narrowed to int32 when the group is int32 (an id outside
int32 is clipped to -1 or 2^31-1, so it stays out of range and the kernel still flags it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .inputs import RequestInputs
from .spec import ModelSpec

_INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """One table-dtype group: its features in kernel order and buffer capacities."""

    features: tuple[str, ...]
    request_scope: tuple[bool, ...]
    weighted: bool
    index_dtype: torch.dtype
    index_capacity: int
    offsets_capacity: int


@dataclass(frozen=True, slots=True)
class StagingLayout:
    """Buffer shapes for a model at up to ``max_rows`` rows per batch."""

    spec: ModelSpec
    max_rows: int
    dense_width: int
    dense_per_request: bool
    groups: tuple[GroupLayout, ...]

    @property
    def max_requests(self) -> int:
        """R_cap at the largest bucket: every real request has a row, plus the padding one."""
        return self.max_rows + 1


def staging_layout(spec: ModelSpec, group_features: list[tuple[str, ...]], max_rows: int,
                   dense_per_request: bool) -> StagingLayout:
    """Layout for ``spec`` whose kernels gather ``group_features`` per launch group."""
    by_name = {f.name: f for f in spec.sparse}
    groups = []
    for names in group_features:
        feats = [by_name[n] for n in names]
        bags = [max_rows + 1 if f.scope == "request" else max_rows for f in feats]
        capacity = sum(f.max_bag * b for f, b in zip(feats, bags, strict=True))
        rows = max(spec.table(f.table).rows for f in feats)
        small = rows <= _INT32_MAX and capacity <= _INT32_MAX
        groups.append(GroupLayout(tuple(names), tuple(f.scope == "request" for f in feats),
                                  any(f.weighted for f in feats),
                                  torch.int32 if small else torch.int64,
                                  capacity, sum(b + 1 for b in bags)))
    return StagingLayout(spec, max_rows, spec.dense_in_dim, dense_per_request, tuple(groups))


@dataclass(frozen=True, slots=True)
class Buffers:
    """One full set of staging tensors (host or device)."""

    row_request: torch.Tensor
    request_offsets: torch.Tensor
    first_rows: torch.Tensor
    dense: torch.Tensor | None
    groups: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], ...]
    scratch: torch.Tensor | None = None
    """Host only: int64 room for one feature's ids on their way into an int32 buffer."""


def allocate(layout: StagingLayout, device: torch.device | str, pin: bool = False) -> Buffers:
    """Allocate one set of buffers (zeroed) for ``layout`` on ``device`` (with the packing
    scratch when it is the host set)."""
    def make(shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

    b, r = layout.max_rows, layout.max_requests
    dense = None
    if layout.dense_width:
        dense = make(((r if layout.dense_per_request else b), layout.dense_width), torch.float32)
    groups = tuple((make(g.index_capacity, g.index_dtype),
                    make(g.offsets_capacity, g.index_dtype),
                    make(g.index_capacity, torch.float32) if g.weighted else None)
                   for g in layout.groups)
    scratch = None
    if torch.device(device).type == "cpu":
        room = max((g.index_capacity for g in layout.groups if g.index_dtype == torch.int32),
                   default=0)
        scratch = torch.zeros(room, dtype=torch.int64)  # packing only: never copied, not pinned
    return Buffers(make(b, torch.int32), make(r + 1, torch.int32), make(r, torch.int32),
                   dense, groups, scratch)


@dataclass(frozen=True, slots=True)
class PackedSizes:
    """How much of each buffer one packed batch uses (what must be copied)."""

    bucket: int
    """B: the padded batch size."""
    rows: int
    """Real rows."""
    requests: int
    """Real requests (pieces)."""
    nnz: tuple[int, ...]
    """Ids written per group."""
    offsets: tuple[int, ...]
    """Offsets written per group (fixed for a bucket)."""


def pack(layout: StagingLayout, host: Buffers, pieces: list[RequestInputs],
         bucket: int) -> PackedSizes:
    """Write ``pieces`` (already sliced to their planned rows) into ``host`` for ``bucket``."""
    spec = layout.spec
    counts = np.array([p.num_candidates for p in pieces], dtype=np.int64)
    rows, real = int(counts.sum()), len(pieces)
    if not 1 <= rows <= bucket <= layout.max_rows:
        raise ValueError(f"{rows} rows do not fit bucket {bucket} (max {layout.max_rows})")
    r_cap = bucket + 1
    row_request = host.row_request.numpy()[:bucket]
    row_request[:rows] = np.repeat(np.arange(real, dtype=np.int32), counts)
    row_request[rows:] = real  # the padding request owns the padding rows
    offsets = host.request_offsets.numpy()[:r_cap + 1]
    offsets[0] = 0
    np.cumsum(counts, out=offsets[1:real + 1], dtype=np.int32)
    offsets[real + 1:] = bucket
    np.minimum(offsets[:-1], bucket - 1, out=host.first_rows.numpy()[:r_cap])
    if host.dense is not None:
        _pack_dense(spec, host.dense.numpy(), pieces, counts, bucket, r_cap,
                    layout.dense_per_request)
    nnz, used = [], []
    for group, buffers in zip(layout.groups, host.groups, strict=True):
        n, o = _pack_group(group, buffers, host.scratch, pieces, bucket, r_cap)
        nnz.append(n)
        used.append(o)
    return PackedSizes(bucket, rows, real, tuple(nnz), tuple(used))


def _pack_dense(spec: ModelSpec, dense: np.ndarray, pieces: list[RequestInputs],
                counts: np.ndarray, bucket: int, r_cap: int, per_request: bool) -> None:
    col = 0
    for f in spec.dense:
        cols = slice(col, col + f.dim)
        if per_request:
            for i, p in enumerate(pieces):
                dense[i, cols] = p.dense[f.name].reshape(f.dim)
            dense[len(pieces):r_cap, cols] = 0.0
        elif f.scope == "candidate":
            rows = int(counts.sum())
            np.concatenate([p.dense[f.name] for p in pieces], out=dense[:rows, cols])
            dense[rows:bucket, cols] = 0.0
        else:
            start = 0
            for p, n in zip(pieces, counts, strict=True):
                dense[start:start + n, cols] = p.dense[f.name]  # [dim] broadcasts over rows
                start += int(n)
            dense[start:bucket, cols] = 0.0
        col += f.dim


def _pack_group(group: GroupLayout, buffers: tuple, scratch: torch.Tensor | None,
                pieces: list[RequestInputs], bucket: int, r_cap: int) -> tuple[int, int]:
    # One concatenate per feature, not one call per piece: with dozens of requests in a
    # batch, per-piece numpy calls would cost more than the copies themselves.
    indices_t, offsets_t, weights_t = buffers
    indices, offsets = indices_t.numpy(), offsets_t.numpy()
    weights = weights_t.numpy() if weights_t is not None else None
    pos, opos = 0, 0
    for name, request_scope in zip(group.features, group.request_scope, strict=True):
        inputs = [p.sparse[name] for p in pieces]
        values = [s.values for s in inputs]
        n = sum(len(v) for v in values)
        if group.index_dtype == torch.int32:
            _narrow_ids(values, indices[pos:pos + n], scratch)
        else:
            np.concatenate(values, out=indices[pos:pos + n])
        if weights is not None:
            np.concatenate([s.weights if s.weights is not None
                            else np.ones(len(s.values), np.float32) for s in inputs],
                           out=weights[pos:pos + n])
        bags = r_cap if request_scope else bucket
        seg = offsets[opos:opos + bags + 1]
        if request_scope:
            lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        else:
            lengths = np.concatenate([s.lengths for s in inputs])
        k = len(lengths)
        seg[0] = pos
        np.cumsum(lengths, out=seg[1:k + 1], dtype=seg.dtype)
        seg[1:k + 1] += pos
        seg[k + 1:] = pos + n  # empty padding bags
        pos += n
        opos += bags + 1
    return pos, opos


def _narrow_ids(values: list[np.ndarray], out: np.ndarray, scratch: torch.Tensor) -> None:
    """Write ``values`` (ids, any integer dtype) back to back into int32 ``out``.

    A plain cast when every id fits int32, checked with min and max (a cast and the two
    reductions cost about 0.25 ns an id, a clip 0.4-0.5); otherwise clipped to [-1, 2^31-1],
    so an id outside int32 stays outside its table instead of wrapping into it.
    """
    wide = values[0]
    if len(values) > 1:  # one pass per feature instead of several calls per piece
        wide = scratch.numpy()[:len(out)]
        np.concatenate(values, out=wide)
    if wide.dtype == np.int32 or not len(wide) or (wide.min() >= -1
                                                   and wide.max() <= _INT32_MAX):
        np.copyto(out, wide, casting="unsafe")
    else:
        np.clip(wide, -1, _INT32_MAX, out=out, casting="unsafe")
