"""Kernel variants side by side on one card, in one short call (issue 6 performance pass).

    python bench/kernel_variants.py OUTDIR [--sizes 8192 512] [--budget-s 240] [--untuned]

In one process, on the same card and the same ids (``dlrmv2`` tables, uniform, fixed
multi-hot), most important first, each measurement guarded so one failure loses nothing else:
1. the bf16 gather at each B with the gather switches of ``recserve.kernels.embedding_bag``:
   ``first_run`` (the kernel the first H200 run measured: one element per load) and
   ``aligned_prefetch`` (16-byte row loads and stores, ids loaded a step ahead, UNROLL 2
   configs among the candidates: the default); with ``--all-variants`` also ``aligned``
   (no prefetch); each checked against an fp32 torch reference on the card, and timed
   eager (``us``: the host's launch path included, which dominates at small B) and, for
   the default, as 20 calls replayed in one CUDA graph (``graph_us``: the device alone);
2. int8 row-wise tables vs bf16 (default variant): time, lookup-rate ratio, and a check;
3. ``dlrmv2`` and ``dlrm-dot`` forward replayed in a CUDA graph (defaults), scores checked
   against the PyTorch eager peer, with the device time per kernel from the profiler
   (``dlrmv2`` at the smallest batch also fed as the engine feeds it: fp32 dense inputs,
   flags zeroed by the copy-in, so without the cast and the fill kernels);
   with ``--sections forward,fused_dot``, ``dlrm-dot`` again with the dot interaction
   formed inside the gather's launch (``TritonModel.set_fused_dot``, ``kernels.gather_dot``;
   it lost on the H200 of the nineteenth session: 385 us against 320 at B=8192); with
   ``fused_bottom``, ``dlrmv2`` with the bottom MLP in one launch
   (``TritonModel.set_fused_bottom``, ``kernels.mlp``; not yet run on a card; dlrm-dot's
   bottom MLP is the same); then
   both again with programmatic dependent launch (``RECSERVE_PDL=1``: each kernel launches
   while the one before finishes; aimed at B=512, about 15 short kernels), ``dlrmv2`` with
   its bottom MLP on a side stream beside the gather
   (``TritonModel.set_bottom_beside_gather``), and last with the ``first_run`` gather.
Then the configs the tuners chose. Writes OUTDIR/kernel_variants.json after every record,
prints a table; exit status 1 when any correctness check failed (they print FAIL loudly).
``--untuned`` sets RECSERVE_AUTOTUNE=0 (first config of each kernel: far fewer compiles).
``--sections forward`` skips the gather and int8 sections (a short follow-up call);
``--trial-configs`` also tunes the trial candidates (``RECSERVE_TRIAL_CONFIGS=1``: the cross
layers' 16-warps-an-SM, small-M and persistent configs, split-K with 128x128 tiles, the L2
hint for small tables, and the gather's UNROLL 4, each of which lost on the H200; the cross
layers' staggered configs, tuned there once, their picks not recorded;
deeper pipelines for long-K layers with few rows, which lost on the H200 too; see
``kernels._common.trial_configs``).
``--sections row_size`` times the gather at embedding dims 32-256, bf16 and int8 (rows a
second against bytes a row, and the sectors, bursts and lines a lookup touches:
``bench_row_sizes``, ``row_units``);
``--sections forward,graph_tuned`` ends with both forwards tuned again by device time in a
CUDA graph (``RECSERVE_TUNE_BY=graph``) instead of eager launches (with ``int8``, the
gathers too), and ``auto_tuned`` (before it) with ``RECSERVE_TUNE_BY=auto``: in a graph
only where a key's eager timing is mostly the launch's (``retuned``; the smallest batch
first; plain layers with few rows and a long K also try cuBLAS there);
``--sections configs`` checks every gather config against the reference
eagerly, after a graph timing and replayed from a graph (``check_configs``). A failed
gather check prints a diagnosis (``gather_diagnosis``).
Cost on a cold card: tuning compiles ~18 gather and ~50 GEMM configs (1-2 s each), so
expect about 2-3 minutes tuned, under a minute with ``--untuned``; measurements stop
starting after ``--budget-s``, and the JSON holds everything measured until then.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floors  # noqa: E402
import kernel_profile as kp  # noqa: E402
import workloads as wl  # noqa: E402
from gather_diagnosis import beyond_bf16, diagnose  # noqa: E402
from row_units import row_units  # noqa: E402
from variants_report import summary  # noqa: E402

import kernels as kb  # noqa: E402  (bench/kernels.py: Recorder, timed_us, env_info)
from recserve.engine.weights import (
    init_weights,  # noqa: E402
    quantize_rowwise,  # noqa: E402
)
from recserve.kernels import embedding_bag as eb  # noqa: E402
from recserve.kernels import interaction as it  # noqa: E402
from recserve.kernels import linear as li  # noqa: E402
from recserve.kernels._common import PDL_ENV, TRIAL_ENV, TUNE_BY_ENV, forget_tuning  # noqa: E402
from recserve.kernels.model import TritonModel, capture_graph  # noqa: E402
from recserve.kernels.tables import PackedTables, quantized_row_bytes  # noqa: E402

# (ALIGN_HINTS, PREFETCH), in the order measured (the least telling one last)
VARIANTS = {"first_run": (False, False), "aligned_prefetch": (True, True),
            "aligned": (True, False)}
DEFAULT = "aligned_prefetch"
SECTIONS = ("gather", "int8", "forward", "row_size", "graph_tuned", "auto_tuned", "configs",
            "floors", "fused_dot", "fused_bottom")
FAILURES: list[str] = []


def set_variant(name: str) -> None:
    eb.ALIGN_HINTS, eb.PREFETCH = VARIANTS[name]


def reference_pooled(tables: list, feats, inputs: dict, b: int,
                     qparams: list | None = None) -> list:
    """fp32 pooled [B, dim] per feature (fixed multi-hot bags), dequantizing int8 rows;
    ``tables`` and ``qparams`` by table index, inputs by feature."""
    out = []
    for k, f in enumerate(feats):
        t = tables[f.table]
        idx = inputs["values"][k].view(b, -1)
        rows = t[idx].float()
        if qparams is not None:
            scale, shift = qparams[f.table]
            rows = rows * scale[idx][..., None] + shift[idx][..., None]
        out.append(rows.sum(1))
    return out


def check_pooled(rec, what: str, e: torch.Tensor, feats, want: list, bad: torch.Tensor) -> dict:
    """Every feature's slice of ``e`` within bf16 rounding of the fp32 reference."""
    worst = 0.0
    for f, ref in zip(feats, want, strict=True):
        got = e[:, f.out_col:f.out_col + ref.shape[1]].float()
        excess = ((got - ref).abs() - (ref.abs() * 2**-7 + 1e-3)).max().item()
        worst = max(worst, (got - ref).abs().max().item())
        if not excess <= 0:  # NaN-safe: a NaN fails
            wrong = beyond_bf16(got, ref)
            rows = wrong.any(1).nonzero().flatten()
            r, c = int(rows[0]), int(wrong[rows[0]].nonzero()[0])
            FAILURES.append(f"{what}: feature at column {f.out_col} off by {excess:+.4g} "
                            f"beyond bf16 rounding ({int(wrong.sum())} values in "
                            f"{rows.numel()} rows, rows {rows[:4].tolist()}...; row {r} "
                            f"column {c}: {got[r, c].item():.5g}, want {ref[r, c].item():.5g})")
    if int(bad.sum()) != 0:
        FAILURES.append(f"{what}: {int(bad.sum())} requests flagged bad (all ids are valid)")
    ok = not any(x.startswith(what + ":") for x in FAILURES)
    if not ok:
        print(f"!!!!! FAIL {what}: {[x for x in FAILURES if x.startswith(what)]}", flush=True)
    return {"ok": ok, "max_abs_err": round(worst, 5)}


