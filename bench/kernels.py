"""Kernel benchmark: recserve's Triton path vs PyTorch peers, side by side on one card.

    python bench/kernels.py OUTDIR [--quick] [--max-rows N] [--sizes 512 8192] [--budget-s S]
                                   [--plot kernels.png]

Workloads ``dlrmv2`` and ``dlrm-dot`` (bench/workloads.py), uniform and Zipf(1.15) ids, per
batch size B: recserve gather (one launch), forward, forward in a CUDA graph; PyTorch
eager gather (26 per-table ``embedding_bag`` calls, and one call over a concatenated
table), eager forward, eager forward in a CUDA graph; torch.compile at a few sizes. The
recserve and per-table gathers are also timed replayed in a CUDA graph (``*_graph``, 20
calls per graph): the device's time alone, since at small B an eager call times the
host's launch path (Python and driver), not the kernels. The forward's graph is timed
again captured with programmatic dependent launch (``recserve_pdl_graph``, RECSERVE_PDL=1:
each kernel launches while the one before it finishes).
Every timing is the median of ``triton.testing.do_bench`` (it flushes L2 between calls)
while rotating over several input sets. Gather GB/s counts table-row bytes read (small
tables sit in L2, so it is an effective rate and may exceed the copy rate); TFLOP/s counts
the model's multiply-adds. Both are also given as fractions of a device copy and a bf16
matmul measured in the same run. Results go to OUTDIR/kernels.json after every record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_profile as kp  # noqa: E402
import kernels_plot  # noqa: E402
import provenance  # noqa: E402
import workloads as wl  # noqa: E402

from recserve.engine.weights import init_weights  # noqa: E402
from recserve.kernels._common import PDL_ENV  # noqa: E402
from recserve.kernels.embedding_bag import embedding_bag  # noqa: E402
from recserve.kernels.model import TritonModel, capture_graph  # noqa: E402

import triton  # noqa: E402  isort: skip

SETS = 3  # input sets rotated through in every timing
DEV = "cuda"  # "cpu" only for the smoke run (--device cpu): interpreter, tiny shapes


class Recorder:
    """Collects result records, rewrites the JSON file after each, prints one line each."""

    def __init__(self, outdir: Path, budget_s: float) -> None:
        outdir.mkdir(parents=True, exist_ok=True)
        self.path = outdir / "kernels.json"
        self.records: list[dict] = []
        self.start = time.time()
        self.budget_s = budget_s

    def add(self, **record) -> dict:
        record["t"] = round(time.time() - self.start, 1)
        self.records.append(record)
        self.path.write_text(json.dumps(self.records, indent=1))
        print(json.dumps(record), flush=True)
        return record

    def out_of_time(self) -> bool:
        return time.time() - self.start > self.budget_s

    def guarded(self, what: str, fn, *args, **kwargs):
        """Run one measurement; a failure is recorded and the run goes on."""
        if self.out_of_time():
            self.add(section="skipped", what=what, reason="time budget")
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one failing peer must not lose the rest
            self.add(section="error", what=what, error=f"{type(exc).__name__}: {exc}"[:500],
                     trace=traceback.format_exc()[-1500:])
            return None


def timed_us(fns: list) -> float:
    """Median microseconds per call, rotating through ``fns`` (one per input set)."""
    state = {"i": 0}

    def run() -> None:
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    for fn in fns:  # a first call may tune or compile for its shape: keep that out
        fn()
    if DEV == "cpu":  # smoke run: one timed call per set, just to exercise the code
        t0 = time.perf_counter()
        for _ in fns:
            run()
        return (time.perf_counter() - t0) / len(fns) * 1e6
    return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median") * 1000.0


def env_info() -> dict:
    props = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    commit = provenance.commit()
    card = {"gpu": props.name, "sms": props.multi_processor_count,
            "mem_gib": round(props.total_memory / 2**30, 1)} if props else {"gpu": "cpu"}
    return {**card, "torch": torch.__version__,
            "triton": triton.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def baselines(rec: Recorder) -> dict:
    """Device copy GB/s (read + write bytes) and bf16 8192^3 matmul TFLOP/s."""
    n = 2**30 if DEV == "cuda" else 2**20
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = timed_us([lambda: dst.copy_(src)])
    copy = rec.add(section="copy", bytes=2 * src.numel(), us=us, GBps=2 * src.numel() / us / 1e3)
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    us = timed_us([lambda: a @ a])
    mm = rec.add(section="matmul", n=n, us=us, tflops=2 * n**3 / us / 1e6)
    return {"copy_GBps": copy["GBps"], "matmul_tflops": mm["tflops"]}


def gather_fn(model: TritonModel, p, e: torch.Tensor):
    """The model's one-launch gather of prepared batch ``p`` into ``e`` (one dtype group)."""
    packed, feats, _ = model.groups[0]
    indices, offsets, _, weights = p.groups[0]  # CSR (no ends)

    def run() -> torch.Tensor:
        return embedding_bag(packed, feats, indices, offsets, e, weights=weights,
                             row_request=p.row_request, request_offsets=p.request_offsets)

    return run


