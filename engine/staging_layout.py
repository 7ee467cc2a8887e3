"""Fixed-size staging buffers for one model: their layout and allocation (``staging`` packs
batches into them).

The GPU executor owns, per slot, one host set (pinned) and one device set of these
buffers, allocated once when a model is built. A batch of R requests and ``rows`` rows
is padded to its bucket B with one extra "padding request" owning the padding rows,
so every bucket has fixed tensor shapes (a static input for a CUDA graph):

  index block (one copy): row_request [B], request_offsets [B + 2], first_rows [B + 1]
    (R_cap = B + 1), then per table group its bags' starts and ends [sum over its
    features of bags + 1] (the kernel's bag bounds), each where bucket B puts it
  dense fp32 [B or R_cap, dense_in_dim]
  ids [cap], weights [cap] (when a feature is weighted): every group's ids

Each bag's (start, end) says where its ids are, so ids can lie in whatever order copies
fastest: a request that comes with its ``FlatSparse`` (from a worker process) is one copy,
not one per feature; requests without one are copied together, feature by feature, in one
concatenate. A group's bounds list its candidate-scope features (B + 1 slots each) before
its request-scope ones (R_cap + 1 slots each), the order ``feature_groups`` gives, so the
bounds of a request (or of a run of requests) for a whole group are one 2-D array add.
Bags beyond the real requests and rows are empty, dense padding is zero, so padding rows
compute finite scores that are never read. Only the used prefix of each buffer travels to
the device.

Ids are staged as int32 when every table has fewer than 2^31 rows (int64 otherwise), so
the host writes and the copy-in moves half the bytes: packing was the engine's bottleneck
on the H200's host. Ids that arrive as int32 (the server keeps ids sent as i4) are copied
as they are; wider ids are checked (min and max) and cast, or clipped to
[-1, 2^31-1] when some fall outside int32, so no id can wrap into a table's range (the
kernel flags what stays outside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .spec import ModelSpec

INT32_MAX = (1 << 31) - 1
"""The largest id int32 staging holds."""


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """One table-dtype group: its features in kernel order (candidate scope first) and
    where they sit in a request's ``FlatSparse``."""

    features: tuple[str, ...]
    candidate_features: int
    """F_c: the first F_c features are candidate scope, the rest request scope."""
    candidate_rows: tuple[int, ...]
    """Each candidate-scope feature's row in a FlatSparse's [F_c(model), N] bounds."""
    request_rows: tuple[int, ...]
    """Each request-scope feature's position among a FlatSparse's request bags."""

    @property
    def request_features(self) -> int:
        """F_r: request-scope features."""
        return len(self.features) - self.candidate_features

    def bounds_used(self, bucket: int) -> int:
        """Bound slots a batch of ``bucket`` rows uses: bags + 1 per feature."""
        return self.candidate_features * (bucket + 1) + self.request_features * (bucket + 2)


@dataclass(frozen=True, slots=True)
class StagingLayout:
    """Buffer shapes for a model at up to ``max_rows`` rows per batch."""

    spec: ModelSpec
    max_rows: int
    dense_width: int
    dense_per_request: bool
    groups: tuple[GroupLayout, ...]
    index_dtype: torch.dtype
    """int32 when every table has fewer than 2^31 rows, else int64."""
    index_capacity: int
    """Ids of a full batch whose bags all hold ``max_bag`` ids."""
    weighted: bool
    """Whether some feature has per-value weights (then there is a weights buffer)."""
    flat_order: tuple[str, ...]
    """Sparse features in a FlatSparse's order: candidate scope, then request scope."""
    flat_bags: tuple[int, int]
    """(F_c, F_r) of the spec: a request's FlatSparse has F_c x N + F_r bags."""

    @property
    def max_requests(self) -> int:
        """R_cap at the largest bucket: every real request has a row, plus the padding one."""
        return self.max_rows + 1


def staging_layout(spec: ModelSpec, group_features: list[tuple[str, ...]], max_rows: int,
                   dense_per_request: bool) -> StagingLayout:
    """Layout for ``spec`` whose kernels gather ``group_features`` per launch group (each
    listing its candidate-scope features first, as ``kernels.model.feature_groups`` does)."""
    by_name = {f.name: f for f in spec.sparse}
    candidates = [f.name for f in spec.sparse if f.scope == "candidate"]
    requests = [f.name for f in spec.sparse if f.scope == "request"]
    groups = []
    for names in group_features:
        scopes = [by_name[n].scope for n in names]
        f_c = scopes.count("candidate")
        if scopes != ["candidate"] * f_c + ["request"] * (len(names) - f_c):
            raise ValueError(f"group {list(names)} must list its candidate-scope features "
                             "before its request-scope ones (see feature_groups)")
        groups.append(GroupLayout(tuple(names), f_c,
                                  tuple(candidates.index(n) for n in names[:f_c]),
                                  tuple(requests.index(n) for n in names[f_c:])))
    # Every feature's ids are staged (a request's FlatSparse holds them all).
    capacity = sum(f.max_bag * (max_rows + 1 if f.scope == "request" else max_rows)
                   for f in spec.sparse)
    rows = max((t.rows for t in spec.tables), default=0)
    narrow = rows <= INT32_MAX and capacity <= INT32_MAX
    return StagingLayout(spec, max_rows, spec.dense_in_dim, dense_per_request, tuple(groups),
                         torch.int32 if narrow else torch.int64, capacity,
                         any(f.weighted for f in spec.sparse),
                         tuple(candidates + requests), (len(candidates), len(requests)))


