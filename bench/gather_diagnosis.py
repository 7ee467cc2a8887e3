"""Why a pooled gather failed its check against the reference (``kernel_variants.py``).

A wrong pooled feature can come from the ids the kernel read, the table bytes it read, the
reference's own inputs, or the output being written over after the kernel ran. Each check
here rules one of them in or out, so one failing run on a card says which (the tenth
session's H200 runs gave a whole int8 feature wrong, only in a warm process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from recserve.kernels.tables import PackedTables, quantized_params_at


def beyond_bf16(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Where ``got`` is farther from the fp32 ``ref`` than bf16 rounding allows (a NaN is)."""
    return ~((got - ref).abs() <= ref.abs() * 2**-7 + 1e-3)


def wrong_features(e: torch.Tensor, feats, want: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the features whose slice of ``e`` is beyond bf16 rounding of ``want``."""
    return [k for k, (f, ref) in enumerate(zip(feats, want, strict=True))
            if bool(beyond_bf16(e[:, f.out_col:f.out_col + ref.shape[1]].float(), ref).any())]


def feature_ids(indices: torch.Tensor, offsets: torch.Tensor, k: int, b: int) -> torch.Tensor:
    """The ids feature k's bags span in CSR ``indices`` / ``offsets`` (B bags a feature)."""
    first, last = int(offsets[k * (b + 1)]), int(offsets[k * (b + 1) + b])
    return indices[first:last].to(torch.int64)


def packed_rows(packed: PackedTables, t: int, rows: torch.Tensor) -> tuple:
    """Table t's stored rows ``rows`` as the kernel reads them: (values, scale, offset), the
    last two None for float tables."""
    base, stride, dim = packed.elem_base[t], packed.row_stride[t], packed.dims[t]
    span = packed.data[base:base + packed.rows[t] * stride].view(packed.rows[t], stride)
    picked = span[rows]
    if not packed.quantized:
        return picked[:, :dim], None, None
    at = quantized_params_at(dim)
    params = picked[:, at:at + 8].contiguous().view(torch.float32)  # [n, 2]
    return picked[:, :dim], params[:, 0], params[:, 1]


def eq(same: bool) -> str:
    return "=" if same else "!="


def diagnose(e: torch.Tensor, feats, want: Sequence[torch.Tensor], values: Sequence,
             indices: torch.Tensor, offsets: torch.Tensor, packed: PackedTables,
             tables: Sequence[torch.Tensor], qparams: Sequence | None,
             relaunch: Callable[[], object], b: int,
             fresh_tables: Callable[[int], tuple] | None = None) -> str:
    """One line per wrong feature, saying which of the suspects differ.

    ``values`` are the reference's ids per feature, ``indices`` / ``offsets`` the CSR the
    kernel read; ``tables`` / ``qparams`` the reference's tables (codes and (scale, offset)
    for int8); ``relaunch`` runs the same gather into ``e`` again; ``fresh_tables(t)``, when
    given (int8), builds table t's codes, scale and offset anew from their source."""
    wrong = wrong_features(e, feats, want)
    if not wrong:
        return "no feature is wrong now (the output changed after the check)"
    failed = e.clone()
    e.fill_(float("nan"))
    relaunch()
    again = wrong_features(e, feats, want)
    lines = [f"features wrong: {wrong}; after a second launch: {again}"
             + ("" if again else " (the first output was written over, or raced)")]
    for k in wrong:
        f, t = feats[k], feats[k].table
        ids = feature_ids(indices, offsets, k, b)
        ref_ids = values[k].to(ids.device, torch.int64)
        same_ids = ids.shape == ref_ids.shape and bool((ids == ref_ids).all())
        rows = ref_ids.clamp(0, packed.rows[t] - 1)
        got, scale, shift = packed_rows(packed, t, rows)
        same_rows = bool((got == tables[t][rows]).all())
        same_params = qparams is None or (bool((scale == qparams[t][0][rows]).all())
                                          and bool((shift == qparams[t][1][rows]).all()))
        col = slice(f.out_col, f.out_col + packed.dims[t])
        same_output = bool(torch.equal(failed[:, col], e[:, col]))
        parts = [f"feature {k} (table {t}): ids the kernel read {eq(same_ids)} the "
                 "reference's", f"stored rows {eq(same_rows)} the reference's tables",
                 f"stored scale/offset {eq(same_params)} the reference's",
                 f"second launch {'gave the same' if same_output else 'differs'}"]
        if fresh_tables is not None:  # (int8: codes, scale, offset built again)
            fresh = fresh_tables(t)
            same_fresh = all(bool((a[rows] == c[rows]).all()) for a, c in zip(
                fresh, (tables[t], *qparams[t]), strict=True))
            parts.append(f"reference tables {eq(same_fresh)} built anew")
        lines.append("; ".join(parts))
    return " | ".join(lines)
