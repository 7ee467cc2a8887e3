"""What one forward of a spec'd model costs: arithmetic and table bytes per candidate row.

Used by the benchmarks (TFLOP/s and effective GB/s) and by ``recserve inspect``. Both are
upper bounds for a request: every row is counted as its own (request-scope features are in
fact gathered, and the first top layer's request half computed, once per request) and every
bag as full (``max_bag`` ids).
"""

from __future__ import annotations

from .spec import ModelSpec

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def forward_flops(spec: ModelSpec, rows: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward over ``rows`` candidate rows: the
    bottom MLP, the interaction (dot products or cross layers) and the top MLP."""
    macs, width = 0, spec.dense_in_dim
    for n in spec.bottom_mlp:
        macs, width = macs + width * n, n
    if spec.interaction.kind == "dcnv2":
        macs += spec.interaction.layers * 2 * spec.concat_dim * spec.interaction.rank
    elif spec.interaction.kind == "dot":
        t = spec.num_vectors
        macs += t * (t - 1) // 2 * spec.bottom_out_dim
    width = spec.interaction_dim
    for n in spec.top_mlp:
        macs, width = macs + width * n, n
    return 2.0 * macs * rows


def rows_read_bytes(spec: ModelSpec, rows: int) -> int:
    """Bytes of table rows one forward over ``rows`` rows reads with every bag full (int8:
    codes plus each row's scale and offset)."""
    total = 0
    for f in spec.sparse:
        t = spec.table(f.table)
        row = t.dim * ELEMENT_BYTES[t.dtype] + (8 if t.dtype == "int8" else 0)
        total += rows * f.max_bag * row
    return total
