#!/usr/bin/env bash
# Every GPU check in one call (DESIGN.md, "GPU checks"): install, `pytest -m gpu`, the kernel
# benchmarks against the PyTorch peers, the host's packing probe, then the engine and server
# load runs.
#
#   RECSERVE_COMMIT=<hash> PYTHON=python3 bash bench/gpu_check.sh OUTDIR
#
# For a machine whose Python already has torch, triton, numpy, msgpack, uvloop, nvidia-ml-py
# and safetensors, and no package registry. The whole check took 450-480 s on the H200 of the
# twelfth session: run it with a limit that leaves room for a rerun. The seventeenth session's
# H200 (the machine started in about 30 s), step by step: install 3-4 s, pytest-gpu over 180
# cold (136 of 137 passed by then; 38 s with the compile caches warm), kernels-bench 68,
# kernel-variants 144, pack-probe 16, engine-bench 23 (4 runs), engine-vs-single 50,
# load-generator 37 (before its --no-keep-gil run), ncu at 8192 alone 27. Every step runs
# even if one before it failed; each step's exit code and seconds go to OUTDIR/summary.txt.
#
# OUTDIR holds at most 8 files (the transfer limit); the default steps write 8:
#   summary.txt    card, versions, commit, pip's tail, each step's exit code and seconds
#   pytest-gpu.log
#   bench.log      every benchmark's printed output, in order
#   kernels.json, kernel_variants.json, engine_gpu.json, engine-cuda-<time>.json, load.json
#
# Steps (STEPS="install NAME ..." runs only those; default: all but startup, ncu and
# save-cache):
#   install           pip install -e . (or a PYTHONPATH shim when pip cannot)
#   pytest-gpu        pytest -m gpu, no autotuning (PYTEST_PATHS, PYTEST_WORKERS 4 with xdist)
#   kernels-bench     bench/kernels.py: recserve against eager, eager + graph, torch.compile
#                     (KERNEL_BENCH_ARGS, default --budget-s 60; --budget-s 200 with
#                     BENCH_TIMEOUT_S=240 also reaches torch.compile)
#   kernel-variants   bench/kernel_variants.py (VARIANTS_BENCH_ARGS, default --sections
#                     floors,forward,fused_bottom,auto_tuned,graph_tuned --budget-s 180): the
#                     floors (the gather against the same rows read by the simplest reader,
#                     DCNv2's V against its plain GEMM and its epilogue apart, every kernel
#                     against max(arithmetic, bytes) at the run's own rates:
#                     bench/floors.py); both forwards tuned as serving tunes them (eager
#                     launches), then with the bottom MLP in one launch (kernels/mlp.py: not
#                     yet run on a card), then with every kernel tuned anew by
#                     RECSERVE_TUNE_BY=auto (in a graph only where the eager timing is the
#                     launch's: not yet run on a card), then by its time in a graph, in a
#                     warm process (where the tenth session's graph-tuned
#                     int8 gather once went wrong: a failed check prints its diagnosis).
#                     Other sections: int8 (the int8 and bf16 gathers: in the default until
#                     the nineteenth session, as was --trial-configs; bench/RESULTS.md says
#                     how each trial candidate did), row_size (a lookup's cost by row, byte
#                     or line), configs (every gather config checked), fused_dot (dlrm-dot
#                     with its dot interaction formed in the gather's launch: 385 us against
#                     320 at B=8192 on the nineteenth session's H200, with its candidates
#                     that form a program's rows 4 at a time: VARIANTS_BENCH_ARGS="--sections
#                     forward,fused_dot --budget-s 150").
#   pack-probe        bench/engine_gpu.py --pack-only: one thread's packs and the packing
#                     ceiling of 1-6 threads, as they run and with glibc's non-temporal copies
#                     from 1 MB (GLIBC_TUNABLES)
#   engine-bench      bench/engine_gpu.py (ENGINE_BENCH_ARGS, default --variants default,
#                     slots=4,via=ring,pack_in=process,default,slots=4): dlrmv2 at B=8192
#                     against its bare forward, in process, then as the workers' rings hand
#                     requests over (packed in threads and in packing processes); the default
#                     (6 slots on 4 packing threads) and the old default's 4 slots twice each,
#                     since one machine's runs vary by up to 0.2. --sweep: the older sweep of
#                     threads, slots, streams and switch interval.
#   engine-vs-single  bench/engine.py --device cuda: the engine against one forward a request
#   load-generator    bench/load.py over loopback, a GPU server against a one-at-a-time one,
#                     then the GPU server with --no-keep-gil (torch's CUDA calls)
#   server-workers    bench/server.py: the server in one process and with 4 front-end workers
#                     (threads, packing processes, torch's CUDA calls) and the CPU engine on the
#                     same host; runs only while the check has taken under WORKERS_BUDGET_S (330)
#   startup           bench/startup.py: a model load cold, with the tuning cache, with both
#                     caches (STARTUP_ARGS, e.g. --model dlrmv2; STARTUP_TIMEOUT_S 300)
#   ncu               bench/ncu_forward.py: each kernel of a tuned forward under Nsight Compute
#                     (NCU_BATCHES "8192 512", NCU_TIMEOUT_S 240 a size; needs the hardware
#                     counters: Firecracker machines have them, gVisor ones do not)
#   save-cache        bench/triton_cache.py pack: every kernel this call compiled (cubins and
#                     launchers) into OUTDIR/triton-cache.tar.xz, at most 15 MiB (about 2 MiB
#                     for compile_check's 186 kernels). Copy it into .gpu-cache/ here and name
#                     .gpu-cache in the next call's carry: that call starts with the kernels
#                     compiled (a bare machine compiles them all again: pytest-gpu over 180 s
#                     cold, 38 s warm on the seventeenth session's H200).
#
# Before any step, a packed cache is restored into TRITON_CACHE_DIR (default ~/.triton/cache)
# from TRITON_CACHE_IN (default .gpu-cache/triton-cache.tar.xz, when there); the summary says
# how many kernels. Kernels of another Triton, Python or source are never looked up.
#
# Other knobs: PYTHON (default python); RECSERVE_COMMIT (default git HEAD: the device's copy
# of the tree has no .git, so pass it in); each step's limit in seconds: PYTEST_TIMEOUT_S
# (240), BENCH_TIMEOUT_S (120), VARIANTS_TIMEOUT_S (210), PACK_TIMEOUT_S (60 a probe run),
# ENGINE_TIMEOUT_S (200), SINGLE_TIMEOUT_S (80), LOAD_TIMEOUT_S (60), WORKERS_TIMEOUT_S (120).
set -u -o pipefail
export PYTHONUNBUFFERED=1

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export RECSERVE_COMMIT=${RECSERVE_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}
SUMMARY="$OUT/summary.txt"
START=$(date +%s)

