"""CPU threads: how many cores this process really has, and whether torch's threads will fight for them.

torch starts one intra-op thread per core. When other processes keep those cores busy, every
parallel op waits for its slowest thread, which waits for a core: on a 2-core Xeon with a load
average of 3-8, Wanda on pydoc-llama-12m took 408-450 s with torch's default 2 threads and
82-83 s with one (``bench/threads_busy.py``, 2026-11-30). The load average and the CPU quota
show that situation in advance, where the system reports them.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path


def available_cores() -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cores = float(os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity is all we know
    return cores


def load_average() -> float | None:
    """Runnable processes over the last minute (Unix), None where the system does not say."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def oversubscription(threads: int, load: float | None = None, cores: float | None = None) -> str | None:
    """Why ``threads`` torch threads would wait for cores, with a thread count to try; None if they would not.

    ``load`` and ``cores`` default to this machine's. The rule is deliberately simple: the other
    work (the load average) plus our threads should fit in the cores, with half a core of slack.
    """
    cores = available_cores() if cores is None else cores
    load = load_average() if load is None else load
    if threads > cores + 0.5:
        return (
            f"torch uses {threads} threads but this process may use only {cores:g} core(s) (CPU affinity or "
            f"quota); pass --threads {max(1, math.floor(cores))}"
        )
    suggest = max(1, math.floor(cores - load)) if load is not None else threads
    if load is not None and load + threads > cores + 0.5 and suggest < threads:
        return (
            f"the machine is busy (load average {load:.1f} on {cores:g} cores) and torch will use {threads} "
            f"thread(s); threads that wait for a core stall every parallel op (measured: 5x slower). "
            f"If this run is slow, try --threads {suggest}"
        )
    return None


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
