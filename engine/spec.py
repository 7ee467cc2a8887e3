"""Model spec: a frozen, validated description of one DLRM-family ranking model.

A model scores N candidates for one request. Inputs are sparse features (embedding
bags over tables) and dense features, each with a scope: ``request`` (one value per
request, broadcast over its candidates) or ``candidate`` (one value per candidate).

Semantics, which the reference model implements and every backend must match:

- dense features are concatenated in declared order (request-scope ones broadcast)
  and go through the bottom MLP (ReLU after every layer); with no bottom layers the
  concatenation passes through unchanged;
- each sparse feature pools its bag from its table (sum or mean, optional per-value
  weights; an empty bag pools to zeros);
- the interaction combines the bottom output ``x`` and the pooled vectors ``e_1..e_F``:
  ``cat``: [x, e_1, ..., e_F];
  ``dot``: [x, dots] with the pairwise dots of T = F + 1 vectors (x first), strict
  lower triangle in row-major order (i > j), or i >= j with self-interaction;
  ``dcnv2``: x0 = [x, e_1..e_F]; each layer l: x_{l+1} = x0 * (V_l (U_l x_l) + b_l) + x_l;
- the top MLP applies ReLU after every layer but the last, whose width is the number
  of outputs; each output then applies its activation (sigmoid or identity "logit").

The spec file is JSON (``to_json`` / ``from_json``) and round-trips exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields

SCOPES = ("request", "candidate")
POOLINGS = ("sum", "mean")
TABLE_DTYPES = ("fp32", "fp16", "bf16", "int8")
WEIGHT_DTYPES = ("fp32", "fp16", "bf16")
INTERACTIONS = ("dot", "dcnv2", "cat")
ACTIVATIONS = ("sigmoid", "logit")
SPEC_VERSION = 1

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
MAX_ROWS = 1 << 34
MAX_DIM = 4096
MAX_BAG = 1 << 16


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r} is not valid: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or '_'"
        )


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} is {value!r}; expected one of {', '.join(choices)}")


def _check_int(what: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} is {value!r}; expected an integer in [{low}, {high}]")


@dataclass(frozen=True, slots=True)
class Table:
    """One embedding table."""

    name: str
    """Unique table name; weights are stored as ``tables.<name>.weight``."""
    rows: int
    """Number of rows; valid indices are 0 .. rows-1."""
    dim: int
    """Embedding width."""
    dtype: str = "fp32"
    """Storage dtype: fp32, fp16, bf16, or int8 (row-wise scale and offset, fp32)."""

    def __post_init__(self) -> None:
        _check_name("table", self.name)
        _check_int(f"table {self.name!r} rows", self.rows, 1, MAX_ROWS)
        _check_int(f"table {self.name!r} dim", self.dim, 1, MAX_DIM)
        _check_choice(f"table {self.name!r} dtype", self.dtype, TABLE_DTYPES)


@dataclass(frozen=True, slots=True)
class SparseFeature:
    """A bag of ids looked up in one table and pooled to one vector."""

    name: str
    """Input name, as clients send it."""
    table: str
    """Name of the table it reads; several features may share a table."""
    pooling: str = "sum"
    """sum or mean (mean of an empty bag is zeros)."""
    scope: str = "candidate"
    """request: one bag per request; candidate: one bag per candidate."""
    max_bag: int = 1
    """Largest bag a request may send for this feature."""
    weighted: bool = False
    """Whether each id comes with a per-value weight (sent as ``weights``)."""

    def __post_init__(self) -> None:
        _check_name("sparse feature", self.name)
        _check_name(f"sparse feature {self.name!r} table", self.table)
        _check_choice(f"sparse feature {self.name!r} pooling", self.pooling, POOLINGS)
        _check_choice(f"sparse feature {self.name!r} scope", self.scope, SCOPES)
        _check_int(f"sparse feature {self.name!r} max_bag", self.max_bag, 1, MAX_BAG)
        if not isinstance(self.weighted, bool):
            raise ValueError(f"sparse feature {self.name!r} weighted is {self.weighted!r}")


@dataclass(frozen=True, slots=True)
class DenseFeature:
    """A float vector input."""

    name: str
    """Input name, as clients send it."""
    dim: int
    """Width of the vector."""
    scope: str = "candidate"
    """request: one vector per request; candidate: one per candidate."""

    def __post_init__(self) -> None:
        _check_name("dense feature", self.name)
        _check_int(f"dense feature {self.name!r} dim", self.dim, 1, MAX_DIM)
        _check_choice(f"dense feature {self.name!r} scope", self.scope, SCOPES)


@dataclass(frozen=True, slots=True)
class Interaction:
    """How the bottom output and the pooled embeddings are combined."""

    kind: str = "dot"
    """dot, dcnv2 or cat."""
    self_interaction: bool = False
    """dot only: include each vector's dot with itself (i >= j instead of i > j)."""
    layers: int = 0
    """dcnv2 only: number of cross layers (>= 1)."""
    rank: int = 0
    """dcnv2 only: rank of each low-rank cross layer (>= 1)."""

    def __post_init__(self) -> None:
        _check_choice("interaction kind", self.kind, INTERACTIONS)
        if not isinstance(self.self_interaction, bool):
            raise ValueError(f"interaction self_interaction is {self.self_interaction!r}")
        if self.kind == "dcnv2":
            _check_int("interaction layers", self.layers, 1, 64)
            _check_int("interaction rank", self.rank, 1, MAX_DIM)
        elif self.layers or self.rank:
            raise ValueError(
                f"interaction layers/rank ({self.layers}, {self.rank}) only apply to dcnv2"
            )
        if self.self_interaction and self.kind != "dot":
            raise ValueError("interaction self_interaction only applies to dot")