def peer_inputs(sets: list[dict]) -> list[tuple]:
    return [(s["dense"], s["values"], s["offsets"]) for s in sets]


def measure(rec: Recorder, base: dict, ctx: dict, variant: str, fns: list, gather: bool,
            check=None, in_graph: bool = False) -> None:
    """Time ``fns`` (``in_graph``: the first, replayed in a CUDA graph) and record us,
    samples/s and GB/s or TFLOP/s (with fractions)."""
    spec, b = ctx["spec"], ctx["B"]
    us = kp.graph_us(fns[0]) if in_graph else timed_us(fns)
    row = {"section": "gather" if gather else "forward", "workload": ctx["name"],
           "dist": ctx["dist"], "B": b, "variant": variant, "us": round(us, 2),
           "samples_per_s": round(b / us * 1e6)}
    if gather:
        gbps = wl.gather_bytes(spec, b) / us / 1e3
        row.update(GBps=round(gbps, 1), frac_copy=round(gbps / base["copy_GBps"], 3))
    else:
        tflops = wl.model_flops(spec, b) / us / 1e6
        row.update(TFLOPs=round(tflops, 2), frac_matmul=round(tflops / base["matmul_tflops"], 4))
    if check is not None:
        row.update(check())
    rec.add(**row)


def bench_batch(rec: Recorder, base: dict, ctx: dict, model: TritonModel,
                peers: dict) -> None:
    """Every variant at one (workload, dist, B)."""
    spec, b = ctx["spec"], ctx["B"]
    sets = [wl.fixed_hot_inputs(spec, b, ctx["dist"] == "zipf", DEV, seed=s)
            for s in range(SETS)]
    prepared = [wl.to_prepared(model, s) for s in sets]
    e = torch.empty(b, model.layout.e_width, device=DEV, dtype=model.dtype)
    g = rec.guarded
    g("recserve gather", measure, rec, base, ctx, "recserve",
      [gather_fn(model, p, e) for p in prepared], True)
    pin = peer_inputs(sets)
    g("torch gather per table", measure, rec, base, ctx, "torch_per_table",
      [(lambda a=a: peers["per_table"].pooled(a[1], a[2])) for a in pin], True)
    g("torch gather concat", measure, rec, base, ctx, "torch_concat",
      [(lambda a=a: peers["concat"].pooled(a[1], a[2])) for a in pin], True)
    if DEV == "cuda":
        g("recserve gather graph", measure, rec, base, ctx, "recserve_graph",
          [gather_fn(model, prepared[0], e)], True, in_graph=True)
        g("torch gather per table graph", measure, rec, base, ctx, "torch_per_table_graph",
          [lambda: peers["per_table"].pooled(pin[0][1], pin[0][2])], True, in_graph=True)

    def agreement() -> dict:
        ours, bad = model.forward_prepared(prepared[0])
        theirs = peers["per_table"].forward(*pin[0])
        return {"max_diff_vs_eager": float((ours - theirs).abs().max()),
                "bad_rows": int(bad.sum())}

    g("recserve forward", measure, rec, base, ctx, "recserve",
      [(lambda p=p: model.forward_prepared(p)) for p in prepared], False, agreement)
    g("torch eager", measure, rec, base, ctx, "torch_eager",
      [(lambda a=a: peers["per_table"].forward(*a)) for a in pin], False)
    if DEV == "cpu":
        return
    graphs = g("recserve graph capture", lambda: [capture_graph(model.forward_prepared, p)[0]
                                                  for p in prepared])
    if graphs:
        g("recserve graph", measure, rec, base, ctx, "recserve_graph",
          [gr.replay for gr in graphs], False)
    del graphs
    os.environ[PDL_ENV] = "1"  # the same graph with programmatic dependent launch
    try:
        graphs = g("recserve pdl graph capture",
                   lambda: [capture_graph(model.forward_prepared, p)[0] for p in prepared])
    finally:
        del os.environ[PDL_ENV]
    if graphs:
        g("recserve pdl graph", measure, rec, base, ctx, "recserve_pdl_graph",
          [gr.replay for gr in graphs], False)
    del graphs
    tgraphs = g("torch graph capture", lambda: [capture_graph(peers["per_table"].forward, *a)[0]
                                                for a in pin])
    if tgraphs:
        g("torch graph", measure, rec, base, ctx, "torch_eager_graph",
          [gr.replay for gr in tgraphs], False)


