"""bench/ncu_forward.py: its reading of ncu's CSV (the format ncu --csv prints: one row per
kernel and metric, after ncu's own messages) and its forward under the interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ncu_forward import read_ncu_csv, summarize, table  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value"')


def _row(kid: int, kernel: str, section: str, name: str, unit: str, value: str) -> str:
    return (f'"{kid}","4242","python3","127.0.0.1","{kernel}","1","7","(128, 1, 1)",'
            f'"(1024, 1, 1)","0","9.0","{section}","{name}","{unit}","{value}"')


def test_the_summary_reads_ncus_csv_per_kernel_in_launch_order(tmp_path):
    metrics = "Command line profiler metrics"
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3)",
             "==PROF== Profiling \"_linear_kernel\" - 0: 0%....50%....100% - 9 passes",
             HEADER,
             _row(1, "_linear_kernel", metrics, "gpu__time_duration.sum", "nsecond", "95,000"),
             _row(1, "_linear_kernel", metrics, "dram__bytes_read.sum", "byte", "114,000,000"),
             _row(1, "_linear_kernel", metrics, "dram__bytes_write.sum", "byte", "57,000,000"),
             _row(1, "_linear_kernel", "GPU Speed Of Light Throughput", "Compute (SM) Throughput",
                  "%", "61.5"),
             _row(1, "_linear_kernel", "Occupancy", "Achieved Occupancy", "%", "12.4"),
             # the same name twice, in two units (as ncu prints it): the % one is the column
             _row(1, "_linear_kernel", "GPU Speed Of Light Throughput", "Memory Throughput",
                  "%", "40.26"),
             _row(1, "_linear_kernel", "Memory Workload Analysis", "Memory Throughput",
                  "byte/s", "1,230,266,845,158.40"),
             _row(1, "_linear_kernel", "Memory Workload Analysis",
                  "Local Memory Spilling Requests", "", "1,230,336"),
             _row(0, "_embedding_bag_kernel", metrics, "gpu__time_duration.sum", "nsecond",
                  "155,000"),
             _row(0, "_embedding_bag_kernel", "Memory Workload Analysis", "L2 Hit Rate", "%",
                  "n/a"),
             "==PROF== Disconnected from process 4242"]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    kernels = read_ncu_csv(path)
    assert [k["kernel"] for k in kernels] == ["_embedding_bag_kernel", "_linear_kernel"]
    gather, v = summarize(kernels)
    assert gather["us"] == pytest.approx(155.0) and gather["l2_hit_pct"] is None
    assert gather["dram_read_MB"] is None and gather["dram_GBps"] is None
    assert v["us"] == pytest.approx(95.0)
    assert v["dram_read_MB"] == pytest.approx(114.0) and v["dram_write_MB"] == pytest.approx(57.0)
    assert v["dram_GBps"] == pytest.approx(171.0 / 95.0 * 1e3)  # 1800 GB/s
    assert v["sm_pct"] == pytest.approx(61.5) and v["occupancy_pct"] == pytest.approx(12.4)
    assert v["mem_pct"] == pytest.approx(40.26) and v["spill_requests"] == 1_230_336
    text = table([gather, v])
    assert "_linear_kernel" in text and "2 kernels, 250.0 us in all" in text
    assert v["grid"] == "1024" and v["block"] == "128"  # (the tile a GEMM ran, by its grid)


def test_a_file_without_ncus_table_says_what_is_missing(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text("==PROF== Connected to process 1\n==ERROR== Failed to profile\n")
    with pytest.raises(ValueError, match="no ncu CSV header"):
        read_ncu_csv(path)


def test_the_profiled_forward_runs_under_the_interpreter():
    script = Path(__file__).resolve().parents[1] / "bench" / "ncu_forward.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--batch", "4",
                           "--max-rows", "64", "--warmups", "1", "--workload", "dlrm-dot"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "profiled one dlrm-dot forward at B=4 (4 scores)" in done.stdout


FAKE_NCU = '''#!{python}
"""A stand-in ncu: writes a one-kernel CSV to --log-file; with STALLS_UNKNOWN set, fails
as an ncu does on a metric name it does not know."""
import os, sys
args = sys.argv[1:]
log, metrics = args[args.index("--log-file") + 1], args[args.index("--metrics") + 1]
if os.environ.get("STALLS_UNKNOWN") and "stalled" in metrics:
    print("==ERROR== Failed to find metric smsp__average_warps_issue_stalled_gmma")
    sys.exit(1)
rows = [{header!r}]
def row(name, unit, value):
    rows.append(f'"0","1","python3","h","_embedding_bag_kernel","1","7","(64, 1, 1)",'
                f'"(25040, 1, 1)","0","9.0","Command line profiler metrics","{{name}}",'
                f'"{{unit}}","{{value}}"')
row("gpu__time_duration.sum", "nsecond", "150,000")
for name in metrics.split(","):
    if "stalled_long_scoreboard" in name:
        row(name, "inst", "21.5")
    elif "stalled_lg_throttle" in name:
        row(name, "inst", "3.25")
    elif "stalled" in name:
        row(name, "inst", "0.5")
open(log, "w").write("\\n".join(rows) + "\\n")
'''


@pytest.mark.parametrize("stalls_known", [True, False])
def test_gpu_checks_ncu_step_lists_stall_reasons_or_runs_again_without(tmp_path, stalls_known):
    """gpu_check.sh's ncu step against a stand-in ncu: each kernel's largest stall reasons
    in the summary; an ncu that does not know a stall metric profiles the forward again
    without them, and the step still gives its table."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ncu = bin_dir / "ncu"
    ncu.write_text(FAKE_NCU.format(python=sys.executable, header=HEADER))
    ncu.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STEPS": "ncu",
           "PYTHON": sys.executable, "NCU_BATCHES": "512", "RECSERVE_COMMIT": "test"}
    if not stalls_known:
        env["STALLS_UNKNOWN"] = "1"
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step ncu rc=0" in (out / "summary.txt").read_text()
    log = (out / "bench.log").read_text()
    assert "1 kernels, 150.0 us in all" in log
    if stalls_known:
        assert "_embedding_bag_kernel" in log
        assert "long_scoreboard 21.5, lg_throttle 3.2, " in log  # (largest first)
    else:
        assert "no table with the stall metrics; again without" in log
        assert "where warps wait" not in log