def new_configs(tuner, before: set) -> list:
    """The configs the tuner chose for keys it tuned since ``before``, each with every
    candidate's tuning time (median ms, fastest first, timed as ``tune_by`` says; those
    whose registers spilled after the rest) and which of them spilled."""
    return [{"key": str(k)[:160], "config": v,
             "timings_ms": [[round(ms, 4), c] for ms, c in tuner.timings.get(k, [])],
             "spilled": tuner.spilled.get(k, [])}
            for k, v in tuner.best.items() if k not in before]


def gather_once(packed, feats, p, e: torch.Tensor):
    indices, offsets, _, weights = p.groups[0]  # CSR (no ends)

    def run() -> torch.Tensor:
        return eb.embedding_bag(packed, feats, indices, offsets, e, weights=weights,
                                row_request=p.row_request, request_offsets=p.request_offsets)

    return run


def bench_gather(rec, base: dict, model: TritonModel, spec, b: int, label: str,
                 packed=None, qparams=None, tables=None, variants=tuple(VARIANTS)) -> dict:
    """Time (and check) the gather of ``packed`` (default: the model's bf16 tables)."""
    sets = [wl.fixed_hot_inputs(spec, b, False, kb.DEV, seed=s) for s in range(kb.SETS)]
    prepared = [wl.to_prepared(model, s) for s in sets]
    packed = packed or model.groups[0][0]
    feats = model.groups[0][1]
    tables = tables or [model_table(model, t) for t in range(len(packed.rows))]
    want = reference_pooled(tables, feats, sets[0], b, qparams)
    e = torch.empty(b, model.layout.e_width, device=kb.DEV, dtype=model.dtype)
    times = {}
    for variant in variants:
        what = f"gather {label} B={b} {variant}"

        def one(variant=variant, what=what) -> None:
            set_variant(variant)
            before = set(eb._tuner.best)
            e.fill_(float("nan"))
            bad = gather_once(packed, feats, prepared[0], e)()  # compiles and tunes
            check = check_pooled(rec, what, e, feats, want, bad)
            if not check["ok"] and kb.DEV == "cuda":  # which input, or the output itself?
                check["diagnosis"] = diagnose(
                    e, feats, want, sets[0]["values"], *prepared[0].groups[0][:2], packed,
                    tables, qparams, gather_once(packed, feats, prepared[0], e), b,
                    (lambda t: quantize_rowwise(model_table(model, t))) if qparams else None)
                FAILURES.append(f"{what}: diagnosis: {check['diagnosis']}")
                print(f"!!!!! {FAILURES[-1]}", flush=True)
            us = kb.timed_us([gather_once(packed, feats, p, e) for p in prepared])
            in_graph = None  # device time alone: 20 gathers replayed in one graph
            if kb.DEV == "cuda":
                in_graph = round(kp.graph_us(gather_once(packed, feats, prepared[0], e)), 2)
            gbps = wl.gather_bytes(spec, b) / (in_graph or us) / 1e3
            times[variant] = in_graph or us
            rec.add(section="gather", tables=label, B=b, variant=variant, us=round(us, 2),
                    graph_us=in_graph, GBps=round(gbps, 1),
                    frac_copy=round(gbps / base["copy_GBps"], 3),
                    configs=new_configs(eb._tuner, before), **check)

        rec.guarded(what, one)
    set_variant(DEFAULT)
    return times