def bench_compile(rec: Recorder, base: dict, ctx: dict, compiled) -> None:
    """torch.compile of the eager peer at one size (compiling takes seconds per shape)."""
    sets = peer_inputs([wl.fixed_hot_inputs(ctx["spec"], ctx["B"], False, DEV, seed=s)
                        for s in range(SETS)])
    t0 = time.time()
    for a in sets:
        compiled(*a)
    torch.cuda.synchronize()
    rec.add(section="compile_time", workload=ctx["name"], B=ctx["B"], s=time.time() - t0)
    measure(rec, base, ctx, "torch_compile", [(lambda a=a: compiled(*a)) for a in sets], False)


def bench_int8(rec: Recorder, base: dict, spec, weights: dict, sizes: list[int]) -> None:
    """Gather rate of int8 row-wise tables vs the same tables in bf16, same ids."""
    from recserve.engine.weights import quantize_rowwise

    spec8 = wl.dlrmv2_spec(spec.tables[0].rows, "int8", "dcnv2")
    spec8 = type(spec)(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                          "tables": spec8.tables})
    w8 = {k: v for k, v in weights.items() if not k.startswith("tables.")}
    for t in spec.tables:
        stem = f"tables.{t.name}"
        w8[f"{stem}.weight"], w8[f"{stem}.scale"], w8[f"{stem}.offset"] = \
            quantize_rowwise(weights[f"{stem}.weight"])
    model8, model16 = TritonModel(spec8, w8, DEV), TritonModel(spec, weights, DEV)
    for b in sizes:
        inputs = [wl.fixed_hot_inputs(spec, b, False, DEV, seed=s) for s in range(SETS)]
        rates = {}
        for label, model, sp in (("bf16", model16, spec), ("int8", model8, spec8)):
            e = torch.empty(b, model.layout.e_width, device=DEV, dtype=model.dtype)
            fns = [gather_fn(model, wl.to_prepared(model, i), e) for i in inputs]
            # the device's time: at B=512 an eager call times the host's launch path
            us = kp.graph_us(fns[0]) if DEV == "cuda" else timed_us(fns)
            rates[label] = b * sum(f.max_bag for f in sp.sparse) / us  # lookups per us
            rec.add(section="int8_gather", B=b, tables=label, us=round(us, 2),
                    timing="graph" if DEV == "cuda" else "eager",
                    GBps=round(wl.gather_bytes(sp, b) / us / 1e3, 1))
        rec.add(section="int8_speedup", B=b, lookup_rate_ratio=rates["int8"] / rates["bf16"])
    del model8, w8
    torch.cuda.empty_cache()


