"""Column layout of the fused forward: where each vector and interaction output lands.

The model's interaction output Z (the top MLP's input) is laid out with every column that
depends on request-scope inputs only first (the "request half", width ``ku``), then the
rest, each half in the reference order. The first top layer's weight columns are permuted
the same way, so W·z = W_u·u + W_c·c, and W_u·u is computed once per request.

- ``dot``: the embedding buffer E holds T vectors of width d back to back (x first); the
  dot kernel writes x and the pairs into Z through a destination map.
- ``cat``: Z is E itself: the gather and the bottom MLP write their vectors straight into
  their (permuted) slices.
- ``dcnv2``: the cross layers mix every column, so there is no split; E = x0 in the
  reference order.
"""

from __future__ import annotations

from dataclasses import dataclass

from recserve.engine.spec import ModelSpec

from .interaction import pair_columns


@dataclass(frozen=True, slots=True)
class Layout:
    """Static placement for one spec."""

    vector_cols: tuple[int, ...]
    """First column in E of each vector (x first when the model has dense features)."""
    e_width: int
    """Width of the embedding buffer E."""
    z_order: tuple[int, ...]
    """Reference column of Z at each stored position (a permutation of range(z_width))."""
    ku: int
    """Width of Z's request half (0: no split)."""
    pairs: tuple[tuple[int, int, int], ...]
    """dot only: (i, j, stored column) of each pair."""
    x_col_in_z: int | None
    """dot only: stored column of x in Z (None without dense features)."""
    x_request: bool
    """x depends on request-scope dense inputs only (the bottom MLP runs once per request)."""


def _vectors(spec: ModelSpec) -> tuple[list[int], list[bool]]:
    dims, req = [], []
    if spec.dense:
        dims.append(spec.bottom_out_dim)
        req.append(all(f.scope == "request" for f in spec.dense))
    for f in spec.sparse:
        dims.append(spec.table(f.table).dim)
        req.append(f.scope == "request")
    return dims, req


def build_layout(spec: ModelSpec) -> Layout:
    """Compute the ``Layout`` of ``spec`` (see the module docstring)."""
    dims, req = _vectors(spec)
    kind = spec.interaction.kind
    x_request = bool(spec.dense) and req[0]
    starts = [sum(dims[:i]) for i in range(len(dims))]
    if kind == "dot":
        d = dims[0]
        first = d if spec.dense else 0
        natural = pair_columns(len(dims), spec.interaction.self_interaction, first)
        labels = [x_request] * first + [req[i] and req[j] for i, j, _ in natural]
    else:
        labels = [r for r, w in zip(req, dims, strict=True) for _ in range(w)]
    if kind == "dcnv2":
        labels = [False] * len(labels)
    order = [c for c, lab in enumerate(labels) if lab] + [c for c, lab in enumerate(labels)
                                                          if not lab]
    stored = {c: p for p, c in enumerate(order)}
    ku = sum(labels)
    pairs: tuple = ()
    x_col = None
    if kind == "dot":
        vector_cols = tuple(starts)
        pairs = tuple((i, j, stored[c]) for i, j, c in natural)
        x_col = stored[0] if spec.dense else None
    else:
        vector_cols = tuple(stored[s] for s in starts)
    return Layout(vector_cols, sum(dims), tuple(order), ku if ku < len(labels) else 0,
                  pairs, x_col, x_request)