step() {  # step NAME CMD...: run, log exit code and wall seconds, never abort the script
    local name=$1; shift
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        echo "step $name skipped (not in STEPS)" | tee -a "$SUMMARY"
        return 0
    fi
    local t0; t0=$(date +%s)
    "$@"
    local rc=$?
    echo "step $name rc=$rc seconds=$(( $(date +%s) - t0 )) total=$(( $(date +%s) - START ))" \
        | tee -a "$SUMMARY"
}

{
    echo "recserve gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $RECSERVE_COMMIT"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} > "$SUMMARY"

export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
CACHE_IN=${TRITON_CACHE_IN:-.gpu-cache/triton-cache.tar.xz}
if [ -f "$CACHE_IN" ]; then
    "$PY" bench/triton_cache.py unpack "$CACHE_IN" "$TRITON_CACHE_DIR" >> "$SUMMARY" 2>&1
elif [ -n "${TRITON_CACHE_IN:-}" ]; then
    echo "TRITON_CACHE_IN=$TRITON_CACHE_IN: no such file; every kernel compiles" >> "$SUMMARY"
fi

install() {
    "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/pip.tmp" 2>&1
    local rc=$?
    tail -n 3 "$OUT/pip.tmp" >> "$SUMMARY"
    rm -f "$OUT/pip.tmp"
    if [ $rc -ne 0 ]; then  # no usable setuptools: import the folders through a shim
        local shim=/tmp/recserve-shim/recserve
        mkdir -p "$shim"
        for pkg in engine kernels server; do ln -sfn "$ROOT/$pkg" "$shim/$pkg"; done
        export PYTHONPATH="/tmp/recserve-shim${PYTHONPATH:+:$PYTHONPATH}"
        echo "pip install failed; importing recserve from $shim" >> "$SUMMARY"
    fi
    "$PY" -c "import recserve.engine, recserve.kernels, recserve.server" 2>> "$SUMMARY"
}
step install install

