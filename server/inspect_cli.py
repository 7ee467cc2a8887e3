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
import sys
import time
from pathlib import Path

EPILOG = """\
examples:
  recserve inspect models                    # the only model, or say which there are
  recserve inspect models ctr --version 3    # one version
  recserve inspect models ctr --json         # the same facts as JSON
  recserve inspect models ctr --against 2    # scores of the same requests, this version vs 2
  recserve inspect models ctr --against 2 --max-diff 1e-3   # exit 1 past that (a re-export)"""


def register_inspect(commands, add_command) -> None:
    """Add ``inspect`` to the ``recserve`` subcommands."""
    p = add_command(commands, "inspect", "check a model in a repository (loads, scores a "
                    "generated request) and say what it is and costs", EPILOG + """

It reads the whole version into this machine's memory (its tables included, as the
table bytes it prints say) and scores on the CPU with the reference model.""")
    p.add_argument("repo", type=Path, metavar="DIR", help="model repository")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="model name (default: the repository's only model)")
    p.add_argument("--version", type=int, help="version (default: the highest)")
    p.add_argument("--candidates", type=_positive, default=100, metavar="N",
                   help="candidates in the generated request (default: %(default)s)")
    p.add_argument("--against", type=int, metavar="VERSION",
                   help="also score the same generated requests with this version of the "
                   "model and say how far the scores and the candidates' ranking moved")
    p.add_argument("--max-diff", type=float, metavar="X",
                   help="with --against: exit 1 when a score moved by more than X")
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
    return model_facts(load_version(repo, model, version), candidates)


def load_version(repo: Path, model: str | None, version: int | None):
    """The ``LoadedModel`` (checked as a server checks it); ``model`` None: the repository's
    only one."""
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
    return repository.load(model, version)


def model_facts(loaded, candidates: int) -> dict:
    """What a loaded model is and costs, with a generated request of ``candidates``
    candidates scored by the reference model (ValueError when a score is not finite)."""
    import numpy as np

    from recserve.engine.costs import forward_flops, rows_read_bytes
    from recserve.engine.demo import random_inputs
    from recserve.engine.inputs import collate
    from recserve.engine.reference import ReferenceModel

    model, spec, weights = loaded.name, loaded.spec, loaded.weights

    def size(prefix_match) -> int:
        return sum(t.numel() * t.element_size() for k, t in weights.items() if prefix_match(k))

    request = random_inputs(spec, np.random.default_rng(0), candidates)
    start = time.perf_counter()
    scores = ReferenceModel(spec, weights).forward(collate(spec, [request]))
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


def compare_versions(mine, theirs, candidates: int, requests: int = 8) -> dict:
    """Score ``requests`` generated requests of ``candidates`` candidates with two loaded
    versions of a model (whose inputs must match) and say how far each output moved: the
    largest and mean score change, and per request the rank correlation of the candidates'
    scores and how many of the top 10 stayed in the top 10 (what a ranking service shows)."""
    import numpy as np

    from recserve.engine.demo import random_inputs
    from recserve.engine.inputs import SparseInput, collate
    from recserve.engine.reference import ReferenceModel

    differ = _input_difference(mine.spec, theirs.spec)
    if differ:
        raise ValueError(f"{mine.name} versions {mine.version} and {theirs.version} take "
                         f"different inputs ({differ}): the same request cannot score on both")
    their_tables = {f.name: theirs.spec.table(f.table) for f in theirs.spec.sparse}
    ours, others = ReferenceModel(mine.spec, mine.weights), ReferenceModel(theirs.spec,
                                                                         theirs.weights)
    rng = np.random.default_rng(1)
    diffs, rank_corr, top_shared = [], [], []
    top = min(10, candidates)
    for _ in range(requests):
        request = random_inputs(mine.spec, rng, candidates)
        for f in mine.spec.sparse:  # ids both versions' tables hold
            rows = min(mine.spec.table(f.table).rows, their_tables[f.name].rows)
            bags = request.sparse[f.name]
            request.sparse[f.name] = SparseInput(bags.values % rows, bags.lengths, bags.weights)
        a = ours.forward(collate(mine.spec, [request])).numpy()
        b = others.forward(collate(theirs.spec, [request])).numpy()
        diffs.append(np.abs(a - b))
        for column in range(a.shape[1]):
            rank_corr.append(_rank_correlation(a[:, column], b[:, column]))
            top_shared.append(len(set(np.argsort(-a[:, column])[:top])
                                  & set(np.argsort(-b[:, column])[:top])))
    moved = np.concatenate(diffs)
    return {"against": theirs.version, "requests": requests, "candidates": candidates,
            "max_abs_diff": float(moved.max()), "mean_abs_diff": float(moved.mean()),
            "min_rank_correlation": float(min(rank_corr)),
            "min_top_shared": int(min(top_shared)), "top": top}


def _input_difference(a, b) -> str:
    """How two specs' inputs differ (names, kinds, scopes, dense widths), or ''."""
    def inputs(spec):
        return ({(f.name, "sparse", f.scope) for f in spec.sparse}
                | {(f.name, f"dense {f.dim}", f.scope) for f in spec.dense})
    mine, theirs = inputs(a), inputs(b)
    if mine == theirs:
        return ""
    only = sorted(n for n, *_ in mine ^ theirs)
    return "inputs " + ", ".join(dict.fromkeys(only))


def _rank_correlation(x, y) -> float:
    """Spearman's rank correlation (ties ranked by position: scores are floats)."""
    import numpy as np

    if len(x) < 2:
        return 1.0
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


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
    against = facts.get("against")
    if against:
        lines.append(
            f"  against v{against['against']}     {against['requests']} requests of "
            f"{against['candidates']} candidates: scores moved by up to "
            f"{against['max_abs_diff']:.3g} (mean {against['mean_abs_diff']:.3g}); rank "
            f"correlation at least {against['min_rank_correlation']:.4f}; at least "
            f"{against['min_top_shared']} of the top {against['top']} stayed there")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _run(args: argparse.Namespace) -> int:
    if args.max_diff is not None and args.against is None:
        raise ValueError("--max-diff bounds the change --against measures; give --against too")
    loaded = load_version(args.repo, args.model, args.version)  # (read once: tables are big)
    facts = model_facts(loaded, args.candidates)
    if args.against is not None:
        other = load_version(args.repo, loaded.name, args.against)
        facts["against"] = compare_versions(loaded, other, args.candidates)
    print(json.dumps(facts, indent=2) if args.json else describe(facts))
    if args.max_diff is not None and facts["against"]["max_abs_diff"] > args.max_diff:
        print(f"error: scores moved by {facts['against']['max_abs_diff']:.3g}, more than "
              f"--max-diff {args.max_diff:g}", file=sys.stderr)
        return 1
    return 0
