"""Static inputs of the table-batched embedding bag: packed tables, feature slots, CSR checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._common import check_tensor

TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
INDEX_DTYPES = (torch.int32, torch.int64)


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
    """Tables of one dtype in one flat buffer, with int64 bases per table."""

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
        self.elem_base = [0]
        self.row_base = [0]
        for t in tables[:-1]:
            self.elem_base.append(self.elem_base[-1] + t.numel())
            self.row_base.append(self.row_base[-1] + t.shape[0])
        self.data = torch.cat([t.reshape(-1) for t in tables])
        # placeholders: never read unless quantized
        self.qparams = self.scale = self.shift = self.data
        if self.quantized:
            for i, (s, o) in enumerate(zip(scales, shifts, strict=True)):
                for what, v in (("scale", s), ("shift", o)):
                    check_tensor(f"table {i} {what}", v, dtypes=[torch.float32], ndim=1,
                                 device=device)
                    if v.shape[0] != self.rows[i]:
                        raise ValueError(f"table {i} {what} has shape {list(v.shape)}; "
                                         f"expected [{self.rows[i]}]")
            # [rows, 2] interleaved (scale, offset), so the kernel reads both with one load
            self.qparams = torch.stack([torch.cat(list(scales)), torch.cat(list(shifts))],
                                       dim=1).reshape(-1)
            self.scale, self.shift = self.qparams[0::2], self.qparams[1::2]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device


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