# GPU tests: one config per kernel (no autotuning) so compiles stay few; the benchmark
# below autotunes over every config and prunes those that fail to compile on this card.
# With pytest-xdist there (the device image has it), PYTEST_WORKERS processes share the card:
# the run is mostly Triton compiles, which then go in parallel on the host's cores.
PARALLEL=""
if "$PY" -c "import xdist" 2>/dev/null; then PARALLEL="-n ${PYTEST_WORKERS:-4}"; fi
step pytest-gpu bash -c "set -o pipefail; RECSERVE_AUTOTUNE=0 timeout ${PYTEST_TIMEOUT_S:-240} \
    $PY -m pytest -m gpu -v --no-header -p no:cacheprovider -o addopts='' -o timeout=60 $PARALLEL \
    --continue-on-collection-errors --durations=15 ${PYTEST_PATHS:-tests} \
    2>&1 | tee '$OUT/pytest-gpu.log' | tail -n 5"

# Kernel benchmark: recserve vs eager / eager + CUDA graph / torch.compile; partial results
# are in kernels.json after every measurement, so a timeout still leaves data.
step kernels-bench bash -c "timeout ${BENCH_TIMEOUT_S:-120} $PY bench/kernels.py '$OUT' \
    ${KERNEL_BENCH_ARGS:---budget-s 60} >> '$OUT/bench.log' 2>&1; rc=\$?; \
    tail -n 14 '$OUT/bench.log'; exit \$rc"

# Gather and forward variants side by side, each checked against the torch reference.
step kernel-variants bash -c "timeout ${VARIANTS_TIMEOUT_S:-210} $PY bench/kernel_variants.py \
    '$OUT' ${VARIANTS_BENCH_ARGS:---sections floors,forward,fused_bottom,auto_tuned,graph_tuned --budget-s 180} \
    >> '$OUT/bench.log' 2>&1; rc=\$?; \
    tail -n 18 '$OUT/bench.log'; exit \$rc"

# The engine's bound on the card hosts is packing (a batch's ids copied into pinned staging:
# 1.1 ms alone on the twelfth session's H200 host, 0.25 on the CI machine), and one H100 host
# wrote pinned memory 3.3x slower than pageable. One thread's packs and the packing ceiling
# of 1-6 threads (bench/engine_gpu.py --pack-only), as they run and with glibc told to copy
# anything over 1 MB with non-temporal stores (GLIBC_TUNABLES, read at process start; a
# pack's 7 MB ids are one memmove): if that is faster into pinned memory, serving can set it.
pack_probe() {
    local tmp; tmp=$(mktemp -d)
    for tunables in "" "glibc.cpu.x86_non_temporal_threshold=0x100000"; do
        echo "pack probe, GLIBC_TUNABLES='$tunables':"
        GLIBC_TUNABLES=$tunables timeout ${PACK_TIMEOUT_S:-60} $PY bench/engine_gpu.py "$tmp" \
            --pack-only || return $?
    done
    rm -rf "$tmp"
}
step pack-probe bash -c "$(declare -f pack_probe); PY='$PY' pack_probe >> '$OUT/bench.log' 2>&1; \
    rc=\$?; tail -n 6 '$OUT/bench.log'; exit \$rc"

