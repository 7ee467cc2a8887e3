"""``recserve inspect``: check a model in a repository before a server loads it, and say
what it is and what it costs.

It loads the version as a server would (the spec parsed, every tensor checked against it),
scores a generated request with the reference model on this machine's CPU and checks the
scores are finite, then prints the features, tables and their bytes, the layers, the
parameters outside the tables, and the arithmetic and table bytes per candidate
(``engine.costs``). Exit status 1 when anything fails: usable in a model's CI before it is
copied to the servers' volume and `recserve reload`-ed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EPILOG = """\
examples:
  recserve inspect models                    # the only model, or say which there are
  recserve inspect models ctr --version 3    # one version
  recserve inspect models ctr --json         # the same facts as JSON"""


def register_inspect(commands, add_command) -> None:
    """Add ``inspect`` to the ``recserve`` subcommands."""
    p = add_command(commands, "inspect", "check a model in a repository (loads, scores a "
                    "generated request) and say what it is and costs", EPILOG)
    p.add_argument("repo", type=Path, metavar="DIR", help="model repository")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="model name (default: the repository's only model)")
    p.add_argument("--version", type=int, help="version (default: the highest)")
    p.add_argument("--candidates", type=_positive, default=100, metavar="N",
                   help="candidates in the generated request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(run=_run)


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1..100000")
    return value


def inspect_model(repo: Path, model: str | None, version: int | None,
                  candidates: int) -> dict:
    """The facts ``recserve inspect`` prints; ValueError / LookupError when the model does
    not load or does not score."""
    import numpy as np

    from recserve.engine.costs import forward_flops, rows_read_bytes
    from recserve.engine.demo import random_inputs
    from recserve.engine.inputs import collate
    from recserve.engine.reference import ReferenceModel
    from recserve.engine.repository import ModelRepository

    repository = ModelRepository(repo)
    if model is None:
        names = [name for name, _ in repository.models()]
        if not names:
            raise LookupError(f"{repo} holds no models (a repository is <dir>/<model>/"
                              "<version>/ with spec.json and weights.safetensors)")
        if len(names) > 1:
            raise LookupError(f"{repo} holds {len(names)} models ({', '.join(names)}); name one")
        model = names[0]
    loaded = repository.load(model, version)
    spec, weights = loaded.spec, loaded.weights

    def size(prefix_match) -> int:
        return sum(t.numel() * t.element_size() for k, t in weights.items() if prefix_match(k))

    request = random_inputs(spec, np.random.default_rng(0), candidates)
    reference = ReferenceModel(spec, weights)
    start = time.perf_counter()
    scores = reference.forward(collate(spec, [request]))
    took = time.perf_counter() - start
    if not bool(scores.isfinite().all()):
        raise ValueError(f"{model} version {loaded.version} scored a generated request with "
                         "non-finite values: its weights hold inf or NaN, or overflow")
    scopes = [f.scope for f in spec.sparse]
    return {
        "model": model, "version": loaded.version, "path": str(loaded.path),
        "sparse_features": {"count": len(spec.sparse), "request": scopes.count("request"),
                            "candidate": scopes.count("candidate"),
                            "max_ids_per_candidate": sum(f.max_bag for f in spec.sparse
                                                         if f.scope == "candidate")},
        "tables": [{"name": t.name, "rows": t.rows, "dim": t.dim, "dtype": t.dtype,
                    "bytes": size(lambda k, t=t: k.startswith(f"tables.{t.name}."))}
                   for t in spec.tables],
        "table_bytes": size(lambda k: k.startswith("tables.")),
        "dense_inputs": spec.dense_in_dim, "bottom_mlp": list(spec.bottom_mlp),
        "interaction": {"kind": spec.interaction.kind, "inputs": spec.concat_dim,
                        "vectors": spec.num_vectors,
                        "layers": spec.interaction.layers, "rank": spec.interaction.rank,
                        "outputs": spec.interaction_dim},
        "top_mlp": list(spec.top_mlp),
        "outputs": [{"name": o.name, "activation": o.activation} for o in spec.outputs],
        "weight_dtype": spec.weight_dtype,
        "parameters": sum(t.numel() for k, t in weights.items() if not k.startswith("tables.")),
        "flops_per_candidate": forward_flops(spec, 1),
        "table_bytes_per_candidate": rows_read_bytes(spec, 1),
        "check": {"candidates": candidates, "cpu_ms": round(took * 1e3, 2),
                  "min_score": float(scores.min()), "max_score": float(scores.max())},
    }


def describe(facts: dict) -> str:
    """``inspect_model``'s facts as lines for a terminal."""
    sparse, inter = facts["sparse_features"], facts["interaction"]
    largest = max(facts["tables"], key=lambda t: t["bytes"], default=None)
    if inter["kind"] == "dcnv2":
        how = f"dcnv2: {inter['layers']} layers of rank {inter['rank']} over {inter['inputs']}"
    elif inter["kind"] == "dot":
        how = f"dot over {inter['vectors']} vectors: {inter['outputs']} outputs"
    else:
        how = f"cat: {inter['outputs']} outputs"
    check = facts["check"]
    lines = [
        f"{facts['model']} version {facts['version']} ({facts['path']}): loads and scores",
        f"  sparse features  {sparse['count']} ({sparse['request']} per request, "
        f"{sparse['candidate']} per candidate; up to {sparse['max_ids_per_candidate']} ids "
        "a candidate)",
        f"  tables           {len(facts['tables'])}, {_bytes(facts['table_bytes'])}"
        + (f"; largest {largest['name']}: {largest['rows']} x {largest['dim']} "
           f"{largest['dtype']}, {_bytes(largest['bytes'])}" if largest else ""),
        f"  dense inputs     {facts['dense_inputs']}, bottom MLP "
        + ("-".join(map(str, [facts['dense_inputs'], *facts['bottom_mlp']]))
           if facts["bottom_mlp"] else "none"),
        f"  interaction      {how}",
        "  top MLP          " + "-".join(map(str, [inter["outputs"], *facts["top_mlp"]]))
        + "; outputs " + ", ".join(f"{o['name']} ({o['activation']})" for o in facts["outputs"]),
        f"  weights          {facts['parameters'] / 1e6:.2f} M parameters outside the tables "
        f"({facts['weight_dtype']})",
        f"  per candidate    {facts['flops_per_candidate'] / 1e6:.2f} MFLOP, "
        f"{_bytes(facts['table_bytes_per_candidate'])} of table rows (every bag full, "
        "nothing shared per request)",
        f"  check            {check['candidates']} generated candidates scored on this CPU "
        f"in {check['cpu_ms']:.1f} ms, scores {check['min_score']:.4g} .. "
        f"{check['max_score']:.4g}",
    ]
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _run(args: argparse.Namespace) -> int:
    facts = inspect_model(args.repo, args.model, args.version, args.candidates)
    print(json.dumps(facts, indent=2) if args.json else describe(facts))
    return 0
