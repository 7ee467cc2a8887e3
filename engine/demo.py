"""The built-in demo model and a generator of ranking traffic for any spec.

The demo is shaped like a streaming home page ranker: the member's viewing history
(up to 100 title ids), country, device and time of day are request-scope; each
candidate title brings its id, genre tags and a few dense facts. Small enough to build
in a second and serve on 2 CPU cores.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .inputs import RequestInputs, SparseInput
from .repository import ModelRepository, save_model
from .spec import DenseFeature, Interaction, ModelSpec, Output, SparseFeature, Table
from .weights import init_weights

DEMO_NAME = "demo"
DEMO_SEED = 20261126
CANDIDATES_LOW, CANDIDATES_HIGH = 100, 700
ZIPF_ALPHA = 1.15


def demo_spec() -> ModelSpec:
    """The demo model's spec (dot interaction, sigmoid score)."""
    dim = 16
    return ModelSpec(
        name=DEMO_NAME,
        tables=(Table("titles", 20_000, dim), Table("countries", 250, dim),
                Table("devices", 32, dim), Table("genres", 64, dim),
                Table("hours", 24, dim)),
        sparse=(
            SparseFeature("watch_history", "titles", "mean", "request", max_bag=100),
            SparseFeature("country", "countries", "sum", "request"),
            SparseFeature("device", "devices", "sum", "request"),
            SparseFeature("hour_of_day", "hours", "sum", "request"),
            SparseFeature("title_id", "titles", "sum", "candidate"),
            SparseFeature("genres", "genres", "mean", "candidate", max_bag=5),
        ),
        dense=(DenseFeature("member_dense", 4, "request"),
               DenseFeature("title_dense", 3, "candidate")),
        bottom_mlp=(32, dim),
        interaction=Interaction("dot"),
        top_mlp=(64, 32, 1),
        outputs=(Output("play", "sigmoid"),),
    )


def build_demo_repository(root: str | os.PathLike) -> Path:
    """Write the demo model (version 1) into ``root`` unless it is already there."""
    root = Path(root)
    if 1 in ModelRepository(root).versions(DEMO_NAME):
        return root / DEMO_NAME / "1"
    spec = demo_spec()
    return save_model(root, spec, init_weights(spec, seed=DEMO_SEED), version=1)


def ranking_candidates(rng: np.random.Generator) -> int:
    """N for one ranking request, in 100..700 with mean about 270 (MLPerf's trace shape).

    100 plus an exponential of scale 205 truncated at 600: most requests are short,
    a long tail reaches 700, the mean lands near MLPerf's 270.
    """
    span, scale = CANDIDATES_HIGH - CANDIDATES_LOW, 205.0
    u = rng.random()
    extra = -scale * np.log1p(-u * (1.0 - np.exp(-span / scale)))
    return CANDIDATES_LOW + min(int(extra), span)


@functools.lru_cache(maxsize=16)
def _zipf_cdf(rows: int, alpha: float) -> np.ndarray:
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def sample_ids(rng: np.random.Generator, rows: int, size: int, zipf: bool = False,
               alpha: float = ZIPF_ALPHA) -> np.ndarray:
    """``size`` ids in [0, rows): uniform, or Zipf(alpha) over ranks (id 0 hottest)."""
    if not zipf:
        return rng.integers(0, rows, size=size, dtype=np.int64)
    ids = np.searchsorted(_zipf_cdf(rows, alpha), rng.random(size), side="right")
    return np.minimum(ids, rows - 1).astype(np.int64)


def random_inputs(spec: ModelSpec, rng: np.random.Generator, num_candidates: int,
                  zipf: bool = False) -> RequestInputs:
    """A valid request for any spec: random bags (1..max_bag ids) and normal dense values."""
    sparse = {}
    for f in spec.sparse:
        rows = spec.table(f.table).rows
        if f.scope == "request":
            lengths = None
            total = int(rng.integers(1, f.max_bag + 1))
        else:
            lengths = rng.integers(1, f.max_bag + 1, size=num_candidates, dtype=np.int64)
            total = int(lengths.sum())
        weights = rng.random(total, dtype=np.float32) if f.weighted else None
        sparse[f.name] = SparseInput(sample_ids(rng, rows, total, zipf), lengths, weights)
    dense = {}
    for f in spec.dense:
        shape = (f.dim,) if f.scope == "request" else (num_candidates, f.dim)
        dense[f.name] = rng.standard_normal(shape, dtype=np.float32)
    return RequestInputs(num_candidates, sparse, dense)


def to_wire(spec: ModelSpec, inputs: RequestInputs) -> dict:
    """The ``inputs`` map of an infer request carrying ``inputs`` (numpy arrays); ids go as
    int32 where their table and values allow, as the ``models`` op advises (half the
    bytes)."""
    wire: dict = {}
    for f in spec.sparse:
        s = inputs.sparse[f.name]
        values, narrow = s.values, np.iinfo(np.int32)
        if (spec.table(f.table).rows <= narrow.max and len(values)
                and narrow.min <= values.min() and values.max() <= narrow.max):
            values = values.astype(np.int32, copy=False)  # never wraps a bad id into range
        if f.scope == "request" and not f.weighted:
            wire[f.name] = values
            continue
        entry = {"values": values}
        if s.lengths is not None:
            entry["lengths"] = s.lengths
        if s.weights is not None:
            entry["weights"] = s.weights
        wire[f.name] = entry
    wire.update(inputs.dense)
    return wire


def demo_request(spec: ModelSpec, rng: np.random.Generator, num_candidates: int,
                 zipf: bool = False) -> dict:
    """The ``inputs`` map of a random valid infer request (numpy arrays)."""
    return to_wire(spec, random_inputs(spec, rng, num_candidates, zipf))
