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
travels to the device.

Ids and offsets are staged as int32 when every table of the group has fewer than 2^31 rows
(int64 otherwise), so the host writes and the copy-in moves half the bytes: packing was the
engine's bottleneck on the H200's host (2.2 ms of one thread per 8192-row dlrmv2 batch
against 0.75 ms of compute). Ids that arrive as int32 (the server keeps ids sent as i4) are
copied as they are; wider ids are checked (min and max) and cast, or clipped to
[-1, 2^31-1] when some fall outside int32, so no id can wrap into a table's range (the
kernel flags what stays outside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .inputs import RequestInputs
from .spec import ModelSpec


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """One table-dtype group: its features in kernel order and buffer capacities."""

    features: tuple[str, ...]
    request_scope: tuple[bool, ...]
    weighted_features: tuple[bool, ...]
    index_dtype: torch.dtype
    index_capacity: int
    offsets_capacity: int

    @property
    def weighted(self) -> bool:
        """Whether the group has a weights buffer (some feature is weighted)."""
        return any(self.weighted_features)


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
        narrow = rows <= _INT32_MAX and capacity <= _INT32_MAX
        groups.append(GroupLayout(tuple(names), tuple(f.scope == "request" for f in feats),
                                  tuple(f.weighted for f in feats),
                                  torch.int32 if narrow else torch.int64, capacity,
                                  sum(b + 1 for b in bags)))
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
    """Host only (pageable, never copied): int64 room for one group's bag lengths (one
    cumulative sum turns them into the group's offsets) or its wide ids on their way to
    int32."""


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
        room = max((max(g.offsets_capacity, g.index_capacity) for g in layout.groups),
                   default=0)
        scratch = torch.zeros(room, dtype=torch.int64)
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


def _pack_group(group: GroupLayout, buffers: tuple, scratch: torch.Tensor,
                pieces: list[RequestInputs], bucket: int, r_cap: int) -> tuple[int, int]:
    """Ids, weights and offsets of one table group; (ids written, offsets written).

    A handful of numpy calls per group whatever the number of features and pieces: one
    concatenate for every feature's ids, one for every bag length (each feature's run of
    lengths led by a 0, padding bags as 0), and one cumulative sum of those lengths that
    yields every feature's absolute offsets at once. Per-piece or per-feature calls would
    cost more than the copies with dozens of requests in a batch.
    """
    indices_t, offsets_t, weights_t = buffers
    ids, lengths = [], []
    zeros = _zeros(bucket + 1)
    rows = sum(p.num_candidates for p in pieces)
    for name, request_scope in zip(group.features, group.request_scope, strict=True):
        inputs = [p.sparse[name] for p in pieces]
        ids += [s.values for s in inputs]
        lengths.append(zeros[:1])  # the feature's first offset: where its ids start
        if request_scope:
            lengths.append(np.fromiter((len(s.values) for s in inputs), np.int64, len(inputs)))
            lengths.append(zeros[:r_cap - len(inputs)])
        else:
            lengths += [s.lengths for s in inputs]
            lengths.append(zeros[:bucket - rows])
    nnz = sum(map(len, ids))
    used = sum((r_cap if req else bucket) + 1 for req in group.request_scope)
    indices = indices_t.numpy()[:nnz]
    try:  # a plain copy when no id needs narrowing ("safe" refuses int64 -> int32)
        np.concatenate(ids, out=indices, casting="safe")
    except TypeError:
        if indices.dtype == np.int64:  # uint64 ids: those past int64 wrap negative, flagged
            np.concatenate(ids, out=indices, casting="unsafe")
        else:
            _narrow_ids(ids, indices, scratch.numpy()[:nnz])
    offsets = offsets_t.numpy()[:used]
    steps = scratch.numpy().view(offsets.dtype)[:used]  # summing in the offsets' own dtype
    np.concatenate(lengths, out=steps, casting="same_kind")  # is twice as fast as casting
    np.cumsum(steps, out=offsets)
    if weights_t is not None:
        weights, pos = weights_t.numpy(), 0
        for name, weighted in zip(group.features, group.weighted_features, strict=True):
            inputs = [p.sparse[name] for p in pieces]
            n = sum(len(s.values) for s in inputs)
            if weighted:  # unweighted features' slots are never read (the kernel uses 1)
                np.concatenate([s.weights if s.weights is not None
                                else np.ones(len(s.values), np.float32) for s in inputs],
                               out=weights[pos:pos + n])
            pos += n
    return nnz, used


def _narrow_ids(ids: list[np.ndarray], out: np.ndarray, wide: np.ndarray) -> None:
    """``ids`` (some wider than int32) back to back into int32 ``out``: a cast when every id
    fits, else clipped to [-1, 2^31-1], so an id outside int32 stays outside every table.

    The check runs per array when there are few (no extra pass over a wide copy) and over
    one wide copy when there are many (two reductions instead of two per array).
    """
    if len(ids) <= _PER_ARRAY_CHECKS:
        if all(v.dtype == np.int32 or not len(v) or (v.min() >= -1 and v.max() <= _INT32_MAX)
               for v in ids):
            np.concatenate(ids, out=out, casting="unsafe")
            return
    np.concatenate(ids, out=wide, casting="unsafe")  # uint64 past int64: negative, flagged
    if len(wide) and wide.min() >= -1 and wide.max() <= _INT32_MAX:
        np.copyto(out, wide, casting="unsafe")
    else:
        np.clip(wide, -1, _INT32_MAX, out=out, casting="unsafe")


_PER_ARRAY_CHECKS = 64
_INT32_MAX = (1 << 31) - 1
_ZEROS: list[np.ndarray] = [np.zeros(0, np.int64)]


def _zeros(n: int) -> np.ndarray:
    """A shared int64 zeros array of at least ``n`` entries (padding lengths; only read).
    Returns the array it checked, so a packing thread that grows it concurrently with
    another can never hand back a shorter one."""
    zeros = _ZEROS[0]
    if len(zeros) < n:
        zeros = np.zeros(n, np.int64)
        _ZEROS[0] = zeros
    return zeros
