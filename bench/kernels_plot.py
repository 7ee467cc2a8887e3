"""Plot ``bench/kernels.py``'s results: device time against batch size, recserve and its
PyTorch peers, with issue 6's H200 targets marked.

    python bench/kernels_plot.py OUTDIR/kernels.json kernels.png

One panel per (gather, forward) x workload, log-log: a line per variant that ran, CUDA-graph
timings solid and eager ones dashed (at small batches an eager call times the host's launch
path, not the kernels). Made from the JSON alone, so a card's run can be plotted on any
machine afterwards. Needs matplotlib (``pip install 'recserve[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_report import require_matplotlib  # noqa: E402

VARIANTS = {  # variant -> (label, colour, graph); in legend order
    "recserve_graph": ("recserve, CUDA graph", "C0", True),
    "recserve": ("recserve, eager", "C0", False),
    "torch_per_table_graph": ("PyTorch, 26 embedding_bag calls, CUDA graph", "C1", True),
    "torch_per_table": ("PyTorch, 26 embedding_bag calls, eager", "C1", False),
    "torch_concat": ("PyTorch, one call over concatenated tables, eager", "C2", False),
    "torch_eager_graph": ("PyTorch eager + CUDA graph", "C1", True),
    "torch_eager": ("PyTorch eager", "C1", False),
    "torch_compile": ("torch.compile", "C4", False),
}
TARGETS = {  # (section, workload) -> {B: microseconds}: issue 6's targets on an H200
    ("gather", "dlrmv2"): {512: 15.0, 8192: 120.0},
    ("forward", "dlrmv2"): {512: 60.0, 8192: 500.0},
}
PANELS = [("gather", "dlrmv2"), ("gather", "dlrm-dot"), ("forward", "dlrmv2"),
          ("forward", "dlrm-dot")]


def series(records: list[dict], section: str, workload: str, dist: str = "uniform"
           ) -> dict[str, list[tuple[int, float]]]:
    """Per variant, its (B, us) points sorted by B, for one section, workload and id
    distribution (variants not in ``VARIANTS`` left out)."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if (r.get("section") == section and r.get("workload") == workload
                and r.get("dist") == dist and r.get("variant") in VARIANTS):
            out.setdefault(r["variant"], {})[int(r["B"])] = float(r["us"])
    return {v: sorted(out[v].items()) for v in VARIANTS if v in out}


def title(records: list[dict]) -> str:
    """The run's card, commit and date, from its env record."""
    env = next((r for r in records if r.get("section") == "env"), {})
    date = str(env.get("date", "?"))[:10]
    return (f"recserve kernels against PyTorch: {env.get('gpu', '?')}, commit "
            f"{env.get('commit', '?')}, {date}, torch {env.get('torch', '?')}, "
            f"triton {env.get('triton', '?')}")


def plot(records: list[dict], path: Path) -> None:
    """Write the figure to ``path`` (PNG); ValueError when no panel has data."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

    if not any(series(records, s, w) for s, w in PANELS):
        raise ValueError("no gather or forward records with uniform ids in these results")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=90)
    for ax, (section, workload) in zip(axes.flat, PANELS, strict=True):
        lines = series(records, section, workload)
        if not lines:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center",
                    transform=ax.transAxes)
        for variant, points in lines.items():
            label, colour, graph = VARIANTS[variant]
            ax.plot([b for b, _ in points], [us for _, us in points], color=colour,
                    linestyle="-" if graph else "--", marker="o" if graph else ".",
                    label=label)
        target = TARGETS.get((section, workload))
        if target and lines:
            ax.plot(list(target), list(target.values()), linestyle="none", marker="x",
                    markersize=10, markeredgewidth=2, color="C3", label="issue 6 target (H200)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("batch size (samples)")
        ax.set_ylabel("time per call (us; graph: the device's alone)")
        what = "gather (all tables)" if section == "gather" else "whole forward"
        ax.set_title(f"{workload}: {what}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=6.5)
    fig.suptitle(title(records), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a kernels.json written by bench/kernels.py")
    ap.add_argument("png", type=Path, help="where to write the figure")
    args = ap.parse_args(argv)
    try:
        plot(json.loads(args.results.read_text()), args.png)
    except (OSError, ValueError) as exc:
        print(f"kernels_plot: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