def model_table(model: TritonModel, t: int) -> torch.Tensor:
    """Table t of the model's (only) table group as a [rows, dim] view of the packed buffer."""
    packed = model.groups[0][0]
    n = packed.rows[t] * packed.dims[t]
    return packed.data[packed.elem_base[t]:packed.elem_base[t] + n].view(packed.rows[t], -1)


def quantized(model: TritonModel) -> tuple[PackedTables, list, list]:
    """The model's tables quantized row-wise (uint8 codes + scale/offset): packed for the
    gather, and the codes and (scale, offset) pairs for the reference."""
    codes, qparams = [], []
    for t in range(len(model.groups[0][0].rows)):
        c, s, o = quantize_rowwise(model_table(model, t))
        codes.append(c)
        qparams.append((s, o))
    return PackedTables(codes, [q[0] for q in qparams], [q[1] for q in qparams]), codes, qparams


def bench_int8(rec, base: dict, model: TritonModel, spec, sizes: list[int],
               tuned_by: str = "eager") -> None:
    """Gather of the same tables quantized row-wise (uint8 + scale/offset) vs bf16, each
    tuned by ``tuned_by`` (the label says which when it is not the default)."""
    packed8, codes, qparams = quantized(model)
    suffix = "" if tuned_by == "eager" else f" {tuned_by}-tuned"
    for b in sizes:
        bf16 = bench_gather(rec, base, model, spec, b, "bf16" + suffix, variants=(DEFAULT,))
        int8 = bench_gather(rec, base, model, spec, b, "int8" + suffix, packed=packed8,
                            qparams=qparams, tables=codes, variants=(DEFAULT,))
        if DEFAULT in bf16 and DEFAULT in int8:
            rec.add(section="int8_speedup", B=b, tuned_by=tuned_by,
                    lookup_rate_ratio=round(bf16[DEFAULT] / int8[DEFAULT], 3), target=1.6)
    del packed8, codes, qparams


