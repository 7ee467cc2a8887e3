"""Fixed-size staging buffers for one model: their layout, and the host set as numpy arrays
(``staging`` packs batches into them; ``tensor_buffers`` has the device set and the torch
views the copies read). No torch here: packing processes (``packer``) import this.

The GPU executor owns, per slot, one host set (pinned, or shared memory CUDA pins) and one
device set of these buffers, allocated once when a model is built. A batch of R requests
and ``rows`` rows is padded to its bucket B with one extra "padding request" owning the
padding rows, so every bucket has fixed tensor shapes (a static input for a CUDA graph):

  batch block (one copy, up to the batch's last id), each array where bucket B puts it:
    row_request [B], request_offsets [B + 2], first_rows [B + 1] (R_cap = B + 1);
    bad_flags [R_cap], zeros (what the forward's gathers flag: they arrive zeroed with
    the batch, so a graph needs no kernel to clear them); per table group its bags'
    starts and ends [sum over its features of bags + 1] (the kernel's bag bounds); dense
    fp32 [B or R_cap, dense_in_dim] (read as fp32 by the first bottom layer); ids [room
    for B rows]
  weights [cap] (when a feature is weighted), copied on their own

Each bag's (start, end) says where its ids are, so ids can lie in whatever order copies
fastest: a request that comes with its ``FlatSparse`` (from a worker process) is one copy,
not one per feature; requests without one are copied together, feature by feature, in one
concatenate. A group's bounds list its candidate-scope features (B + 1 slots each) before
its request-scope ones (R_cap + 1 slots each), the order ``feature_groups`` gives, so the
bounds of a request (or of a run of requests) for a whole group are one 2-D array add.
Bags beyond the real requests and rows are empty, dense padding is zero, so padding rows
compute finite scores that are never read. Only the block up to the batch's last id, and
the weights it uses, travel to the device.

Ids are staged as int32 when every table has fewer than 2^31 rows (int64 otherwise), so
the host writes and the copy-in moves half the bytes: packing was the engine's bottleneck
on the H200's host. Ids that arrive as int32 (the server keeps ids sent as i4) are copied
as they are; wider ids are checked (min and max) and cast, or clipped to
[-1, 2^31-1] when some fall outside int32, so no id can wrap into a table's range (the
kernel flags what stays outside).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    index_dtype: np.dtype
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
    capacity = _ids_room(spec, max_rows)
    rows = max((t.rows for t in spec.tables), default=0)
    narrow = rows <= INT32_MAX and capacity <= INT32_MAX
    return StagingLayout(spec, max_rows, spec.dense_in_dim, dense_per_request, tuple(groups),
                         np.dtype(np.int32 if narrow else np.int64), capacity,
                         any(f.weighted for f in spec.sparse),
                         tuple(candidates + requests), (len(candidates), len(requests)))


ALIGN = 64
"""Every staging array starts on a 64-byte boundary (a cache line; 16-byte vector loads)."""


def block_parts(layout: StagingLayout, bucket: int
                ) -> tuple[tuple[int, tuple[int, ...], np.dtype], ...]:
    """(byte offset, shape, dtype) of ``bucket``'s arrays in a batch block, back to back:
    row_request [B], request_offsets [B + 2], first_rows [B + 1], bad_flags [B + 1], each
    group's bag starts and ends [bounds_used(B)], dense [B or R_cap, dense_in_dim] (when
    the model has dense inputs), then the ids, last, with room for any batch of B rows
    (``ids_room``). A batch's copy to the device is the block up to the end of its ids:
    one copy for all but the weights (each CUDA call of a batch's copy-in is a GIL
    hand-off in the engine process; these were 5 + 2 per table group of them)."""
    shapes = [((bucket,), _INT32), ((bucket + 2,), _INT32), ((bucket + 1,), _INT32),
              ((bucket + 1,), _INT32)]
    for group in layout.groups:
        shapes += [((group.bounds_used(bucket),), layout.index_dtype)] * 2
    if layout.dense_width:
        rows = bucket + 1 if layout.dense_per_request else bucket
        shapes.append(((rows, layout.dense_width), _FLOAT32))
    shapes.append(((ids_room(layout, bucket),), layout.index_dtype))
    parts, offset = [], 0
    for shape, dtype in shapes:
        parts.append((offset, shape, dtype))
        offset += _aligned(int(np.prod(shape)) * dtype.itemsize)
    return tuple(parts)


def ids_room(layout: StagingLayout, bucket: int) -> int:
    """Ids a batch of ``bucket`` rows can hold (``index_capacity`` for the largest)."""
    return _ids_room(layout.spec, bucket)


def _ids_room(spec: ModelSpec, bucket: int) -> int:
    """Every bag full (``max_bag``): a bag per row and candidate-scope feature, one per
    request (at most B + 1) and request-scope feature."""
    return sum(f.max_bag * (bucket + 1 if f.scope == "request" else bucket)
               for f in spec.sparse)


def block_bytes(layout: StagingLayout, bucket: int) -> int:
    """Bytes of ``bucket``'s whole block (the largest bucket's is the block's size)."""
    offset, shape, dtype = block_parts(layout, bucket)[-1]
    return offset + _aligned(int(np.prod(shape)) * dtype.itemsize)


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


