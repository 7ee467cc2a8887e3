"""The GPU engine's host-side packing, measured apart from the engine (``engine_gpu.py``
runs these first, and alone with ``--pack-only``, which needs no GPU): one thread's pack
of a full batch and of a batch of ranking requests, into pinned and pageable staging, and
the full batches a second 1-6 threads pack together with nothing else running.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import provenance
import torch
import workloads as wl

from recserve.engine.inputs import RequestInputs
from recserve.engine.staging import host_buffers, pack, staging_layout
from recserve.engine.tensor_buffers import pinned_host
from recserve.kernels.layout import build_layout
from recserve.kernels.model import feature_groups


def host_layout(spec, rows: int):
    """The staging layout the GPU executor packs ``spec``'s batches of ``rows`` into."""
    return staging_layout(spec, feature_groups(spec), rows, build_layout(spec).x_request)


def pack_times(spec, full: RequestInputs, ranking: list[RequestInputs]) -> dict:
    """Milliseconds one thread takes to pack a full batch and a batch of ranking requests,
    into pinned and into pageable host buffers (is writing pinned memory slow here?), with
    requests in the flat form (as worker processes send them) and per feature only (as a
    single-process server or an in-process caller hands them over)."""
    layout = host_layout(spec, full.num_candidates)
    pieces = wl.one_batch(ranking, full.num_candidates)
    out = {}
    memories = ("pinned", "pageable") if torch.cuda.is_available() else ("pageable",)
    for memory in memories:
        host = pinned_host(layout) if memory == "pinned" else host_buffers(layout)
        for traffic, flat_batch in (("full", [full]), ("ranking", pieces)):
            for form, batch in (("flat", flat_batch), ("per_feature", wl.per_feature(flat_batch))):
                pack(layout, host, batch, full.num_candidates)
                start = time.perf_counter()
                for _ in range(10):
                    pack(layout, host, batch, full.num_candidates)
                out[f"{traffic}_{form}_{memory}"] = round((time.perf_counter() - start) * 100,
                                                          3)
    return out


def packing_ceiling(spec, requests: list[RequestInputs], threads=(1, 2, 4, 6),
                    seconds: float = 0.6) -> dict:
    """Full batches a second that ``threads`` packing threads sustain together, each into
    its own staging buffers (pinned with a GPU), cycling through ``requests`` as the engine
    runs do, with nothing else running: the host's ceiling for packing, whatever the
    engine's pipeline. Against the bare forward's batches a second it says whether the
    host can feed the card at all (memory bandwidth, cores) or the pipeline falls short."""
    rows = requests[0].num_candidates
    layout = host_layout(spec, rows)
    return {str(n): _packed_together(layout, requests, n, seconds) for n in threads}


def _packed_together(layout, requests: list[RequestInputs], n: int, seconds: float) -> dict:
    """``n`` threads packing for ``seconds``: batches a second in all, ms a pack each."""
    rows = requests[0].num_candidates
    hosts = [pinned_host(layout) if torch.cuda.is_available() else host_buffers(layout)
             for _ in range(n)]
    for host in hosts:  # (first touch of the buffers out of the timing)
        pack(layout, host, [requests[0]], rows)
    counts, start, deadline = [0] * n, threading.Barrier(n + 1), [0.0]

    def work(i: int) -> None:
        start.wait()
        k = 0
        while time.perf_counter() < deadline[0]:
            pack(layout, hosts[i], [requests[(i + k) % len(requests)]], rows)
            k += 1
        counts[i] = k

    workers = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    return {"batches_per_s": round(sum(counts) / elapsed, 1),
            "ms_a_pack": round(n * elapsed / max(1, sum(counts)) * 1e3, 3)}


def pack_only(outdir: Path, spec, batch: int) -> None:
    """``--pack-only``: pack times of one thread, with the machine they ran on."""
    rng = np.random.default_rng(0)
    full = wl.full_requests(spec, rng, batch, 4)
    ranking = wl.ranking_slices(spec, full, rng, 40)
    results = {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "numpy": np.__version__, "commit": provenance.commit(), "batch": batch,
               "pack_ms": pack_times(spec, full[0], ranking),
               "packing_ceiling": packing_ceiling(spec, full)}
    print(f"one thread packing one {batch}-row batch, ms: {results['pack_ms']}")
    print(f"full batches a second, packed by 1-6 threads at once: {results['packing_ceiling']}")
    (outdir / "engine_pack.json").write_text(json.dumps(results, indent=2) + "\n")