def bench_accuracy(rec: Recorder, max_rows: int = 100_000, batch: int = 512) -> None:
    """Scores of bf16 and int8-table TritonModels vs the fp32 ReferenceModel (dlrmv2)."""
    from recserve.engine.inputs import Batch, SparseBatch
    from recserve.engine.reference import ReferenceModel
    from recserve.engine.weights import quantize_rowwise

    spec32 = wl.dlrmv2_spec(max_rows, "fp32", "dcnv2")
    w32 = init_weights(spec32, 5, device=DEV)
    inputs = wl.fixed_hot_inputs(spec32, batch, False, DEV, seed=9)
    rows = torch.arange(batch, device=DEV)
    ref_batch = Batch(batch, batch, rows, {f.name: SparseBatch(v, o, None) for f, v, o in zip(
        spec32.sparse, inputs["values"], inputs["offsets"], strict=True)},
        {"dense": inputs["dense"]})
    want = ReferenceModel(spec32, w32, device=DEV).forward(ref_batch)
    for dtype in ("bf16", "int8"):
        spec = wl.dlrmv2_spec(max_rows, dtype, "dcnv2")
        w = {k: v for k, v in w32.items() if not k.startswith("tables.")}
        for t in spec.tables:
            stem = f"tables.{t.name}"
            if dtype == "int8":
                w[f"{stem}.weight"], w[f"{stem}.scale"], w[f"{stem}.offset"] = \
                    quantize_rowwise(w32[f"{stem}.weight"])
            else:
                w[f"{stem}.weight"] = w32[f"{stem}.weight"].bfloat16()
        model = TritonModel(spec, w, DEV)
        got, bad = model.forward_prepared(wl.to_prepared(model, inputs))
        rec.add(section="accuracy", workload="dlrmv2", tables=dtype, B=batch,
                max_abs_diff_vs_fp32=float((got - want).abs().max()), bad=int(bad.sum()))


def summary(records: list[dict]) -> str:
    """A text table: one line per (workload, dist, B), microseconds per variant."""
    cols = {"recserve_gather": "ours gather", "recserve_graph_gather": "ours g. graph",
            "torch_per_table_gather": "pt/table gath", "torch_per_table_graph_gather":
            "pt/table graph", "torch_concat_gather": "pt concat gat", "recserve_fwd": "ours fwd",
            "recserve_graph_fwd": "ours fwd graph", "recserve_pdl_graph_fwd": "ours fwd pdl",
            "torch_eager_fwd": "pt eager fwd",
            "torch_eager_graph_fwd": "pt fwd graph", "torch_compile_fwd": "pt compile"}
    table: dict[tuple, dict] = {}
    for r in records:
        if r.get("section") in ("gather", "forward"):
            key = (r["workload"], r["dist"], r["B"])
            suffix = "_gather" if r["section"] == "gather" else "_fwd"
            table.setdefault(key, {})[r["variant"] + suffix] = r["us"]
    lines = ["workload  dist     B      " + " ".join(f"{c:>14}" for c in cols.values())]
    for key in sorted(table, key=lambda k: (k[0], k[1], k[2])):
        vals = " ".join(f"{table[key].get(c, float('nan')):14.1f}" for c in cols)
        lines.append(f"{key[0]:9} {key[1]:8} {key[2]:<6} {vals}")
    return "\n".join(lines)