@dataclass(frozen=True, slots=True)
class Output:
    """One score the model produces."""

    name: str
    """Score name (e.g. ``click``)."""
    activation: str = "sigmoid"
    """sigmoid (a probability) or logit (the raw value)."""

    def __post_init__(self) -> None:
        _check_name("output", self.name)
        _check_choice(f"output {self.name!r} activation", self.activation, ACTIVATIONS)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A whole model: inputs, layers, outputs. Weights live beside it (see weights.py)."""

    name: str
    """Model name in the repository."""
    tables: tuple[Table, ...]
    """Embedding tables."""
    sparse: tuple[SparseFeature, ...]
    """Sparse features, in interaction order."""
    dense: tuple[DenseFeature, ...] = ()
    """Dense features, concatenated in this order into the bottom MLP."""
    bottom_mlp: tuple[int, ...] = ()
    """Output widths of the bottom MLP layers (ReLU after each)."""
    interaction: Interaction = field(default_factory=Interaction)
    """Feature interaction."""
    top_mlp: tuple[int, ...] = (1,)
    """Output widths of the top MLP layers; the last equals the number of outputs."""
    outputs: tuple[Output, ...] = (Output("score"),)
    """Scores, in the order of the last layer's units."""
    weight_dtype: str = "fp32"
    """Storage dtype of MLP and cross-layer weights: fp32, fp16 or bf16."""

    def __post_init__(self) -> None:
        _check_name("model", self.name)
        _check_choice("model weight_dtype", self.weight_dtype, WEIGHT_DTYPES)
        for what, items in (("table", self.tables), ("sparse feature", self.sparse),
                            ("dense feature", self.dense), ("output", self.outputs)):
            names = [item.name for item in items]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"duplicate {what} names: {duplicates}")
        input_names = [f.name for f in self.sparse] + [f.name for f in self.dense]
        clash = sorted({n for n in input_names if input_names.count(n) > 1})
        if clash:
            raise ValueError(f"a sparse and a dense feature share the names {clash}")
        if not self.sparse and not self.dense:
            raise ValueError("model has no inputs: give at least one sparse or dense feature")
        if not any(f.scope == "candidate" for f in (*self.sparse, *self.dense)):
            raise ValueError("model has no candidate-scope input, so all candidates score alike")
        table_names = {t.name for t in self.tables}
        for f in self.sparse:
            if f.table not in table_names:
                raise ValueError(f"sparse feature {f.name!r} reads unknown table {f.table!r}")
        for what, sizes in (("bottom_mlp", self.bottom_mlp), ("top_mlp", self.top_mlp)):
            for i, width in enumerate(sizes):
                _check_int(f"{what}[{i}]", width, 1, 1 << 16)
        if self.bottom_mlp and not self.dense:
            raise ValueError("bottom_mlp is set but the model has no dense features")
        if not self.top_mlp:
            raise ValueError("top_mlp is empty; its last layer must produce the outputs")
        if self.top_mlp[-1] != len(self.outputs):
            raise ValueError(
                f"top_mlp ends in {self.top_mlp[-1]} units but there are "
                f"{len(self.outputs)} outputs; they must be equal"
            )
        if self.interaction.kind == "dot":
            widths = {self.table(f.table).dim for f in self.sparse}
            if self.dense:
                widths.add(self.bottom_out_dim)
            if len(widths) > 1:
                raise ValueError(
                    f"dot interaction needs one width for every embedding and the bottom "
                    f"output; got {sorted(widths)}"
                )

    def table(self, name: str) -> Table:
        """The table called ``name``."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def dense_in_dim(self) -> int:
        """Width of the concatenated dense features."""
        return sum(f.dim for f in self.dense)

    @property
    def bottom_out_dim(self) -> int:
        """Width of the bottom MLP's output (0 without dense features)."""
        return self.bottom_mlp[-1] if self.bottom_mlp else self.dense_in_dim

    @property
    def num_vectors(self) -> int:
        """Vectors entering the interaction: the bottom output (if any) and each pooled bag."""
        return len(self.sparse) + (1 if self.dense else 0)

    @property
    def concat_dim(self) -> int:
        """Width of [bottom output, pooled embeddings]."""
        return self.bottom_out_dim + sum(self.table(f.table).dim for f in self.sparse)

    @property
    def interaction_dim(self) -> int:
        """Width of the interaction output, the top MLP's input."""
        if self.interaction.kind != "dot":
            return self.concat_dim
        t = self.num_vectors
        pairs = t * (t + 1) // 2 if self.interaction.self_interaction else t * (t - 1) // 2
        return self.bottom_out_dim + pairs

    def to_dict(self) -> dict:
        """Plain dict of the spec (JSON-ready)."""
        return {"spec_version": SPEC_VERSION, **asdict(self)}

    def to_json(self) -> str:
        """The human-readable spec file's text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        """Build from ``to_dict`` output; unknown or missing keys raise ValueError."""
        data = dict(data)
        version = data.pop("spec_version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"spec_version is {version!r}; this recserve reads {SPEC_VERSION}")
        nested = {"tables": Table, "sparse": SparseFeature, "dense": DenseFeature,
                  "outputs": Output}
        kwargs = _known_keys(cls, data, "model")
        for key, kind in nested.items():
            if key in kwargs:
                kwargs[key] = tuple(kind(**_known_keys(kind, item, key)) for item in
                                    _as_list(key, kwargs[key]))
        for key in ("bottom_mlp", "top_mlp"):
            if key in kwargs:
                kwargs[key] = tuple(_as_list(key, kwargs[key]))
        if "interaction" in kwargs:
            kwargs["interaction"] = Interaction(
                **_known_keys(Interaction, kwargs["interaction"], "interaction"))
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parse a spec file's text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"spec file is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("spec file must hold a JSON object")
        return cls.from_dict(data)


def _as_list(key: str, value: object) -> list:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{key} must be a list, got {type(value).__name__}")
    return list(value)


def _known_keys(kind: type, data: object, where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {type(data).__name__}")
    allowed = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    return dict(data)
