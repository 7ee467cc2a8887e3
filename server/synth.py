"""Random valid infer inputs built from a ``models`` op description (no spec, no torch).

``recserve infer --demo-candidates N`` uses this so that any served model can be tried
without writing a request by hand; it is also a worked example of building a request
from the ``models`` response alone, as a client in another language would.
"""

from __future__ import annotations

import numpy as np


def synthetic_inputs(model: dict, num_candidates: int, rng: np.random.Generator) -> dict:
    """The ``inputs`` map of a random valid request for ``model`` (one ``models`` entry)."""
    inputs: dict = {}
    for spec in model["inputs"]:
        if spec["kind"] == "sparse":
            inputs[spec["name"]] = _sparse(spec, num_candidates, rng)
        else:
            shape = (spec["dim"],) if spec["scope"] == "request" else (num_candidates,
                                                                        spec["dim"])
            inputs[spec["name"]] = rng.standard_normal(shape, dtype=np.float32)
    return inputs


def _sparse(spec: dict, n: int, rng: np.random.Generator) -> object:
    max_bag, rows = int(spec["max_bag"]), int(spec["rows"])
    if spec["scope"] == "request":
        lengths = None
        total = int(rng.integers(1, max_bag + 1))
    else:
        lengths = rng.integers(1, max_bag + 1, size=n, dtype=np.int64)
        total = int(lengths.sum())
    # ids in the dtype the model description asks for (i4: half the bytes of i8)
    values = rng.integers(0, rows, size=total, dtype=np.int32 if spec.get("dtype") == "i4"
                          else np.int64)
    if lengths is None and not spec.get("weighted"):
        return values
    entry: dict = {"values": values}
    if lengths is not None:
        entry["lengths"] = lengths
    if spec.get("weighted"):
        entry["weights"] = rng.random(total, dtype=np.float32)
    return entry
