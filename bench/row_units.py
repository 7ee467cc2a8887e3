"""What one table-row lookup touches in memory, by the unit each cost model counts.

A random row lookup may cost per byte, per 32-byte sector (what L2 moves), per 64-byte
burst (what HBM moves at once) or per 128-byte line. The models predict different
int8 / bf16 rates: at dim 128 an int8 row (128 codes, scale and offset inline, 144-byte
stride) touches 5 sectors, 3 bursts and 2 lines, a bf16 row (256 bytes) 8, 4 and 2, so
1.6x, 1.33x and 1.0x. The H200 measured 0.92x. ``kernel_variants.py --sections row_size``
records these counts beside the rows a second it measures at dims 32-256, so one card run
says which model holds (and whether issue 6's 1.6x can be had at dim 128 at all).
"""

from __future__ import annotations

from math import gcd

from recserve.kernels.tables import quantized_params_at, quantized_row_bytes

UNITS = {"sectors": 32, "bursts": 64, "lines": 128}


def row_spans(dtype: str, dim: int) -> tuple[int, list[tuple[int, int]]]:
    """(row stride, [(start, length)] of the bytes a lookup reads, from the row's start),
    for ``bf16`` rows or ``int8`` rows with their scale and offset inline."""
    if dtype == "bf16":
        return 2 * dim, [(0, 2 * dim)]
    if dtype == "int8":
        return quantized_row_bytes(dim), [(0, dim), (quantized_params_at(dim), 8)]
    raise ValueError(f"dtype {dtype!r}: expected bf16 or int8")


def units_per_row(dtype: str, dim: int, unit: int) -> float:
    """Mean count of ``unit``-byte blocks one lookup touches, over the offsets rows take
    within a block. Rows lie at multiples of the stride from a buffer start aligned to 512
    bytes (torch's allocations; tables of one dim pack back to back, so every table
    starts at a multiple of the stride too)."""
    stride, spans = row_spans(dtype, dim)
    counts = []
    for r in range(unit // gcd(stride, unit)):  # the offsets repeat after this many rows
        at = r * stride
        counts.append(len({u for start, length in spans
                           for u in range((at + start) // unit,
                                          (at + start + length - 1) // unit + 1)}))
    return sum(counts) / len(counts)


def row_units(dtype: str, dim: int) -> dict[str, float]:
    """Bytes read, sectors, bursts and lines per lookup (means, 2 decimals)."""
    _, spans = row_spans(dtype, dim)
    out = {"bytes_read": sum(length for _, length in spans)}
    out.update({name: round(units_per_row(dtype, dim, size), 2)
                for name, size in UNITS.items()})
    return out