def bench_row_sizes(rec, base: dict, max_rows: int, b: int,
                    dims: tuple[int, ...] = (32, 64, 128, 256)) -> None:
    """The same gather (dlrmv2's 26 tables and bag sizes, uniform ids, ``max_rows`` rows a
    table) at each embedding dim, bf16 and int8: rows looked up per second against the
    bytes a row takes. If the rate stays flat while rows grow, a lookup costs per row (a
    DRAM access, latency, instructions), not per byte, and int8's half-size rows cannot
    reach issue 6's 1.6x the bf16 rate by their bytes alone; if it falls with the bytes,
    they can, and the int8 kernel is what holds them back. Each record also says what a
    lookup touches in 32-byte sectors, 64-byte bursts and 128-byte lines (``row_units``):
    the unit whose count follows the measured times is what a lookup costs (at dim 128,
    int8 / bf16 would run 1.6x by sectors, 1.33x by bursts, 1.0x by lines)."""
    import dataclasses

    base_spec = wl.dlrmv2_spec(max_rows, "bf16" if kb.DEV == "cuda" else "fp32")
    lookups = b * sum(f.max_bag for f in base_spec.sparse)
    for dim in dims:
        spec = dataclasses.replace(base_spec, name=f"dlrmv2-dim{dim}", tables=tuple(
            dataclasses.replace(t, dim=dim) for t in base_spec.tables))
        model = TritonModel(spec, init_weights(spec, 0, device=kb.DEV), device=kb.DEV)
        times = bench_gather(rec, base, model, spec, b, f"bf16 dim {dim}", variants=(DEFAULT,))
        packed8, codes, qparams = quantized(model)
        int8 = bench_gather(rec, base, model, spec, b, f"int8 dim {dim}", packed=packed8,
                            qparams=qparams, tables=codes, variants=(DEFAULT,))
        for dtype, t_us, row_bytes in (("bf16", times.get(DEFAULT), dim * 2),
                                       ("int8", int8.get(DEFAULT), quantized_row_bytes(dim))):
            if t_us:  # (with what a lookup touches, by each cost model's unit: row_units)
                rec.add(section="row_size", B=b, dim=dim, dtype=dtype, row_bytes=row_bytes,
                        us=t_us, M_rows_per_s=round(lookups / t_us, 1),
                        GBps=round(lookups * row_bytes / t_us / 1e3, 1),
                        **row_units(dtype, dim))
        del model, packed8, codes, qparams
        if kb.DEV == "cuda":
            torch.cuda.empty_cache()


def bench_floors(rec, base: dict, model: TritonModel, spec, sizes: list[int],
                 all_sizes: list[int]) -> None:
    """At each of ``sizes``: the bf16 gather against the same rows read by the simplest
    reader (``floors.rows_floor``), and DCNv2's first V layer against its parts and floors
    (``floors.cross_parts``); at each of ``all_sizes`` the forward's kernels but the gather
    with their floors at this run's rates (``floors.forward_floors``); see bench/floors.py."""
    packed, feats, names = model.groups[0]
    by_name = {f.name: k for k, f in enumerate(spec.sparse)}
    time_us = kp.graph_us if kb.DEV == "cuda" else (lambda fn: kb.timed_us([fn]))
    for b in all_sizes:  # arithmetic only: every size
        rec.add(section="forward_floors", workload="dlrmv2",
                **floors.forward_floors(model, b, base))
    for b in sizes:
        gather_us = bench_gather(rec, base, model, spec, b, "bf16", variants=(DEFAULT,))
        values = wl.fixed_hot_inputs(spec, b, False, kb.DEV, seed=0)["values"]  # as timed
        rows = floors.gathered_rows(packed, feats, [values[by_name[n]] for n in names])
        got = floors.rows_floor(packed, rows, time_us)
        ours = gather_us.get(DEFAULT)
        rec.add(section="rows_floor", B=b, rows=len(rows), gather_us=ours, **got,
                gather_over_floor=round(ours / got["us"], 3) if ours and got["us"] else None)
        before = set(li._tuner.best)  # (so the record names the kind of V's winner too)
        rec.guarded(f"cross parts B={b}", lambda b=b, before=before: rec.add(
            section="cross_parts", **floors.cross_parts(model, b, base, time_us),
            linear_configs=new_configs(li._tuner, before)))


