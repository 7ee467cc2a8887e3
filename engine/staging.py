"""Packing a batch's pieces straight into a slot's staging buffers (``staging_layout``
describes them): rows and requests, dense inputs, every sparse id and each bag's bounds.

Each bag's (start, end) says where its ids are, so ids can lie in whatever order copies
fastest: requests that come with their ``FlatSparse`` (from worker processes) are copied
together, each in one piece, not one per feature; requests without one are copied
together, feature by feature, in one concatenate. The bounds of a run of consecutive
requests for a whole table group are a few 2-D array operations (``_Block``, ``_join``),
whatever the number of requests. Wider ids than the buffers' int32 are checked (min and
max) and cast, or clipped to [-1, 2^31-1], so no id can wrap into a table's range (the
kernel flags what stays outside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .flat import split_bounds
from .inputs import RequestInputs
from .spec import ModelSpec
from .staging_layout import (
    INT32_MAX,
    GroupLayout,
    HostBuffers,
    PackedSizes,
    StagingLayout,
    host_buffers,
    staging_layout,
)

__all__ = ["GroupLayout", "HostBuffers", "PackedSizes", "StagingLayout", "host_buffers", "pack",
           "staging_layout"]


def pack(layout: StagingLayout, host: HostBuffers, pieces: list[RequestInputs],
         bucket: int) -> PackedSizes:
    """Write ``pieces`` (already sliced to their planned rows) into ``host`` for ``bucket``.

    Ids (and weights) in two concatenates at most (pieces with and without a FlatSparse),
    bag bounds a few array operations per group and run of pieces; padding rows and the
    padding request get empty bags.
    """
    spec = layout.spec
    counts = np.array([p.num_candidates for p in pieces], dtype=np.int64)
    rows, real = int(counts.sum()), len(pieces)
    if not 1 <= rows <= bucket <= layout.max_rows:
        raise ValueError(f"{rows} rows do not fit bucket {bucket} (max {layout.max_rows})")
    r_cap = bucket + 1
    views = host.bucket(bucket)
    row_request = views.row_request
    row_request[:rows] = np.repeat(np.arange(real, dtype=np.int32), counts)
    row_request[rows:] = real  # the padding request owns the padding rows
    offsets = views.request_offsets
    offsets[0] = 0
    np.cumsum(counts, out=offsets[1:real + 1], dtype=np.int32)
    offsets[real + 1:] = bucket
    np.minimum(offsets[:-1], bucket - 1, out=views.first_rows)
    views.bad_flags.fill(0)  # (what the forward flags: cleared with the batch's copy-in)
    if views.dense is not None:
        _pack_dense(spec, views.dense, pieces, counts, bucket, r_cap,
                    layout.dense_per_request)
    blocks, nnz = _pack_ids(layout, views.ids, host.weights, host.scratch, pieces)
    used = tuple(_pack_bounds(group, starts, ends, blocks, rows, real, bucket)
                 for group, (starts, ends) in zip(layout.groups, views.groups, strict=True))
    return PackedSizes(bucket, rows, real, nnz, used)


@dataclass(frozen=True, slots=True)
class _Block:
    """Bag bounds of consecutive pieces from row ``row`` and piece ``piece`` (``rows`` rows,
    ``pieces`` pieces): per piece, or once for them all when ``bases`` is None, candidate-
    scope [F_c(model), rows] and request-scope [F_r(model), pieces] starts and ends; with
    ``bases``, each piece's bounds are relative to its own ids, which landed at its base."""

    row: int
    piece: int
    rows: int
    pieces: int
    parts: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    bases: np.ndarray | None = None


def _pack_ids(layout: StagingLayout, ids: np.ndarray, weights: np.ndarray | None,
              scratch: np.ndarray, pieces: list[RequestInputs]) -> tuple[list[_Block], int]:
    """Every piece's ids (and weights) in the ids buffer: (their bag bounds as blocks, ids
    written). Pieces that came with their FlatSparse (shaped for this spec) go first, their
    ids in one concatenate (``_pack_flat``); the rest follow, packed feature by feature
    (``_pack_loose``); one block per run of consecutive pieces of either kind."""
    f_c, f_r = layout.flat_bags
    flat, loose, row = [], [], 0
    for i, piece in enumerate(pieces):
        fits = piece.flat is not None and piece.flat.fits(f_c, f_r, piece.num_candidates)
        (flat if fits else loose).append((i, row))
        row += piece.num_candidates
    blocks: list[_Block] = []
    pos = _pack_flat(layout, ids, weights, pieces, flat, blocks) if flat else 0
    if loose:
        pos = _pack_loose(layout, ids, weights, scratch, pieces, loose, pos, blocks)
    return blocks, pos


