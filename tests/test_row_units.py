"""bench/row_units.py: what one row lookup touches, by each cost model's unit (the row_size
section's key to why int8 runs at the bf16 rate on the H200)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import row_units as ru  # noqa: E402


def test_dim_128_rows_by_each_unit():
    # bf16: 256-byte rows at multiples of 256: 8 sectors, 4 bursts, 2 lines, always
    assert ru.row_units("bf16", 128) == {"bytes_read": 256, "sectors": 8.0, "bursts": 4.0,
                                         "lines": 2.0}
    # int8: 128 codes + scale and offset (136 bytes read) at a 144-byte stride: whatever
    # the row's offset in a line, 5 sectors, 3 bursts and 2 lines
    assert ru.row_units("int8", 128) == {"bytes_read": 136, "sectors": 5.0, "bursts": 3.0,
                                         "lines": 2.0}


def test_rows_that_straddle_blocks_count_both():
    # int8 dim 64: 72 bytes read at an 80-byte stride; offsets 0, 80, 32, 112, 64, 16, 96,
    # 48 in a line: half the rows cross into a second line
    assert ru.units_per_row("int8", 64, 128) == 1.5
    assert ru.units_per_row("bf16", 64, 128) == 1.0
    # a span is counted once per block it touches, the params beside the codes included
    assert ru.units_per_row("int8", 32, 32) == 2.0


def test_unknown_dtypes_are_refused():
    with pytest.raises(ValueError, match="expected bf16 or int8"):
        ru.row_spans("fp8", 128)