def restore_env(name: str, value: str | None) -> None:
    """Set ``name`` back to ``value`` (None: unset)."""
    os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value


def check_configs(rec, base: dict, model: TritonModel, spec, sizes: list[int],
                  rounds: int = 3) -> None:
    """Every gather candidate config, bf16 and int8 tables, checked against the fp32
    reference at this shape: launched eagerly, again after a CUDA-graph timing of it
    (``do_bench_cudagraph``, what ``RECSERVE_TUNE_BY=graph`` runs), and replayed from a
    captured graph; then the whole tuner ``rounds`` times by each method. A config that
    passes eagerly and fails in one of the others points at the graph path, not the
    kernel's arithmetic."""
    import triton  # here: importing it first thing would precede the interpreter switch

    packed8, codes, qparams = quantized(model)
    bf16_tables = [model_table(model, t) for t in range(len(model.groups[0][0].rows))]
    feats = model.groups[0][1]
    saved = (list(eb.CONFIGS), eb.ALIGN_HINTS, eb.PREFETCH, os.environ.get("RECSERVE_AUTOTUNE"))
    tune_by = os.environ.get(TUNE_BY_ENV)
    for b in sizes:
        inputs = wl.fixed_hot_inputs(spec, b, False, kb.DEV, seed=0)
        p = wl.to_prepared(model, inputs)
        e = torch.empty(b, model.layout.e_width, device=kb.DEV, dtype=model.dtype)
        for label, packed, tables, qp in (("bf16", model.groups[0][0], bf16_tables, None),
                                          ("int8", packed8, codes, qparams)):
            want = reference_pooled(tables, feats, inputs, b, qp)
            run = gather_once(packed, feats, p, e)

            def checked(what: str, go, e=e, want=want) -> bool:
                e.fill_(float("nan"))
                bad = go()
                if kb.DEV == "cuda":
                    torch.cuda.synchronize()
                n = len(FAILURES)
                check_pooled(rec, what, e, feats, want, bad if bad is not None else
                             torch.zeros(1, device=e.device))
                return len(FAILURES) == n

            os.environ["RECSERVE_AUTOTUNE"] = "0"  # the one config set below, untuned
            candidates = [dict(c) for c in saved[0]] + [None]  # None: the proven fallback
            for cfg in candidates:
                eb.CONFIGS[:] = [cfg or saved[0][0]]
                eb.ALIGN_HINTS, eb.PREFETCH = (False, False) if cfg is None else saved[1:3]
                forget_tuning()
                name = f"config {label} B={b} {cfg or 'fallback'}"
                row = {"eager": checked(name + " eager", run)}
                if kb.DEV == "cuda":  # (the CPU run checks the section's own code)
                    triton.testing.do_bench_cudagraph(run, rep=10, return_mode="median")
                    row["after_graph_timing"] = checked(name + " after graph timing", run)
                    graph, _ = capture_graph(run)
                    row["replayed"] = checked(name + " replayed", lambda g=graph: g.replay())
                    del graph
                rec.add(section="config_check", tables=label, B=b, config=cfg or "fallback",
                        **row)
            eb.CONFIGS[:], (eb.ALIGN_HINTS, eb.PREFETCH) = saved[0], saved[1:3]
            restore_env("RECSERVE_AUTOTUNE", saved[3])
            for method in ("eager", "graph"):
                os.environ[TUNE_BY_ENV] = method
                for r in range(rounds):
                    forget_tuning()
                    ok = checked(f"tuned {label} B={b} by {method} round {r}", run)
                    rec.add(section="config_check", tables=label, B=b, tuned_by=method,
                            round=r, ok=ok,  # (the one key tuned since forget_tuning)
                            config=next(iter(eb._tuner.best.values()), None))
            restore_env(TUNE_BY_ENV, tune_by)


