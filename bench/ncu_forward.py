"""One tuned forward under Nsight Compute: what each kernel moves, and how busy it keeps the SM.

    ncu --profile-from-start off --clock-control none --csv --print-units base \\
        --log-file ncu.csv --metrics gpu__time_duration.sum,dram__bytes_read.sum,... \\
        --section SpeedOfLight --section Occupancy ... \\
        python bench/ncu_forward.py [--workload dlrmv2] [--batch 8192]
    python bench/ncu_forward.py --summarize ncu.csv [--json ncu.json]

Under ncu (``bench/gpu_check.sh``'s ``ncu`` step runs it so): builds the workload's
``TritonModel`` (bench/workloads.py, uniform ids, every bag full), runs its forward until
every kernel is tuned, then opens the profiler (``cudaProfilerStart``) for exactly one more
forward, so ncu measures the kernels serving runs, not the tuner's trials. Without ncu it
just runs (``--device cpu``: under the interpreter, a smoke test).

``--summarize`` reads ncu's CSV (one row per kernel and metric) and prints per kernel in
launch order: time, DRAM bytes read and written and their rate, L2 bytes and hit rate, SM
and memory throughput as a share of peak, achieved occupancy, registers, and then its
largest stall reasons (``STALL_REASONS``). The question it
answers (bench/notes-kernels.md, twelfth session): DCNv2's V moves ~170 MB and does ~29
GFLOP at B=8192 yet takes 95-109 us; the gather takes 155 us where 120 is the target.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402

from recserve.engine.weights import init_weights  # noqa: E402
from recserve.kernels.model import TritonModel  # noqa: E402

# ncu metric names (exact, all architectures) and section labels (as the sections print
# them), in the summary's column order: (column, names it may appear under, scale). A name
# with a unit in brackets matches only rows of that unit: the sections print "Memory
# Throughput" twice, as % of peak (Speed Of Light) and as byte/s (Memory Workload Analysis).
COLUMNS = (
    ("us", ("gpu__time_duration.sum", "Duration"), 1e-3),  # base unit: nanoseconds
    ("dram_read_MB", ("dram__bytes_read.sum",), 1e-6),
    ("dram_write_MB", ("dram__bytes_write.sum",), 1e-6),
    ("l2_MB", ("lts__t_bytes.sum",), 1e-6),
    ("l2_hit_pct", ("L2 Hit Rate [%]", "lts__t_sector_hit_rate.pct"), 1.0),
    ("sm_pct", ("Compute (SM) Throughput [%]",
                "sm__throughput.avg.pct_of_peak_sustained_elapsed"), 1.0),
    ("mem_pct", ("Memory Throughput [%]",
                 "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"), 1.0),
    ("occupancy_pct", ("Achieved Occupancy [%]",
                       "sm__warps_active.avg.pct_of_peak_sustained_active"), 1.0),
    ("registers", ("Registers Per Thread", "launch__registers_per_thread"), 1.0),
    # register spills: a kernel whose tile spilled (255 registers) pays local memory traffic
    ("spill_requests", ("Local Memory Spilling Requests",), 1.0),
)


# Why a kernel's warps wait (ncu's "Warp State Statistics": warps stalled for each reason
# per issued instruction), asked for by name (gpu_check.sh's ncu step); the summary prints
# each kernel's largest ones. The question they answer: does the gather wait on its chain
# of dependent loads (long_scoreboard: a global load's data), on the memory system taking
# requests (lg_throttle), or on neither (bench/notes-kernels.md, twentieth session)?
STALL_REASONS = ("long_scoreboard", "lg_throttle", "wait", "short_scoreboard", "mio_throttle",
                 "math_pipe_throttle", "barrier", "membar", "not_selected", "no_instruction",
                 "gmma", "drain", "imc_miss", "branch_resolving", "dispatch_stall")
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
TOP_STALLS = 3


def stalls(kernel: dict, top: int = TOP_STALLS) -> list[tuple[str, float]]:
    """A profiled kernel's ``top`` stall reasons with their warps per issued instruction,
    largest first (those ncu gave)."""
    found = [(reason, kernel["metrics"].get(STALL_METRIC.format(reason)))
             for reason in STALL_REASONS]
    return sorted(((r, v) for r, v in found if v is not None), key=lambda rv: -rv[1])[:top]


def _number(text: str) -> float | None:
    """A metric value as ncu prints it ('1,234.5', 'n/a', ''), or None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _dims(text: str | None) -> str:
    """'(32, 27, 1)' as '32x27' (trailing 1s dropped; which tile a GEMM ran, from its grid)."""
    parts = [p.strip() for p in (text or "").strip("()").split(",") if p.strip()]
    while len(parts) > 1 and parts[-1] == "1":
        parts.pop()
    return "x".join(parts) or "-"