def _pack_flat(layout: StagingLayout, ids: np.ndarray, weights: np.ndarray | None,
               pieces: list[RequestInputs],
               flat: list[tuple[int, int]], blocks: list[_Block]) -> int:
    """Pieces with a FlatSparse (``flat``: (index, first row)), from the buffers' start:
    their ids (and weights) back to back in one concatenate, their bounds as one block per
    run of consecutive pieces (each piece's bounds plus where its ids landed, added in one
    go per run: a few numpy calls whatever the number of pieces). Returns the ids' end."""
    forms = [pieces[i].flat for i, _ in flat]
    sizes = np.fromiter((len(f.ids) for f in forms), np.int64, len(forms))
    bases = np.zeros(len(forms), np.int64)
    np.cumsum(sizes[:-1], out=bases[1:])
    end = _room(ids, 0, int(sizes.sum()))
    room = ids[:end]
    try:  # a plain copy when no id needs narrowing ("safe" refuses int64 -> int32)
        np.concatenate([f.ids for f in forms], out=room, casting="safe")
    except TypeError:  # wider ids: checked and cast, or clipped (_copy_ids)
        _copy_ids(np.concatenate([f.ids for f in forms], dtype=np.int64, casting="unsafe"),
                  room)
    if weights is not None:
        np.concatenate([f.weights if f.weights is not None else np.ones(len(f.ids), np.float32)
                        for f in forms], out=weights[:end], casting="same_kind")
    f_c = layout.flat_bags[0]
    k = 0
    while k < len(flat):  # runs of pieces consecutive in the batch
        first = k
        while k + 1 < len(flat) and flat[k + 1][0] == flat[k][0] + 1:
            k += 1
        k += 1
        parts, rows = [], 0
        for form, (index, _) in zip(forms[first:k], flat[first:k], strict=True):
            n = pieces[index].num_candidates
            c_starts, c_ends, r_starts, r_ends = split_bounds(form.bounds, f_c, n)
            parts.append((c_starts, c_ends, r_starts[:, None], r_ends[:, None]))
            rows += n
        blocks.append(_Block(flat[first][1], flat[first][0], rows, k - first, tuple(parts),
                             bases[first:k]))
    return end


def _pack_loose(layout: StagingLayout, ids: np.ndarray, weights: np.ndarray | None,
                scratch: np.ndarray, pieces: list[RequestInputs],
                loose: list[tuple[int, int]], start: int, blocks: list[_Block]) -> int:
    """Pieces without a FlatSparse (``loose``: (index, first row)), from ``start``, feature
    by feature: their ids with one concatenate, their bag lengths with another, and one
    cumulative sum (seeded with ``start``) that gives every bag's absolute bounds, laid out
    [F_c, their rows] then [F_r, their pieces]; appends one block per run of consecutive
    loose pieces (one for the whole batch when none came flat) and returns the end of
    their ids. A few numpy calls whatever the number of pieces."""
    order, (f_c, f_r) = layout.flat_order, layout.flat_bags
    mine = [pieces[i] for i, _ in loose]
    every = [p.sparse[name] for name in order for p in mine]  # feature-major
    values = [s.values for s in every]
    end = _room(ids, start, sum(map(len, values)))
    room = ids[start:end]
    try:  # a plain copy when no id needs narrowing ("safe" refuses int64 -> int32)
        if values:  # (none: a model without sparse features)
            np.concatenate(values, out=room, casting="safe")
    except TypeError:  # wider or unsigned ids: checked and cast, or clipped (_copy_ids)
        _copy_ids(np.concatenate(values, dtype=np.int64, casting="unsafe"), room)
    if weights is not None:
        np.concatenate([s.weights if s.weights is not None
                        else np.ones(len(s.values), np.float32) for s in every],
                       out=weights[start:end], casting="same_kind")
    n_rows, n_pieces = sum(p.num_candidates for p in mine), len(mine)
    steps = [s.lengths for s in every[:f_c * n_pieces]]
    if f_r:
        steps.append(np.fromiter((len(s.values) for s in every[f_c * n_pieces:]),
                                 scratch.dtype, f_r * n_pieces))
    split = f_c * n_rows
    cum = scratch[:split + f_r * n_pieces + 1]
    cum[0] = start
    if steps:
        np.concatenate(steps, out=cum[1:], casting="same_kind")
    np.cumsum(cum, out=cum)
    cand = (cum[:split].reshape(f_c, n_rows), cum[1:split + 1].reshape(f_c, n_rows))
    req = (cum[split:-1].reshape(f_r, n_pieces), cum[split + 1:].reshape(f_r, n_pieces))
    col, k = 0, 0
    while k < len(loose):  # runs of pieces consecutive in the batch are consecutive here
        first, (index, row) = k, loose[k]
        width = mine[k].num_candidates
        while k + 1 < len(loose) and loose[k + 1][0] == loose[k][0] + 1:
            k += 1
            width += mine[k].num_candidates
        k += 1
        part = (cand[0][:, col:col + width], cand[1][:, col:col + width],
                req[0][:, first:k], req[1][:, first:k])
        blocks.append(_Block(row, index, width, k - first, (part,)))
        col += width
    return end


