"""The one thread policy: a node's physical cores, shared evenly by the workers on it.

Training workers, the scoring actors, evaluation and the benchmarks all size their torch
thread pools with :func:`threads_per_worker`. Physical cores rather than logical CPUs: two
torch threads on the SMT siblings of one core compete for the same vector units.
"""

from __future__ import annotations

import math
import os


def physical_cores() -> int:
    """Physical cores this process may run on (affinity, SMT siblings and cgroup quota)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as f, open(f"{topo}/core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores = set()
            break
    n = len(cores) or len(cpus)
    try:  # cgroup v2 CPU quota ("max 100000" when unlimited)
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def threads_per_worker(workers: int = 1) -> int:
    """Torch threads for each of ``workers`` processes sharing this node's physical cores."""
    return max(1, physical_cores() // max(1, workers))