def read_ncu_csv(path: Path) -> list[dict]:
    """ncu's CSV (the rows after its header; ncu's own messages before it are skipped) as
    one dict per profiled kernel, in launch order: id, kernel, and every metric by name and
    by "name [unit]"."""
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines)
                  if "Kernel Name" in line and "Metric Name" in line), None)
    if start is None:
        raise ValueError(f"{path}: no ncu CSV header (a 'Kernel Name' and 'Metric Name' row); "
                         "did ncu run with --csv, and did it profile anything?")
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(lines[start:]):
        key = row.get("ID")
        if key is None or row.get("Metric Name") is None:
            continue  # (a message line after the table)
        kernel = kernels.setdefault(key, {"id": int(key), "kernel": row["Kernel Name"],
                                          "grid": _dims(row.get("Grid Size")),
                                          "block": _dims(row.get("Block Size")),
                                          "metrics": {}})
        value = _number(row.get("Metric Value", ""))
        kernel["metrics"][row["Metric Name"]] = value
        kernel["metrics"][f"{row['Metric Name']} [{row.get('Metric Unit', '')}]"] = value
    return sorted(kernels.values(), key=lambda k: k["id"])


def summarize(kernels: list[dict]) -> list[dict]:
    """Per kernel the ``COLUMNS`` found (None where ncu gave none) and DRAM GB/s."""
    out = []
    for k in kernels:
        row = {"id": k["id"], "kernel": k["kernel"], "grid": k.get("grid", "-"),
               "block": k.get("block", "-")}
        for column, names, scale in COLUMNS:
            value = next((k["metrics"][n] for n in names if k["metrics"].get(n) is not None),
                         None)
            row[column] = None if value is None else value * scale
        parts = [row["dram_read_MB"], row["dram_write_MB"]]
        moved = sum(p for p in parts if p is not None)
        row["dram_GBps"] = (moved / row["us"] * 1e3  # (MB per us: TB/s)
                            if row["us"] and parts != [None, None] else None)
        row["stalls"] = stalls(k)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    cols = ["us", "dram_read_MB", "dram_write_MB", "dram_GBps", "l2_MB", "l2_hit_pct",
            "sm_pct", "mem_pct", "occupancy_pct", "registers", "spill_requests"]
    lines = [f"{'kernel':32} {'grid':>9} {'block':>5} " + " ".join(f"{c:>13}" for c in cols)]
    for r in rows:
        cells = " ".join(f"{r[c]:13.1f}" if r[c] is not None else f"{'-':>13}" for c in cols)
        lines.append(f"{r['kernel'][:32]:32} {r.get('grid', '-'):>9} {r.get('block', '-'):>5} "
                     f"{cells}")
    total = sum(r["us"] or 0.0 for r in rows)
    lines.append(f"{len(rows)} kernels, {total:.1f} us in all (each timed alone by ncu: "
                 "no overlap, caches flushed between kernels unless --cache-control none)")
    if any(r.get("stalls") for r in rows):
        lines.append("where warps wait (warps stalled per issued instruction, largest first):")
        for r in rows:
            said = ", ".join(f"{reason} {value:.1f}" for reason, value in r.get("stalls", []))
            lines.append(f"  {r['kernel'][:32]:32} {said or '-'}")
    return "\n".join(lines)


def profile_one_forward(workload: str, batch: int, max_rows: int, warmups: int,
                        device: str) -> None:
    """Tune, then exactly one forward between cudaProfilerStart and Stop."""
    interaction = {"dlrmv2": "dcnv2", "dlrm-dot": "dot"}[workload]
    table_dtype = "bf16" if device == "cuda" else "fp32"
    spec = wl.dlrmv2_spec(max_rows, table_dtype, interaction)
    model = TritonModel(spec, init_weights(spec, 0, device=device), device=device)
    prepared = wl.to_prepared(model, wl.fixed_hot_inputs(spec, batch, False, device))
    for _ in range(warmups):  # the first tunes every kernel for these shapes
        model.forward_prepared(prepared)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    scores, _ = model.forward_prepared(prepared)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"profiled one {workload} forward at B={batch} ({scores.shape[0]} scores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["dlrmv2", "dlrm-dot"], default="dlrmv2")
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--max-rows", type=int, default=4_000_000, help="table row cap")
    ap.add_argument("--warmups", type=int, default=3,
                    help="forwards before the profiled one (the first tunes)")
    ap.add_argument("--device", choices=["cuda", "cpu"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--summarize", type=Path, metavar="CSV",
                    help="instead: print the table of an ncu CSV this script was profiled into")
    ap.add_argument("--json", type=Path, help="with --summarize: also write the rows here")
    args = ap.parse_args()
    if args.summarize:
        rows = summarize(read_ncu_csv(args.summarize))
        print(table(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    profile_one_forward(args.workload, args.batch, args.max_rows, args.warmups, args.device)


if __name__ == "__main__":
    main()
