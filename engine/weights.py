"""The weight tensors a spec needs: names, shapes, dtypes, seeded init, int8 quantization.

Names (safetensors keys):
  tables.<table>.weight          [rows, dim]   table dtype (uint8 codes for int8 tables)
  tables.<table>.scale, .offset  [rows]        fp32, int8 tables only: row = code*scale+offset
  bottom.<k>.weight / .bias      [out, in] / [out]      weight_dtype
  cross.<l>.u / .v / .bias       [rank, D] / [D, rank] / [D]   dcnv2 only
  top.<k>.weight / .bias         [out, in] / [out]      weight_dtype
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import ModelSpec

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "int8": torch.uint8}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Expected shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def expected_tensors(spec: ModelSpec) -> dict[str, TensorSpec]:
    """Every tensor the spec's weights file must hold, in a stable order."""
    out: dict[str, TensorSpec] = {}
    for t in spec.tables:
        out[f"tables.{t.name}.weight"] = TensorSpec((t.rows, t.dim), TORCH_DTYPES[t.dtype])
        if t.dtype == "int8":
            out[f"tables.{t.name}.scale"] = TensorSpec((t.rows,), torch.float32)
            out[f"tables.{t.name}.offset"] = TensorSpec((t.rows,), torch.float32)
    wdtype = TORCH_DTYPES[spec.weight_dtype]
    _mlp(out, "bottom", spec.dense_in_dim, spec.bottom_mlp, wdtype)
    if spec.interaction.kind == "dcnv2":
        d, r = spec.concat_dim, spec.interaction.rank
        for layer in range(spec.interaction.layers):
            out[f"cross.{layer}.u"] = TensorSpec((r, d), wdtype)
            out[f"cross.{layer}.v"] = TensorSpec((d, r), wdtype)
            out[f"cross.{layer}.bias"] = TensorSpec((d,), wdtype)
    _mlp(out, "top", spec.interaction_dim, spec.top_mlp, wdtype)
    return out


def _mlp(out: dict, prefix: str, width: int, sizes: tuple[int, ...], dtype: torch.dtype) -> None:
    for k, size in enumerate(sizes):
        out[f"{prefix}.{k}.weight"] = TensorSpec((size, width), dtype)
        out[f"{prefix}.{k}.bias"] = TensorSpec((size,), dtype)
        width = size


def check_weights(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> list[str]:
    """Every way ``weights`` differs from what ``spec`` needs, one line each (empty: fine)."""
    problems = []
    expected = expected_tensors(spec)
    for name, want in expected.items():
        got = weights.get(name)
        if got is None:
            problems.append(f"missing tensor {name!r} (want shape {list(want.shape)}, "
                            f"dtype {want.dtype})")
            continue
        if tuple(got.shape) != want.shape:
            problems.append(f"tensor {name!r} has shape {list(got.shape)}, "
                            f"want {list(want.shape)}")
        if got.dtype != want.dtype:
            problems.append(f"tensor {name!r} has dtype {got.dtype}, want {want.dtype}")
        elif got.is_floating_point() and not bool(torch.isfinite(got).all()):
            problems.append(f"tensor {name!r} holds NaN or Inf")
    for name in sorted(set(weights) - set(expected)):
        problems.append(f"unexpected tensor {name!r} (not in the spec)")
    return problems


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise 8-bit quantization: uint8 codes, fp32 scale and offset per row."""
    weight = weight.float()
    low = weight.min(dim=1).values
    high = weight.max(dim=1).values
    scale = ((high - low) / 255.0).clamp_min(1e-12)
    codes = torch.round((weight - low[:, None]) / scale[:, None]).clamp(0, 255).to(torch.uint8)
    return codes, scale, low


def dequantize_rowwise(codes: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor) -> torch.Tensor:
    """fp32 rows from ``quantize_rowwise`` output."""
    return codes.float() * scale[:, None] + offset[:, None]


def init_weights(spec: ModelSpec, seed: int = 0, table_scale: float = 0.5, *,
                 device: str | torch.device = "cpu",
                 tables: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Deterministic random weights for ``spec`` (demo models, tests, benchmarks).

    Tables are uniform in [-table_scale, table_scale]; layers use a scaled normal
    (as the DLRM reference does) so scores spread instead of saturating. ``device``
    draws them there (fast for GB-sized tables); ``tables`` reuses already built table
    tensors (``tables.<name>.*``) instead of drawing new ones.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, want in expected_tensors(spec).items():
        if name.endswith((".scale", ".offset")):
            continue
        if name.startswith("tables."):
            stem = name.removesuffix(".weight")
            if tables is not None:
                out.update({k: v for k, v in tables.items() if k.startswith(stem + ".")})
                continue
            rows, dim = want.shape
            values = (torch.rand(rows, dim, generator=gen, device=device) * 2 - 1) * table_scale
            if want.dtype == torch.uint8:
                out[name], out[f"{stem}.scale"], out[f"{stem}.offset"] = quantize_rowwise(values)
            else:
                out[name] = values.to(want.dtype)
            del values
            continue
        fan = want.shape[-1] + want.shape[0] if len(want.shape) == 2 else want.shape[0]
        std = (2.0 / fan) ** 0.5 if len(want.shape) == 2 else (1.0 / fan) ** 0.5
        out[name] = (torch.randn(want.shape, generator=gen, device=device) * std).to(want.dtype)
    return {name: out[name] for name in expected_tensors(spec)}
