"""Device functions of the table-batched embedding bag (see ``embedding_bag``): loading
rows (bounds-checked, dequantized, weighted), stepping ids ahead of the rows they address,
the long-bag and short-bag pooling loops, and the store of pooled vectors.

Every sum has a fixed order whatever the config: the same bits for the same batch.
"""

from __future__ import annotations

from . import _common  # noqa: F401  (first: it may switch on the interpreter)

import triton  # isort: skip
import triton.language as tl  # isort: skip


@triton.jit
def _load(ptrs, mask, flags, L2_KEEP: tl.constexpr):
    """A tile of a table's rows (0 where masked). With L2_KEEP, a table the host marked to
    keep (flags & 16: the smallest tables of the launch, together within part of the L2)
    is read with the L2 told to evict its lines last, so the rows streamed from the large
    tables, read about once each, do not push the small tables' rows out (every sample
    reads them again). The values are the same either way."""
    if L2_KEEP:
        if (flags & 16) != 0:
            raw = tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_last")
        else:
            raw = tl.load(ptrs, mask=mask, other=0)
    else:
        raw = tl.load(ptrs, mask=mask, other=0)
    return raw


@triton.jit
def _gather(table_ptr, weights_ptr, idx, pos, valid,
            elem_base, row_stride, rows, dim, flags, d, dmask,
            QUANT: tl.constexpr, WEIGHTED: tl.constexpr, L2_KEEP: tl.constexpr):
    """Rows [n, BLOCK_D] (fp32, zero where masked) of ids ``idx`` [n] at positions ``pos``."""
    idx = idx.to(tl.int64)
    inb = valid & (idx >= 0) & (idx < rows)
    row = table_ptr + elem_base + idx * row_stride
    raw = _load(row[:, None] + d[None, :], inb[:, None] & dmask[None, :], flags, L2_KEEP)
    if QUANT:
        # uint8 -> fp32 without an I2F (a conversion the SM runs at 1/8 the rate of an FMA,
        # one per element: sm_90 SASS had 32 per step): 2^23 + code, read as a float, holds
        # the code in its low mantissa bits, so subtracting 2^23 gives it exactly
        codes = (raw.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        # scale and offset right after the row's codes (see PackedTables): one 8-byte load
        # from the span the codes came from
        params = (row + (dim + 7) // 8 * 8).to(tl.pointer_type(tl.float32), bitcast=True)
        qp = _load(params[:, None] + tl.arange(0, 2)[None, :], inb[:, None], flags, L2_KEEP)
        s, o = tl.split(qp)
        # An explicit FMA: one rounding in every variant. Left as `vals * s + o`, the
        # compiler contracted it in some configs and not others (int8 bits differed
        # between the unroll and prefetch variants on the H200).
        vals = tl.fma(codes, s[:, None], o[:, None])
    else:
        vals = raw.to(tl.float32)
    if WEIGHTED:
        # Unweighted features in a weighted launch read weight 1 (their slots are unused).
        w = tl.load(weights_ptr + pos, mask=inb, other=1.0).to(tl.float32)
        w = tl.where((flags & 4) != 0, w, 1.0)
        vals = vals * w[:, None]
    return vals, (valid & (inb == 0)).to(tl.int32)


@triton.jit
def _first_ids(indices_ptr, pos, valid, PREFETCH: tl.constexpr):
    """The ids of a loop's first step when prefetching (else an unused placeholder)."""
    if PREFETCH:
        ids = tl.load(indices_ptr + pos, mask=valid, other=0)
    else:
        ids = tl.zeros(pos.shape, dtype=indices_ptr.dtype.element_ty)
    return ids


@triton.jit
def _step_ids(indices_ptr, nxt, pos, valid, pos_next, valid_next, PREFETCH: tl.constexpr):
    """(ids at ``pos``, ids at ``pos_next``). With PREFETCH the next step's ids are loaded
    one step ahead, so each step waits on one load latency (the rows) instead of two
    (ids, then the rows they address); masked like the rows, so nothing past a bag is read."""
    if PREFETCH:
        ids = nxt
        nxt = tl.load(indices_ptr + pos_next, mask=valid_next, other=0)
    else:
        ids = tl.load(indices_ptr + pos, mask=valid, other=0)
    return ids, nxt


@triton.jit
def _add_one(table_ptr, indices_ptr, weights_ptr, acc, bad, nxt, pos, valid, pos_next,
             valid_next, elem_base, row_stride, rows, dim, flags, d, dmask,
             QUANT: tl.constexpr, WEIGHTED: tl.constexpr, PREFETCH: tl.constexpr,
             L2_KEEP: tl.constexpr):
    """One step of a pooling loop: acc + the rows at positions ``pos`` (where ``valid``);
    the next step's ids are at ``pos_next`` (loaded now when prefetching)."""
    idx, nxt = _step_ids(indices_ptr, nxt, pos, valid, pos_next, valid_next, PREFETCH)
    vals, b = _gather(table_ptr, weights_ptr, idx, pos, valid, elem_base, row_stride,
                      rows, dim, flags, d, dmask, QUANT, WEIGHTED, L2_KEEP)
    return acc + vals, bad | b, nxt


@triton.jit
def _ahead(last, pos_here, valid_here, pos_there, valid_there, MULTI_TILE: tl.constexpr):
    """The positions (and their validity) whose ids a step prefetches: the next step's of
    this bag (or tile), or, with MULTI_TILE on its ``last`` step, the first step's of the
    program's next bag (or tile, none past the program's last: ``valid_there`` is then
    False), so a program's bags follow one another without waiting on ids."""
    if MULTI_TILE:
        pos, valid = tl.where(last, pos_there, pos_here), tl.where(last, valid_there, valid_here)
    else:
        pos, valid = pos_here, valid_here
    return pos, valid


@triton.jit
def _steps(length, MULTI_TILE: tl.constexpr):
    """A bag's (or a tile's) loop steps: its longest bag's positions; with MULTI_TILE at
    least one (a masked step, adding zeros), so the next bag's ids are fetched even past an
    empty one."""
    steps = tl.max(length, axis=0)
    if MULTI_TILE:
        steps = tl.maximum(steps, 1)
    return steps


@triton.jit
def _add_two(table_ptr, weights_ptr, ids, acc, bad, pos0, valid0, pos1, valid1,
             elem_base, row_stride, rows, dim, flags, d, dmask,
             QUANT: tl.constexpr, WEIGHTED: tl.constexpr, L2_KEEP: tl.constexpr):
    """acc + rows(ids[:, 0]) + rows(ids[:, 1]), in that order (the same sums as two single
    steps, so UNROLL does not change a bit), with both tiles' loads in flight at once
    (UNROLL 4 calls it twice, ``_add_four``: four tiles' loads in flight, the sums still one
    at a time)."""
    id0, id1 = tl.split(ids)
    v0, b0 = _gather(table_ptr, weights_ptr, id0, pos0, valid0, elem_base,
                     row_stride, rows, dim, flags, d, dmask, QUANT, WEIGHTED, L2_KEEP)
    v1, b1 = _gather(table_ptr, weights_ptr, id1, pos1, valid1, elem_base,
                     row_stride, rows, dim, flags, d, dmask, QUANT, WEIGHTED, L2_KEEP)
    return (acc + v0) + v1, bad | b0 | b1


@triton.jit
def _add_four(table_ptr, weights_ptr, ids, acc, bad, pos0, valid0, pos1, valid1, pos2,
              valid2, pos3, valid3, elem_base, row_stride, rows, dim, flags, d, dmask,
              N: tl.constexpr, QUANT: tl.constexpr, WEIGHTED: tl.constexpr,
              L2_KEEP: tl.constexpr):
    """UNROLL 4: ``_add_two`` on ids [N, 4]'s columns 0-1, then on columns 2-3."""
    first, last = tl.split(tl.permute(tl.reshape(ids, [N, 2, 2]), (0, 2, 1)))
    acc, bad = _add_two(table_ptr, weights_ptr, first, acc, bad, pos0, valid0, pos1, valid1,
                        elem_base, row_stride, rows, dim, flags, d, dmask, QUANT, WEIGHTED,
                        L2_KEEP)
    return _add_two(table_ptr, weights_ptr, last, acc, bad, pos2, valid2, pos3, valid3,
                    elem_base, row_stride, rows, dim, flags, d, dmask, QUANT, WEIGHTED, L2_KEEP)


@triton.jit
def _finish(acc, length, bad, bags, bmask, out_ptr, bad_ptr, row_request_ptr,
            request_offsets_ptr, out_stride, out_col, dim, flags, d, dmask):
    """Mean, bad flags, and the store of pooled ``acc`` [n, BLOCK_D] for ``bags`` [n]."""
    if (flags & 2) != 0:
        acc = acc / tl.maximum(length, 1).to(tl.float32)[:, None]
    val = acc.to(out_ptr.dtype.element_ty)
    is_bad = (bad != 0) & bmask
    if (flags & 1) != 0:
        tl.store(bad_ptr + bags, tl.full(bags.shape, 1, tl.int32), mask=is_bad)
        rs = tl.load(request_offsets_ptr + bags, mask=bmask, other=0).to(tl.int64)
        n = tl.load(request_offsets_ptr + bags + 1, mask=bmask, other=0).to(tl.int64) - rs
        for k in range(0, tl.max(n, axis=0)):
            ptrs = out_ptr + ((rs + k) * out_stride + out_col)[:, None] + d[None, :]
            tl.store(ptrs, val, mask=(bmask & (k < n))[:, None] & dmask[None, :])
    else:
        owner = tl.load(row_request_ptr + bags, mask=is_bad, other=0)
        tl.store(bad_ptr + owner, tl.full(bags.shape, 1, tl.int32), mask=is_bad)
        ptrs = out_ptr + (bags.to(tl.int64) * out_stride + out_col)[:, None] + d[None, :]
        tl.store(ptrs, val, mask=bmask[:, None] & dmask[None, :])


@triton.jit
def _pool_long(table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
               out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr,
               elem_base, row_stride, rows, dim, bag_base, num_bags, out_col, local, flags,
               out_stride, LANES: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
               WEIGHTED: tl.constexpr, PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
               STAGES: tl.constexpr, L2_KEEP: tl.constexpr, tiles, MULTI_TILE: tl.constexpr):
    """Bags local*tiles .. +tiles of a long-bag feature, one after another, each LANES
    positions per step in one [LANES, D] tile (UNROLL such tiles per step)."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < dim
    first = local * tiles
    bags = first + tl.arange(0, 1)
    bmask = bags < num_bags
    start = tl.load(offsets_ptr + bag_base + bags, mask=bmask, other=0).to(tl.int64)
    end = tl.load(ends_ptr + bag_base + bags, mask=bmask, other=0).to(tl.int64)
    lanes = tl.arange(0, LANES)
    tl.static_assert(UNROLL == 1 or UNROLL == 2 or UNROLL == 4)
    if UNROLL == 1:
        nxt = _first_ids(indices_ptr, start + lanes, start + lanes < end, PREFETCH)
    else:  # UNROLL [LANES, D] tiles per step: positions j + lanes + LANES * u
        posu = start + lanes[:, None] + LANES * tl.arange(0, UNROLL)[None, :]
        nxt = _first_ids(indices_ptr, posu, posu < end, PREFETCH)
    for t in range(tiles):
        bags = first + t + tl.arange(0, 1)  # (from a scalar, as in _pool_short)
        bmask = bags < num_bags
        if MULTI_TILE:  # the program's next bag's bounds, loaded before this bag's rows
            bags_n = bags + 1
            bmask_n = bags_n < tl.minimum(num_bags, first + tiles)
            start_n = tl.load(offsets_ptr + bag_base + bags_n, mask=bmask_n, other=0).to(tl.int64)
            end_n = tl.load(ends_ptr + bag_base + bags_n, mask=bmask_n, other=0).to(tl.int64)
        else:  # (one bag a program: no next one)
            start_n, end_n = start, end
        steps = _steps(end - start, MULTI_TILE)
        acc = tl.zeros([LANES, BLOCK_D], dtype=tl.float32)
        bad = tl.zeros([LANES], dtype=tl.int32)
        if UNROLL == 1:
            # STAGES > 1: rows staged through shared memory, STAGES - 1 steps ahead
            for j in tl.range(0, steps, LANES, num_stages=STAGES):
                pos = start + j + lanes
                pos_next, valid_next = _ahead(j + LANES >= steps, pos + LANES, pos + LANES < end,
                                              start_n + lanes, start_n + lanes < end_n,
                                              MULTI_TILE)
                acc, bad, nxt = _add_one(table_ptr, indices_ptr, weights_ptr, acc, bad, nxt,
                                         pos, pos < end, pos_next, valid_next, elem_base,
                                         row_stride, rows, dim, flags, d, dmask, QUANT,
                                         WEIGHTED, PREFETCH, L2_KEEP)
        else:
            posu = start + lanes[:, None] + LANES * tl.arange(0, UNROLL)[None, :]
            posu_n = start_n + lanes[:, None] + LANES * tl.arange(0, UNROLL)[None, :]
            for j in range(0, steps, UNROLL * LANES):
                later = posu + j + UNROLL * LANES
                pos_next, valid_next = _ahead(j + UNROLL * LANES >= steps, later, later < end,
                                              posu_n, posu_n < end_n, MULTI_TILE)
                ids, nxt = _step_ids(indices_ptr, nxt, posu + j, posu + j < end, pos_next,
                                     valid_next, PREFETCH)
                pos = start + j + lanes
                if UNROLL == 2:
                    acc, bad = _add_two(table_ptr, weights_ptr, ids, acc, bad, pos, pos < end,
                                        pos + LANES, pos + LANES < end, elem_base, row_stride,
                                        rows, dim, flags, d, dmask, QUANT, WEIGHTED, L2_KEEP)
                else:
                    p2, p3 = pos + 2 * LANES, pos + 3 * LANES
                    acc, bad = _add_four(table_ptr, weights_ptr, ids, acc, bad, pos, pos < end,
                                         pos + LANES, pos + LANES < end, p2, p2 < end, p3,
                                         p3 < end, elem_base, row_stride, rows, dim, flags, d,
                                         dmask, LANES, QUANT, WEIGHTED, L2_KEEP)
        _finish(_lanes_sum(acc, LANES, BLOCK_D), end - start,
                tl.expand_dims(tl.max(bad, axis=0), 0), bags, bmask, out_ptr, bad_ptr,
                row_request_ptr, request_offsets_ptr, out_stride, out_col, dim, flags, d, dmask)
        start, end = start_n, end_n


@triton.jit
def _lanes_sum(acc, LANES: tl.constexpr, BLOCK_D: tl.constexpr):
    """[LANES, D] -> [1, D]: the lanes' partial sums added in a fixed pairwise tree, not by
    tl.sum, whose order follows the register layout: that changes with the load width (int8
    rows with 16-byte loads), and int8 results differed in the last bits between variants."""
    tl.static_assert(LANES >= 2 and LANES <= 32)
    if LANES >= 32:
        acc = _halve(acc, 32, BLOCK_D)
    if LANES >= 16:
        acc = _halve(acc, 16, BLOCK_D)
    if LANES >= 8:
        acc = _halve(acc, 8, BLOCK_D)
    if LANES >= 4:
        acc = _halve(acc, 4, BLOCK_D)
    return _halve(acc, 2, BLOCK_D)


@triton.jit
def _halve(x, N: tl.constexpr, BLOCK_D: tl.constexpr):
    """[N, D] -> [N / 2, D]: row i plus row i + N / 2, whatever the layout."""
    pairs = tl.permute(tl.reshape(x, [2, N // 2, BLOCK_D]), (1, 2, 0))
    first, second = tl.split(pairs)
    return first + second


@triton.jit
def _pool_short(table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
                out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr,
                elem_base, row_stride, rows, dim, bag_base, num_bags, out_col, local, flags,
                out_stride, BAGS: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
                WEIGHTED: tl.constexpr, PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
                STAGES: tl.constexpr, L2_KEEP: tl.constexpr, tiles, MULTI_TILE: tl.constexpr):
    """``tiles`` tiles of BAGS bags of a short-bag feature (bags local*BAGS*tiles ..
    +BAGS*tiles), one tile after another, one position of each bag per step."""
    d = tl.arange(0, BLOCK_D)
    dmask = d < dim
    first = local * (BAGS * tiles)
    bags = first + tl.arange(0, BAGS)
    bmask = bags < num_bags
    start = tl.load(offsets_ptr + bag_base + bags, mask=bmask, other=0).to(tl.int64)
    length = tl.load(ends_ptr + bag_base + bags, mask=bmask, other=0) - start
    tl.static_assert(UNROLL == 1 or UNROLL == 2 or UNROLL == 4)
    u = tl.arange(0, UNROLL)[None, :]  # (UNROLL > 1: positions j + u of each bag per step)
    if UNROLL == 1:
        nxt = _first_ids(indices_ptr, start, length > 0, PREFETCH)
    else:
        nxt = _first_ids(indices_ptr, start[:, None] + u, u < length[:, None], PREFETCH)
    for t in range(tiles):
        # (the tile's bags from a scalar: carried as vectors they took registers twice, in
        # the layouts of the row tiles and of the id loads)
        bags = first + t * BAGS + tl.arange(0, BAGS)
        bmask = bags < num_bags
        if MULTI_TILE:  # the program's next tile's bounds, loaded before this tile's rows
            bags_n = bags + BAGS
            bmask_n = bags_n < tl.minimum(num_bags, first + BAGS * tiles)
            start_n = tl.load(offsets_ptr + bag_base + bags_n, mask=bmask_n, other=0).to(tl.int64)
            length_n = tl.load(ends_ptr + bag_base + bags_n, mask=bmask_n, other=0) - start_n
        else:  # (one tile a program: no next one)
            start_n, length_n = start, length
        steps = _steps(length, MULTI_TILE)
        acc = tl.zeros([BAGS, BLOCK_D], dtype=tl.float32)
        bad = tl.zeros([BAGS], dtype=tl.int32)
        if UNROLL == 1:
            # STAGES > 1: rows staged through shared memory, STAGES - 1 steps ahead
            for j in tl.range(0, steps, num_stages=STAGES):
                pos, end = start + j, start + length
                pos_next, valid_next = _ahead(j + 1 >= steps, pos + 1, pos + 1 < end, start_n,
                                              length_n > 0, MULTI_TILE)
                acc, bad, nxt = _add_one(table_ptr, indices_ptr, weights_ptr, acc, bad, nxt,
                                         pos, pos < end, pos_next, valid_next, elem_base,
                                         row_stride, rows, dim, flags, d, dmask, QUANT,
                                         WEIGHTED, PREFETCH, L2_KEEP)
        else:
            for j in range(0, steps, UNROLL):
                pos_next, valid_next = _ahead(j + UNROLL >= steps, start[:, None] + j + UNROLL + u,
                                              j + UNROLL + u < length[:, None],
                                              start_n[:, None] + u, u < length_n[:, None],
                                              MULTI_TILE)
                ids, nxt = _step_ids(indices_ptr, nxt, start[:, None] + j + u,
                                     j + u < length[:, None], pos_next, valid_next, PREFETCH)
                if UNROLL == 2:
                    acc, bad = _add_two(table_ptr, weights_ptr, ids, acc, bad, start + j,
                                        j < length, start + j + 1, j + 1 < length, elem_base,
                                        row_stride, rows, dim, flags, d, dmask, QUANT,
                                        WEIGHTED, L2_KEEP)
                else:
                    acc, bad = _add_four(table_ptr, weights_ptr, ids, acc, bad, start + j,
                                         j < length, start + j + 1, j + 1 < length,
                                         start + j + 2, j + 2 < length, start + j + 3,
                                         j + 3 < length, elem_base, row_stride, rows, dim,
                                         flags, d, dmask, BAGS, QUANT, WEIGHTED, L2_KEEP)
        _finish(acc, length, bad, bags, bmask, out_ptr, bad_ptr, row_request_ptr,
                request_offsets_ptr, out_stride, out_col, dim, flags, d, dmask)
        start, length = start_n, length_n


@triton.jit
def _pool_program(pid, table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
                  out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr, prog_feature_ptr,
                  meta_ptr, out_stride, BAGS: tl.constexpr, LANES: tl.constexpr,
                  BLOCK_D: tl.constexpr, QUANT: tl.constexpr, WEIGHTED: tl.constexpr,
                  ALIGN: tl.constexpr, PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
                  STAGES: tl.constexpr, L2_KEEP: tl.constexpr,
                  BLOCK_MAJOR: tl.constexpr = 0, MULTI_TILE: tl.constexpr = 0):
    """Program ``pid`` of a gather launch: its feature's metadata (``tables._META_COLS``),
    then its bags pooled and stored. Returns (its first bag, the number of bags it pooled):
    a plain gather ignores them, the fused gather + dot counts rows with them
    (``gather_dot``). BLOCK_MAJOR > 0: the program map holds feature + BLOCK_MAJOR * the
    program's index within its feature (``tables.launch_plan``'s ``block_rows``, with
    ``tables.FEATURE_SLOTS``). MULTI_TILE 1 (long bags) or 2 (long and short): the program
    pools its feature's ``tiles`` (meta) tiles of bags one after another, each tile's first
    ids fetched during the previous tile's last rows; 0: one tile (the same code as before
    there were tiles)."""
    word = tl.load(prog_feature_ptr + pid).to(tl.int64)
    if BLOCK_MAJOR > 0:
        f = word % BLOCK_MAJOR
    else:
        f = word
    meta = meta_ptr + f * 10
    # ALIGN (host-computed gcd, see ``alignment``) divides every table base, row stride, dim,
    # out column and the out row stride: telling the compiler lets it issue 16-byte row loads and
    # stores instead of one element per instruction (it cannot see values read from meta).
    elem_base = tl.multiple_of(tl.load(meta + 0), ALIGN)
    row_stride = tl.multiple_of(tl.load(meta + 1), ALIGN)
    rows = tl.load(meta + 2)
    dim = tl.multiple_of(tl.load(meta + 3), ALIGN)
    bag_base = tl.load(meta + 4)
    num_bags = tl.load(meta + 5)
    out_col = tl.multiple_of(tl.load(meta + 6), ALIGN)
    out_stride = out_stride // ALIGN * ALIGN  # a no-op that shows the divisibility
    if BLOCK_MAJOR > 0:
        local = word // BLOCK_MAJOR
    else:
        local = pid - tl.load(meta + 7)
    flags = tl.load(meta + 8)
    if MULTI_TILE > 0:
        tiles = tl.load(meta + 9).to(tl.int32)
    else:
        tiles = 1
    if MULTI_TILE == 2:
        short_tiles = tiles
    else:  # one tile a short-bag program, in the one-tile code (the host's tiles are 1)
        short_tiles = 1
    if (flags & 8) != 0:
        _pool_long(table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
                   out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr,
                   elem_base, row_stride, rows, dim, bag_base, num_bags, out_col, local, flags,
                   out_stride, LANES, BLOCK_D, QUANT, WEIGHTED, PREFETCH, UNROLL, STAGES,
                   L2_KEEP, tiles, MULTI_TILE > 0)
    else:
        _pool_short(table_ptr, indices_ptr, offsets_ptr, ends_ptr, weights_ptr,
                    out_ptr, bad_ptr, row_request_ptr, request_offsets_ptr,
                    elem_base, row_stride, rows, dim, bag_base, num_bags, out_col, local, flags,
                    out_stride, BAGS, BLOCK_D, QUANT, WEIGHTED, PREFETCH, UNROLL, STAGES,
                    L2_KEEP, short_tiles, MULTI_TILE == 2)
    # a long-bag program pools bags local*tiles .. +tiles, a short-bag one tiles tiles of BAGS
    per_program = tl.where((flags & 8) != 0, 1, BAGS) * tiles
    first = local * per_program
    return first, tl.minimum(num_bags - first, per_program)