# Engine at full load vs its own bare forward (dlrmv2, B=8192), copy/compute overlap, host
# stages; in process, then as the rings of serve --workers hand requests over, packed in
# threads and in packing processes (serve --pack-in), and the default's 6 slots on 4 packing
# threads against 4 on 4, twice (the seventeenth session's H200: 0.92 and 0.91 against 0.91
# and 0.77 with 8192-row requests).
step engine-bench bash -c "timeout ${ENGINE_TIMEOUT_S:-200} $PY bench/engine_gpu.py '$OUT' \
    ${ENGINE_BENCH_ARGS:---variants default,slots=4,via=ring,pack_in=process,default,slots=4} \
    >> '$OUT/bench.log' 2>&1; rc=\$?; tail -n 10 '$OUT/bench.log'; exit \$rc"

# Engine vs one forward per request, in process, same offered loads (bench/engine.py).
step engine-vs-single bash -c "timeout ${SINGLE_TIMEOUT_S:-80} $PY bench/engine.py --device cuda \
    --duration 1.5 --repeat 1 --loads 0.5,1.3,4 --max-batch-rows 4096 --out '$OUT' \
    >> '$OUT/bench.log' 2>&1; rc=\$?; tail -n 12 '$OUT/bench.log'; exit \$rc"

# The load generator (issue 5) over loopback: a GPU server it starts and a one-at-a-time
# baseline server on the same card; closed and open loop. RECSERVE_AUTOTUNE=0: the server
# captures a graph per bucket and slot at start, and tuning each shape would take this
# step's time (the benches above measure tuned kernels).
# Then the same server with torch's CUDA calls (--no-keep-gil), closed loop only, into
# bench.log: the seventeenth session's H200 served 1868 req/s at 64 connections against the
# second session's 2724 at 921b5f5, and keep_gil (default since the tenth) holds the GIL
# through each CUDA call while this one process's event loop waits.
step load-generator bash -c "RECSERVE_AUTOTUNE=0 timeout ${LOAD_TIMEOUT_S:-60} $PY bench/load.py \
    --start --baseline --serve-args '--device cuda --workers 1' --concurrency 8,64 --rate 1000 \
    --duration 3 --quiet --json '$OUT/load.json' >> '$OUT/bench.log' 2>&1; rc=\$?; \
    echo 'the same server with --no-keep-gil:' >> '$OUT/bench.log'; \
    RECSERVE_AUTOTUNE=0 timeout ${LOAD_TIMEOUT_S:-60} $PY bench/load.py --start \
    --serve-args '--device cuda --workers 1 --no-keep-gil' --concurrency 8,64 --duration 3 \
    --quiet >> '$OUT/bench.log' 2>&1 || rc=\$?; tail -n 12 '$OUT/bench.log'; exit \$rc"

# Only with time to spare (the whole check should leave room for a rerun): the server on the
# card in one process and with 4 front-end worker processes (--workers), packed in threads
# (--pack-in thread) and in packing processes (the default with workers), also with
# --no-keep-gil (torch's CUDA calls), and the CPU engine on the same host; the table goes
# to bench.log (no file: OUTDIR is at its limit of 8).
if [ $(( $(date +%s) - START )) -lt "${WORKERS_BUDGET_S:-330}" ]; then
    step server-workers bash -c "RECSERVE_AUTOTUNE=0 timeout ${WORKERS_TIMEOUT_S:-120} $PY \
        bench/server.py --config 'engine=--device cuda --workers 1' \
        --config 'engine-4w-thread=--device cuda --workers 4 --pack-in thread' \
        --config 'engine-4w=--device cuda --workers 4' \
        --config 'engine-4w-torch=--device cuda --workers 4 --no-keep-gil' \
        --config 'cpu=--device cpu --workers 1' \
        --duration 3 --loads 0.5 \
        >> '$OUT/bench.log' 2>&1; rc=\$?; tail -n 6 '$OUT/bench.log'; exit \$rc"
