"""How long a GPU server takes to load a model: cold, with the tuning cache, with both caches.

    python bench/startup.py OUTDIR [--model demo|dlrmv2] [--max-rows N]

Loading a model on a GPU (``GpuExecutor.build_model``, what ``recserve serve`` does for each
model before it is ready) autotunes every kernel for every batch bucket, compiles the
configs it tries, and captures a CUDA graph per slot and bucket. Each measurement here is
a fresh process, with ``recserve serve``'s cuda engine settings:

1. cold: an empty Triton compile cache and an empty tuning cache (a new pod);
2. tuned: an empty compile cache, the tuning cache run 1 wrote (only the picked configs
   compile: a pod on a new node with the picks on a shared volume);
3. warm: both caches from run 1 (a restarted container: deploy/README.md's ``emptyDir``);
4. cold, one by one: as run 1, with each kernel's candidates compiled one by one as they
   are timed (``RECSERVE_COMPILE_THREADS=1``), what a load cost before the tuner compiled
   them on several threads at once (``kernels/precompile.py``). Last, so that a step's
   time limit cuts this comparison before the three above.

Prints a table and writes OUTDIR/startup.json (the card, versions, commit, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import provenance  # bench/ is on sys.path: this file runs as a script

THREADS_ENV = "RECSERVE_COMPILE_THREADS"  # (kernels/precompile.py; read without torch)

# One load in a fresh process: the seconds build_model took, as JSON on the last line.
CHILD = """
import json, sys, time
sys.path.insert(0, {bench!r})
import torch
from recserve.engine.gpu_executor import GpuExecutor
from recserve.engine.weights import init_weights
from recserve.server.serve_options import DEVICE_DEFAULTS
import workloads as wl
from recserve.engine.demo import demo_spec
spec = demo_spec() if {model!r} == "demo" else wl.dlrmv2_spec({max_rows})
weights = init_weights(spec, 0)
executor = GpuExecutor(DEVICE_DEFAULTS["cuda"], "cuda")
executor.start()
started = time.perf_counter()
executor.build_model(spec, weights)
torch.cuda.synchronize()
print(json.dumps({{"build_s": time.perf_counter() - started}}))
executor.close()
"""

def load_once(model: str, max_rows: int, triton_cache: Path, tuning_file: Path,
              timeout_s: float, threads: str | None = None) -> dict:
    """One model load in a fresh process with these caches (and ``threads`` compile
    threads, else the default): its build seconds and wall."""
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), model=model,
                        max_rows=max_rows)
    env = {**os.environ, "TRITON_CACHE_DIR": str(triton_cache),
           "RECSERVE_TUNING_CACHE": str(tuning_file)}
    env.pop("RECSERVE_AUTOTUNE", None)  # (the serving default: tune)
    env.pop(THREADS_ENV, None)
    if threads is not None:
        env[THREADS_ENV] = threads
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the load failed ({done.returncode}): {done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--model", choices=("demo", "dlrmv2"), default="demo",
                   help="the built-in demo model, or dlrmv2 (26 tables, DCNv2)")
    p.add_argument("--max-rows", type=int, default=1_000_000,
                   help="dlrmv2's table row cap")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per load")
    args = p.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    import torch  # (after the arguments: --help needs no torch)
    import triton

    if not torch.cuda.is_available():
        p.exit(2, "startup.py measures model loads on a CUDA GPU; torch sees none here\n")

    results = {"card": torch.cuda.get_device_name(),
               "torch": torch.__version__, "triton": triton.__version__,
               "commit": provenance.commit(), "model": args.model, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        compiled, picks = Path(tmp, "triton"), Path(tmp, "tuning.json")  # run 1 fills them
        runs = (("cold", compiled, picks, None), ("tuned", Path(tmp, "triton-empty"), picks, None),
                ("warm", compiled, picks, None),
                ("cold-1", Path(tmp, "triton-1"), Path(tmp, "tuning-1.json"), "1"))
        for name, compile_dir, tuning_file, threads in runs:
            run = {"run": name, **load_once(args.model, args.max_rows, compile_dir, tuning_file,
                                            args.timeout_s, threads)}
            results["runs"].append(run)
            print(f"{args.model:7s} {name:6s} build {run['build_s']:7.1f} s "
                  f"(process {run['process_s']:.1f} s)", flush=True)
            (args.outdir / "startup.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