def load_workloads(max_rows: int, table_dtype: str) -> dict[str, tuple]:
    """name -> (spec, weights, TritonModel, peers) for dlrmv2 and dlrm-dot (shared tables)."""
    loaded: dict[str, tuple] = {}
    shared: dict = {}
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    for name, inter in (("dlrmv2", "dcnv2"), ("dlrm-dot", "dot")):
        spec = wl.dlrmv2_spec(max_rows, table_dtype, inter)
        weights = init_weights(spec, 0, device=DEV, tables=shared or None)
        shared = {k: v for k, v in weights.items() if k.startswith("tables.")}
        peers = {"per_table": wl.TorchPeer(spec, weights, dt),
                 "concat": wl.TorchPeer(spec, weights, dt, concat=True)}
        loaded[name] = (spec, weights, TritonModel(spec, weights, device=DEV), peers)
    return loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--quick", action="store_true", help="B in 512, 8192 only; no zipf dot")
    ap.add_argument("--max-rows", type=int, default=4_000_000)
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 512, 2048, 256, 32768])
    ap.add_argument("--compile-sizes", type=int, nargs="*", default=[8192, 512])
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run of this script under the interpreter (tiny shapes)")
    ap.add_argument("--plot", type=Path, default=None, metavar="PNG",
                    help="also draw time against batch size, recserve and its peers, with "
                    "issue 6's targets (bench/kernels_plot.py; needs matplotlib; the same "
                    "figure can be drawn later from kernels.json on any machine)")
    args = ap.parse_args()
    if args.plot is not None:
        kernels_plot.require_matplotlib()  # (before minutes of measuring, not after)
    global DEV
    DEV = args.device
    sizes = [8192, 512] if args.quick else args.sizes
    rec = Recorder(args.outdir, args.budget_s)
    rec.add(section="env", **env_info(), max_rows=args.max_rows, sizes=sizes)
    base = baselines(rec)
    loaded = load_workloads(args.max_rows, "bf16" if DEV == "cuda" else "fp32")
    first = sizes[:2]  # the target sizes come first, so a short budget still covers them
    plan = [(n, "uniform", b) for n in loaded for b in first]
    # then int8, skewed ids at the first size, and the torch.compile peer (seconds per
    # shape to compile): the H100's 60 s budget ended after int8, before either
    zipf_first = [("dlrmv2", "zipf", sizes[0])] if "dlrmv2" in loaded else []
    plan += [("int8", "", 0)] + zipf_first
    plan += [("compile", "uniform", b) for b in args.compile_sizes]
    plan += [("accuracy", "", 0)]
    plan += [(n, "uniform", b) for n in loaded for b in sizes[2:]]
    plan += [(n, "zipf", b) for n in loaded for b in sizes
             if not (args.quick and n == "dlrm-dot") and (n, "zipf", b) not in zipf_first]
    compiled = None
    for name, dist, b in plan:
        if name == "int8":
            spec, weights, _, _ = loaded["dlrmv2"]
            rec.guarded("int8", bench_int8, rec, base, spec, weights,
                        [8192, 512] if DEV == "cuda" else sizes[:1])
        elif name == "accuracy":
            rec.guarded("accuracy", bench_accuracy, rec, min(args.max_rows, 100_000))
        elif name == "compile":
            spec, _, _, peers = loaded["dlrmv2"]
            compiled = compiled or torch.compile(peers["per_table"].forward)
            ctx = {"name": "dlrmv2", "spec": spec, "dist": dist, "B": b}
            rec.guarded(f"compile B={b}", bench_compile, rec, base, ctx, compiled)
        else:
            spec, _, model, peers = loaded[name]
            ctx = {"name": name, "spec": spec, "dist": dist, "B": b}
            rec.guarded(f"{name} {dist} B={b}", bench_batch, rec, base, ctx, model, peers)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    rec.add(section="done")
    print(summary(rec.records), flush=True)
    if args.plot is not None:
        kernels_plot.plot(rec.records, args.plot)
        print(f"wrote {args.plot}", flush=True)


if __name__ == "__main__":
    main()