else
    echo "step server-workers skipped: past ${WORKERS_BUDGET_S:-330} s" | tee -a "$SUMMARY"
fi

# Only when STEPS names it (a follow-up call, e.g. STEPS="install startup"): a model load
# cold, with the tuning cache, and with both caches, each in a fresh process (demo model;
# STARTUP_ARGS="--model dlrmv2" for the big one). Its table goes to bench.log.
if [[ " ${STEPS:-} " == *" startup "* ]]; then
    step startup bash -c "timeout ${STARTUP_TIMEOUT_S:-300} $PY bench/startup.py \
        '$OUT/startup' ${STARTUP_ARGS:-} >> '$OUT/bench.log' 2>&1; rc=\$?; \
        tail -n 4 '$OUT/bench.log'; exit \$rc"
fi

# Only when STEPS names it (e.g. STEPS="install ncu"): one tuned dlrmv2 forward per batch
# size under Nsight Compute (bench/ncu_forward.py): per kernel its DRAM and L2 bytes, SM and
# memory throughput, occupancy and largest stall reasons; the CSVs come back as ncu-B.csv,
# the tables go to bench.log.
# ncu needs the hardware counters (seen on Firecracker machines, not on gVisor: KINDS.md).
if [[ " ${STEPS:-} " == *" ncu "* ]]; then
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
    NCU_BASE=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum
    # the stall reasons ncu_forward.py's summary lists (its STALL_REASONS, by metric name)
    NCU_STALLS=$($PY -c "import sys; sys.path.insert(0, 'bench'); import ncu_forward as n; \
print(','.join(n.STALL_METRIC.format(r) for r in n.STALL_REASONS))")
    ncu_forward() {  # ncu_forward B METRICS: one profiled forward at B rows into ncu-B.csv
        timeout "${NCU_TIMEOUT_S:-240}" "$NCU" --profile-from-start off --clock-control none \
            --csv --print-units base --log-file "$OUT/ncu-$1.csv" --metrics "$2" \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
            --section LaunchStats --section WarpStateStats \
            $PY bench/ncu_forward.py --batch "$1" >> "$OUT/bench.log" 2>&1
    }
    ncu_all() {
        [ -n "$NCU" ] || { echo "ncu: not on this machine"; return 3; }
        local rc=0 b
        for b in ${NCU_BATCHES:-8192 512}; do
            ncu_forward "$b" "$NCU_BASE,$NCU_STALLS" || rc=$?
            if ! grep -q '"Metric Name"' "$OUT/ncu-$b.csv" 2>/dev/null; then
                # (an ncu that knows a stall metric by another name profiles nothing: again
                # without them)
                echo "ncu at B=$b: no table with the stall metrics; again without" \
                    | tee -a "$OUT/bench.log"
                rc=0
                ncu_forward "$b" "$NCU_BASE" || rc=$?
            fi
            $PY bench/ncu_forward.py --summarize "$OUT/ncu-$b.csv" 2>&1 \
                | tee -a "$OUT/bench.log" || rc=$?
        done
        return $rc
    }
    step ncu ncu_all
fi

# Only when STEPS names it (e.g. STEPS="install pytest-gpu kernel-variants save-cache"): the
# kernels this call compiled, for the next call to carry (see the header).
if [[ " ${STEPS:-} " == *" save-cache "* ]]; then
    step save-cache bash -c "set -o pipefail; '$PY' bench/triton_cache.py pack '$TRITON_CACHE_DIR' \
        '$OUT/triton-cache.tar.xz' --limit-mib 15 2>&1 | tee -a '$SUMMARY'"
fi

echo "gpu_check done in $(( $(date +%s) - START )) s" | tee -a "$SUMMARY"
ls "$OUT" | tee -a "$SUMMARY"