@dataclass(frozen=True, slots=True)
class IndexViews:
    """One bucket's row, request and bag-bound arrays, views of a ``Buffers.index`` block
    laid back to back from its start (each on a 64-byte boundary), so that one copy of
    its first ``nbytes`` moves them all: every CUDA call of a batch's copy-in is a GIL
    hand-off in the engine process, and these were 3 + 2 per table group of them."""

    row_request: torch.Tensor
    """int32 [B]: each row's request (the padding request owns the padding rows)."""
    request_offsets: torch.Tensor
    """int32 [B + 2]: each request's first row, then the end."""
    first_rows: torch.Tensor
    """int32 [B + 1]: each request's first row, clamped into the bucket."""
    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    """Per group: (starts, ends) of its bags [bounds_used(B)], its kernel's offsets layout."""
    nbytes: int


def index_views(layout: StagingLayout, block: torch.Tensor, bucket: int) -> IndexViews:
    """``bucket``'s arrays in ``block`` (uint8, at least ``index_bytes(layout, max_rows)``;
    a block without storage, on the meta device, gives sizes only)."""
    parts = [(bucket, torch.int32), (bucket + 2, torch.int32), (bucket + 1, torch.int32)]
    for group in layout.groups:
        parts += [(group.bounds_used(bucket), layout.index_dtype)] * 2
    views, offset = [], 0
    for count, dtype in parts:
        size = count * dtype.itemsize
        views.append(block[offset:offset + size].view(dtype))
        offset += _aligned(size)
    bounds = views[3:]
    return IndexViews(*views[:3], tuple(zip(bounds[::2], bounds[1::2], strict=True)), offset)


def index_bytes(layout: StagingLayout, bucket: int) -> int:
    """Bytes of ``bucket``'s index block (the largest bucket's is the block's size)."""
    return index_views(layout, torch.empty(1 << 62, dtype=torch.uint8, device="meta"),
                       bucket).nbytes


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


@dataclass(frozen=True, slots=True)
class Buffers:
    """One full set of staging tensors (host or device)."""

    layout: StagingLayout
    index: torch.Tensor
    """uint8: each bucket's ``IndexViews`` (``bucket``)."""
    dense: torch.Tensor | None
    ids: torch.Tensor
    weights: torch.Tensor | None
    scratch: torch.Tensor | None = None
    """Host only (never copied): room for the flat bag bounds of pieces that
    arrive without a FlatSparse, so packing them allocates nothing."""
    views: dict[int, IndexViews] = field(default_factory=dict, compare=False, repr=False)

    def bucket(self, bucket: int) -> IndexViews:
        """``bucket``'s row, request and bound arrays (made once per bucket)."""
        views = self.views.get(bucket)
        if views is None:
            views = self.views[bucket] = index_views(self.layout, self.index, bucket)
        return views


def allocate(layout: StagingLayout, device: torch.device | str, pin: bool = False,
             memory: memoryview | None = None) -> Buffers:
    """Allocate one set of buffers (zeroed) for ``layout`` on ``device``; a host set
    (``device`` cpu) lies in ``memory`` when given (zeroed shared memory of at least
    ``host_bytes(layout)``: the engine and its packing processes map the same bytes)."""
    if memory is not None:
        return _build(layout, _Carver(memory), host=True)
    return _build(layout, lambda shape, dtype: torch.zeros(
        shape, dtype=dtype, device=device, pin_memory=pin),
        host=torch.device(device).type == "cpu")


def host_bytes(layout: StagingLayout) -> int:
    """Bytes a host set of buffers takes in shared memory (``allocate``'s ``memory``)."""
    carver = _Carver(None)
    _build(layout, carver, host=True)
    return carver.offset


class _Carver:
    """Tensors carved one after the other out of ``memory``, each on a 64-byte boundary
    (None: only counts, handing out tensors without storage)."""

    def __init__(self, memory: memoryview | None) -> None:
        self.memory, self.offset = memory, 0

    def __call__(self, shape, dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape) if isinstance(shape, tuple) else shape
        start, self.offset = self.offset, self.offset + -(-count * dtype.itemsize // 64) * 64
        if self.memory is None:
            return torch.empty(shape, dtype=dtype, device="meta")
        if self.offset > len(self.memory):
            raise ValueError(f"{len(self.memory)} bytes of memory do not hold the staging "
                             "buffers (see host_bytes)")
        if not count:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.memory, dtype=dtype, count=count,
                                offset=start).view(shape)


def _build(layout: StagingLayout, make, host: bool) -> Buffers:
    b, r = layout.max_rows, layout.max_requests
    dense = None
    if layout.dense_width:
        dense = make(((r if layout.dense_per_request else b), layout.dense_width), torch.float32)
    weights = make(layout.index_capacity, torch.float32) if layout.weighted else None
    scratch = None
    if host:
        f_c, f_r = layout.flat_bags
        scratch = make(f_c * b + (f_r + 1) * r, layout.index_dtype)
    return Buffers(layout, make(index_bytes(layout, b), torch.uint8), dense,
                   make(layout.index_capacity, layout.index_dtype), weights, scratch)


@dataclass(frozen=True, slots=True)
class PackedSizes:
    """How much of each buffer one packed batch uses (what must be copied)."""

    bucket: int
    """B: the padded batch size."""
    rows: int
    """Real rows."""
    requests: int
    """Real requests (pieces)."""
    nnz: int
    """Ids (and weights) written."""
    bounds: tuple[int, ...]
    """Bound slots written per group (fixed for a bucket)."""
