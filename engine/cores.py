"""How many cores this process may use.

A container can be held to fewer cores than its machine shows: by an affinity mask
(``--cpuset-cpus``, Kubernetes' static CPU manager) or by a CFS quota (``--cpus``, a pod's
CPU limit). Both count; the number of cores the machine has does not. The executors size
their default thread counts from it, the server its default front-end workers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path | None = None, membership: Path | None = None) -> float | None:
    """Cores' worth of CPU time the cgroup quota allows (``quota / period``), or None
    without a quota. cgroup v2: ``cpu.max`` ("max 100000" or "400000 100000") of this
    process's cgroup and each one above it (a systemd service's CPUQuota sits below the
    root; in a container the root is its own), the smallest; v1: ``cpu/cpu.cfs_quota_us``
    (-1 for none) and ``cpu.cfs_period_us``. ``root``: where the cgroup filesystem is
    (default ``CGROUP_ROOT``); ``membership``: this process's cgroups (/proc/self/cgroup)."""
    root = CGROUP_ROOT if root is None else root
    quotas = []
    for folder in _v2_chain(root, membership or Path("/proc/self/cgroup")):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    if quotas:
        return min(quotas)
    for folder in ("cpu", "cpu,cpuacct"):
        try:
            quota = int((root / folder / "cpu.cfs_quota_us").read_text())
            period = int((root / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def _v2_chain(root: Path, membership: Path) -> list[Path]:
    """This process's cgroup v2 folder and every folder above it up to ``root``."""
    relative = ""
    try:
        for line in membership.read_text().splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip().strip("/")
    except OSError:
        pass
    folder, chain = root / relative if relative else root, []
    while True:
        chain.append(folder)
        if folder == root or root not in folder.parents:
            return chain
        folder = folder.parent


def available_cores(root: Path | None = None) -> int:
    """Cores this process may run on (affinity), capped by the cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (no affinity on this platform)
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


MAX_PACK_THREADS = 4
"""Packing threads by default at most: on an H100 host 8 of them took turns on the GIL
(issuing a batch took 5.1 ms against 1.2-1.3 with 4; bench/RESULTS.md, eighth session), so
more slots than this (batches in flight) share 4 threads."""


def default_pack_threads(slots: int, cores: int | None = None) -> int:
    """One packing thread per slot, leaving a core each to the event loop and the completion
    thread, and at most ``MAX_PACK_THREADS``: on the 2-core CI machine one thread packed
    ranking batches fastest (0.72-0.74 of the simulated device, 0.61-0.63 with two,
    0.44-0.51 with four; bench/engine_host.py), while the H200's 16-core host did best with
    one per slot up to 4 (bench/RESULTS.md)."""
    if cores is None:
        cores = available_cores()  # (a container's CPU limit, not the machine's cores)
    return max(1, min(slots, cores - 2, MAX_PACK_THREADS))