def bench_forward(rec, base: dict, name: str, spec, weights: dict, model: TritonModel,
                  b: int, variants: tuple[str, ...], engine_inputs: bool = False) -> None:
    """Forward in a CUDA graph (eager on cpu), scores checked against the eager peer.
    ``engine_inputs``: fed as the engine's staging feeds it, dense inputs in fp32 (the
    first bottom layer rounds them as it loads) and bad-id flags zeroed beforehand (the
    engine's copy-in zeroes them; none is set here, so they stay zero between replays):
    neither the cast nor the flags' fill is a kernel of the forward then."""
    sets = [wl.fixed_hot_inputs(spec, b, False, kb.DEV, seed=s) for s in range(kb.SETS)]
    prepared = [wl.to_prepared(model, s) for s in sets]
    if engine_inputs:
        prepared = [dataclasses.replace(p, dense=s["dense"].float(), bad_flags=torch.zeros(
            p.num_requests, dtype=torch.int32, device=kb.DEV))
            for p, s in zip(prepared, sets, strict=True)]
    peer = wl.TorchPeer(spec, weights, model.dtype)
    for variant in variants:
        what = f"forward {name} B={b} {variant}"

        def one(variant=variant, what=what) -> None:
            set_variant(variant)
            before = set(li._tuner.best)
            dot_before = set(it._tuner.best)
            fused_before = set(eb._dot_tuner.best)
            ours, bad = model.forward_prepared(prepared[0])
            theirs = peer.forward(sets[0]["dense"], sets[0]["values"], sets[0]["offsets"])
            diff = (ours.float() - theirs.float()).abs().max().item()
            ok = diff <= 0.03 and int(bad.sum()) == 0
            if not ok:
                FAILURES.append(f"{what}: max |scores - eager| {diff:.4g}, bad {int(bad.sum())}")
                print(f"!!!!! FAIL {FAILURES[-1]}", flush=True)
            if kb.DEV == "cuda":
                graphs = [capture_graph(model.forward_prepared, p)[0] for p in prepared]
                us = kb.timed_us([g.replay for g in graphs])
                del graphs
            else:
                us = kb.timed_us([(lambda p=p: model.forward_prepared(p)) for p in prepared])
            tflops = wl.model_flops(spec, b) / us / 1e6
            kernels = None
            if kb.DEV == "cuda" and variant == DEFAULT:
                try:  # a profiler failure must not lose the timing above
                    kernels = kp.kernel_breakdown(lambda: model.forward_prepared(prepared[0]))
                except Exception as exc:  # noqa: BLE001
                    kernels = f"profiler failed: {type(exc).__name__}: {exc}"[:300]
            rec.add(section="forward", workload=name, B=b, variant=variant,
                    graph=kb.DEV == "cuda", us=round(us, 2), samples_per_s=round(b / us * 1e6),
                    TFLOPs=round(tflops, 2), frac_matmul=round(tflops / base["matmul_tflops"], 4),
                    max_diff_vs_eager=round(diff, 5), ok=ok, kernels=kernels,
                    linear_configs=new_configs(li._tuner, before),
                    interaction_configs=new_configs(it._tuner, dot_before),
                    gather_dot_configs=new_configs(eb._dot_tuner, fused_before))

        rec.guarded(what, one)
    set_variant(DEFAULT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 512])
    ap.add_argument("--max-rows", type=int, default=4_000_000)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop starting new measurements after this many seconds")
    ap.add_argument("--untuned", action="store_true", help="RECSERVE_AUTOTUNE=0")
    ap.add_argument("--all-variants", action="store_true",
                    help="also the 'aligned' gather (without the id prefetch)")
    ap.add_argument("--trial-configs", action="store_true",
                    help="also tune the trial candidates, which serving leaves out "
                    "(RECSERVE_TRIAL_CONFIGS=1: persistent, 16-warps-an-SM and small-M cross "
                    "configs, 128x128 split-K, the L2 hint, unroll 4 gathers, each of which "
                    "lost on the H200; staggered cross configs, tuned "
                    "there once, their picks not yet recorded; deep pipelines for long-K "
                    "layers with few rows, which lost there too)")
    ap.add_argument("--sections", default="gather,int8,forward",
                    help="what to measure, comma-separated: gather, int8, forward (default: "
                    "these three; 'forward' alone suits a short follow-up call), row_size "
                    "(the gather at embedding dims 32-256, bf16 and int8, at the first of "
                    "--sizes and --row-size-rows rows a table: is a lookup's cost per row "
                    "or per byte?), graph_tuned (with forward: right after the default "
                    "forwards, both again with every kernel tuned anew by its time in a "
                    "CUDA graph, RECSERVE_TUNE_BY=graph, and with int8 the bf16 and int8 "
                    "gathers so too; the older forward extras are then left out), auto_tuned "
                    "(the same with RECSERVE_TUNE_BY=auto, before graph_tuned: a key's "
                    "candidates timed in a graph where its eager timing is mostly the "
                    "launch's, else eagerly; not yet run on a card), configs "
                    "(every gather config, bf16 and int8, checked against the reference "
                    "eagerly, after a CUDA-graph timing and replayed from a graph, then the "
                    "tuner's pick by each method, three rounds), floors (before the "
                    "forwards, at the first of --sizes: the gather against the same rows "
                    "read by the simplest reader, DCNv2's V layer against its plain GEMM, "
                    "its epilogue apart and this run's arithmetic and byte floors; "
                    "bench/floors.py), fused_dot (with forward: dlrm-dot again with its dot "
                    "interaction formed inside the gather's launch, RECSERVE_FUSED_DOT; it "
                    "lost on the H200: 385 us against 320 at B=8192), fused_bottom (with forward: "
                    "dlrmv2 again with the bottom MLP in one launch, "
                    "RECSERVE_FUSED_BOTTOM; not yet run on a card)")
    ap.add_argument("--row-size-rows", type=int, default=1_000_000,
                    help="rows per table in the row_size section (dim 256 bf16: 26 tables "
                    "of 512-byte rows, 13 GB at 1M)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run under the interpreter (use tiny --sizes, --max-rows)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"--sections {args.sections!r}: expected some of {', '.join(SECTIONS)}")
    if args.trial_configs:
        os.environ[TRIAL_ENV] = "1"
    if args.untuned:
        os.environ["RECSERVE_AUTOTUNE"] = "0"
    kb.DEV = args.device
    if kb.DEV == "cpu":
        kb.SETS = 1
    rec = kb.Recorder(args.outdir, args.budget_s)
    rec.path = args.outdir / "kernel_variants.json"
    rec.add(section="env", **kb.env_info(), sizes=args.sizes, max_rows=args.max_rows,
            untuned=args.untuned)
    base = kb.baselines(rec)
    spec = wl.dlrmv2_spec(args.max_rows, "bf16" if kb.DEV == "cuda" else "fp32", "dcnv2")
    weights = init_weights(spec, 0, device=kb.DEV)
    model = TritonModel(spec, weights, device=kb.DEV)
    variants = tuple(VARIANTS) if args.all_variants else ("first_run", DEFAULT)
    for b in args.sizes if "gather" in sections else []:
        bench_gather(rec, base, model, spec, b, "bf16", variants=variants)
    if "int8" in sections:
        rec.guarded("int8", bench_int8, rec, base, model, spec, args.sizes)
    if "configs" in sections:
        rec.guarded("config check", check_configs, rec, base, model, spec, args.sizes)
    if "row_size" in sections:
        rec.guarded("row sizes", bench_row_sizes, rec, base, args.row_size_rows, args.sizes[0])
    if "floors" in sections:
        rec.guarded("floors", bench_floors, rec, base, model, spec, args.sizes[:1], args.sizes)
    if "forward" not in sections:
        return finish(rec)
    for b in args.sizes:
        bench_forward(rec, base, "dlrmv2", spec, weights, model, b, (DEFAULT,))
    # What the engine's graphs run: two small kernels fewer, which only the smallest batch
    # can tell (each is ~1 us with its gap); its first layer with fp32 inputs tunes anew.
    bench_forward(rec, base, "dlrmv2 engine inputs", spec, weights, model, min(args.sizes),
                  (DEFAULT,), engine_inputs=True)
    dot = wl.dlrmv2_spec(args.max_rows, spec.tables[0].dtype, "dot")
    dot_w = init_weights(dot, 1, device=kb.DEV, tables={
        k: v for k, v in weights.items() if k.startswith("tables.")})
    dot_model = rec.guarded("dlrm-dot model", TritonModel, dot, dot_w, device=kb.DEV)
    if dot_model is not None:
        dot_model.set_fused_dot(False)  # (plain first, whatever RECSERVE_FUSED_DOT says)
    for b in args.sizes if dot_model is not None else []:
        bench_forward(rec, base, "dlrm-dot", dot, dot_w, dot_model, b, (DEFAULT,))
    if "fused_dot" in sections and dot_model is not None and dot_model.set_fused_dot(True):
        for b in args.sizes:
            bench_forward(rec, base, "dlrm-dot fused gather+dot", dot, dot_w, dot_model, b,
                          (DEFAULT,))
        dot_model.set_fused_dot(False)
    # (dlrmv2 only: dlrm-dot's bottom MLP is the same 13-512-256-128, the same kernels)
    if "fused_bottom" in sections and model.set_fused_bottom(True):  # (kernels.mlp)
        for b in args.sizes:
            bench_forward(rec, base, "dlrmv2 bottom in one launch", spec, weights, model, b,
                          (DEFAULT,))
        model.set_fused_bottom(False)
    retunes = [m for m in ("auto", "graph") if f"{m}_tuned" in sections]
    for method in retunes:  # before the older extras, so the time budget reaches them
        retuned(rec, base, spec, weights, model, dot, dot_w, dot_model, args.sizes,
                "int8" in sections, method)
    if retunes:
        print("(graph_tuned, auto_tuned: PDL, the bottom MLP beside the gather and the "
              "first-run gather are left out; the eighth session measured them)", flush=True)
        return finish(rec)
    os.environ[PDL_ENV] = "1"  # programmatic dependent launch: kernels overlap launches
    for b in args.sizes:
        bench_forward(rec, base, "dlrmv2 pdl", spec, weights, model, b, (DEFAULT,))
    for b in args.sizes if dot_model is not None else []:
        bench_forward(rec, base, "dlrm-dot pdl", dot, dot_w, dot_model, b, (DEFAULT,))
    del os.environ[PDL_ENV]
    model.set_bottom_beside_gather(True)
    for b in args.sizes:
        bench_forward(rec, base, "dlrmv2 bottom beside gather", spec, weights, model, b,
                      (DEFAULT,))
    model.set_bottom_beside_gather(False)
    for b in args.sizes:  # (the least telling now: last, where the time budget may cut it)
        bench_forward(rec, base, "dlrmv2", spec, weights, model, b, ("first_run",))
    return finish(rec)


def retuned(rec, base: dict, spec, weights: dict, model: TritonModel, dot, dot_w: dict,
            dot_model: TritonModel | None, sizes: list[int], int8: bool, method: str) -> None:
    """Every kernel tuned anew with RECSERVE_TUNE_BY=``method``: "graph", by its time in a
    CUDA graph, as the engine replays them (at B=512 an eagerly timed candidate may take no
    less than its Python launch, so eager timing cannot rank them there), or "auto", in a
    graph only where the eager timing is the launch's (``kernels._common.LAUNCH_BOUND``):
    both forwards, and (``int8``) the bf16 and int8 gathers, against the eager-tuned
    figures measured before."""
    os.environ[TUNE_BY_ENV] = method
    forget_tuning()
    # (the smallest batch first: where graph timing and cuBLAS may pay, and so reached
    # before a time budget cuts the section)
    sizes = sorted(sizes)
    for b in sizes:
        bench_forward(rec, base, f"dlrmv2 {method}-tuned", spec, weights, model, b,
                      (DEFAULT,))
    for b in sizes if dot_model is not None else []:
        bench_forward(rec, base, f"dlrm-dot {method}-tuned", dot, dot_w, dot_model, b,
                      (DEFAULT,))
    if int8:
        rec.guarded(f"int8 {method}-tuned", bench_int8, rec, base, model, spec, sizes, method)


def finish(rec) -> int:
    """The closing record and table; exit status 1 when a correctness check failed."""
    rec.add(section="done", failures=FAILURES)
    print(summary(rec.records), flush=True)
    if FAILURES:
        print("\n!!!!! CORRECTNESS FAILURES:\n  " + "\n  ".join(FAILURES), flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