_INT32 = np.dtype(np.int32)
_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True, slots=True)
class BucketArrays:
    """One bucket's arrays of a batch block (``block_parts``): numpy views of a host set
    (what packing writes), or torch views of a device set (what the device step reads)."""

    row_request: np.ndarray
    """int32 [B]: each row's request (the padding request owns the padding rows)."""
    request_offsets: np.ndarray
    """int32 [B + 2]: each request's first row, then the end."""
    first_rows: np.ndarray
    """int32 [B + 1]: each request's first row, clamped into the bucket."""
    bad_flags: np.ndarray
    """int32 [B + 1], zeros: each request's bad-id flag, which the forward sets (packing
    writes the zeros every batch, and they travel with the block)."""
    groups: tuple[tuple[np.ndarray, np.ndarray], ...]
    """Per group: (starts, ends) of its bags [bounds_used(B)], its kernel's offsets layout."""
    dense: np.ndarray | None
    """fp32 [B or R_cap, dense_in_dim]; None: the model has no dense inputs."""
    ids: np.ndarray
    """[ids_room(B)]: every bag's ids, where its bounds say."""
    ids_at: int
    """The ids' byte offset: a batch of ``nnz`` ids copies ``copy_bytes(nnz)`` bytes."""

    def copy_bytes(self, nnz: int) -> int:
        """Bytes from the block's start to the end of a batch's ``nnz`` ids."""
        return self.ids_at + nnz * self.ids.itemsize


def bucket_arrays(layout: StagingLayout, block, bucket: int, dtype_of=None) -> BucketArrays:
    """``bucket``'s arrays as views of ``block`` (uint8: a numpy array, or a tensor with
    ``dtype_of`` mapping numpy dtypes to its own)."""
    parts = block_parts(layout, bucket)
    arrays = [block[o:o + int(np.prod(shape)) * t.itemsize].view(
        dtype_of(t) if dtype_of else t).reshape(shape) for o, shape, t in parts]
    dense = arrays[-2] if layout.dense_width else None
    bounds = arrays[4:len(arrays) - (2 if layout.dense_width else 1)]
    return BucketArrays(*arrays[:4], tuple(zip(bounds[::2], bounds[1::2], strict=True)), dense,
                        arrays[-1], parts[-1][0])


@dataclass(frozen=True, slots=True)
class HostBuffers:
    """One host set of staging arrays, carved from one block of memory (``host_buffers``)."""

    layout: StagingLayout
    block: np.ndarray
    """uint8: each bucket's ``BucketArrays`` (``bucket``)."""
    weights: np.ndarray | None
    """fp32 per-id weights (weighted models only): copied on their own."""
    scratch: np.ndarray
    """Never copied: room for the flat bag bounds of pieces that arrive without a
    FlatSparse, so packing them allocates nothing."""
    views: dict[int, BucketArrays] = field(default_factory=dict, compare=False, repr=False)

    def bucket(self, bucket: int) -> BucketArrays:
        """``bucket``'s arrays (made once per bucket)."""
        views = self.views.get(bucket)
        if views is None:
            views = self.views[bucket] = bucket_arrays(self.layout, self.block, bucket)
        return views


def host_shapes(layout: StagingLayout) -> dict[str, tuple[tuple[int, ...], np.dtype] | None]:
    """Each host array's shape and dtype (None: the model has none), in the order
    ``host_buffers`` lays them out; the first two are a device set's too."""
    b, r = layout.max_rows, layout.max_requests
    f_c, f_r = layout.flat_bags
    return {"block": ((block_bytes(layout, b),), np.dtype(np.uint8)),
            "weights": ((layout.index_capacity,), _FLOAT32) if layout.weighted else None,
            "scratch": ((f_c * b + (f_r + 1) * r,), layout.index_dtype)}


def host_bytes(layout: StagingLayout) -> int:
    """Bytes a host set takes in one block (``host_buffers``'s ``memory``)."""
    return sum(_aligned(int(np.prod(shape)) * dtype.itemsize)
               for shape, dtype in filter(None, host_shapes(layout).values()))


def host_buffers(layout: StagingLayout, memory: memoryview | None = None) -> HostBuffers:
    """A host set carved from ``memory`` (zeroed, at least ``host_bytes(layout)``: pinned
    memory, or shared memory a packing process maps too), or from new zeroed memory."""
    if memory is None:
        memory = memoryview(bytearray(host_bytes(layout)))
    if len(memory) < host_bytes(layout):
        raise ValueError(f"{len(memory)} bytes of memory do not hold the staging buffers "
                         f"({host_bytes(layout)}, see host_bytes)")
    arrays, offset = {}, 0
    for name, shape_dtype in host_shapes(layout).items():
        if shape_dtype is None:
            arrays[name] = None
            continue
        shape, dtype = shape_dtype
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(memory, dtype, count, offset).reshape(shape)
        offset += _aligned(count * dtype.itemsize)
    return HostBuffers(layout, **arrays)


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