def _room(ids: np.ndarray, start: int, count: int) -> int:
    """Where ``count`` ids from ``start`` end; ValueError past the bucket's room."""
    if start + count > len(ids):
        raise ValueError(f"{start + count} ids do not fit the staging buffers "
                         f"({len(ids)}): a bag is longer than its max_bag")
    return start + count


def _copy_ids(src: np.ndarray, dst: np.ndarray) -> None:
    """int32 or int64 ``src`` into ``dst``: int64 ids narrowed to int32 by a cast when all
    fit (one min and max per request), else clipped to [-1, 2^31-1], so an id outside
    int32 stays outside every table instead of wrapping into one."""
    if dst.dtype == np.int32 and src.dtype != np.int32 and len(src) \
            and (src.min() < -1 or src.max() > INT32_MAX):
        np.clip(src, -1, INT32_MAX, out=dst, casting="unsafe")
    else:
        np.copyto(dst, src, casting="unsafe")


def _pack_bounds(group: GroupLayout, starts: np.ndarray, ends: np.ndarray,
                 blocks: list[_Block], rows: int, pieces: int, bucket: int) -> int:
    """One group's bag bounds from the blocks (its features' rows of each piece, plus the
    piece's base); empty bags for padding. Returns the slots written."""
    f_c, f_r = group.candidate_features, group.request_features
    split, used = f_c * (bucket + 1), group.bounds_used(bucket)
    # [F_c, B + 1] and [F_r, R_cap + 1] views: one feature per row, its last slot unused
    cand = (starts[:split].reshape(f_c, bucket + 1), ends[:split].reshape(f_c, bucket + 1))
    req = (starts[split:used].reshape(f_r, bucket + 2), ends[split:used].reshape(f_r, bucket + 2))
    c_rows, r_rows = _selector(group.candidate_rows), _selector(group.request_rows)
    for block in blocks:
        for side in (0, 1):  # starts, then ends
            if f_c:
                _join([part[side][c_rows] for part in block.parts], block.bases,
                      cand[side][:, block.row:block.row + block.rows])
            if f_r:
                _join([part[2 + side][r_rows] for part in block.parts], block.bases,
                      req[side][:, block.piece:block.piece + block.pieces])
    for starts_2d, ends_2d, first in ((*cand, rows), (*req, pieces)):
        starts_2d[:, first:] = 0  # padding rows, the padding request, unused last slots
        ends_2d[:, first:] = 0
    return used


_ADD_EACH_MIN = 4096
"""Bounds per piece from which each piece's bounds are added to its base in their own numpy
call (one pass); below it, the pieces are joined first and their bases added in one more
pass (one call for all: many small pieces cost more in calls than in passes)."""


def _join(arrays: list[np.ndarray], bases: np.ndarray | None, out: np.ndarray) -> None:
    """``arrays`` ([rows, columns] each) side by side into ``out``, each plus its base
    (``bases``, one per array; None: already absolute)."""
    if bases is None:
        np.concatenate(arrays, axis=1, out=out, casting="same_kind")
        return
    if out.size >= _ADD_EACH_MIN * len(arrays):
        col = 0
        for array, base in zip(arrays, bases.tolist(), strict=True):
            np.add(array, base, out=out[:, col:col + array.shape[1]], casting="same_kind")
            col += array.shape[1]
        return
    np.concatenate(arrays, axis=1, out=out, casting="same_kind")
    widths = [array.shape[1] for array in arrays]
    np.add(out, np.repeat(bases.astype(out.dtype), widths), out=out)


def _selector(rows: tuple[int, ...]) -> slice | list[int]:
    """A slice when ``rows`` are consecutive (a view, no copy), else the list."""
    if rows and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return list(rows)


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

