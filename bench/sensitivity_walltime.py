"""Wall time of a sensitivity analysis, and the speed-up of 2 local processes over 1.

The demo's trained CNN (digits), every layer at 7 sparsities with Wanda (loss on 4 calibration
batches): one process, then two (``backend='processes'``), alternating 1, 2, 1, 2 so a burst of load
hits both; the profiles are checked equal. One torch thread per process in both settings. On a
quiet 2-core machine the whole run takes about a minute:

    OMP_NUM_THREADS=1 .venv/bin/python bench/sensitivity_walltime.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results

GRID = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def main() -> None:
    from secateurs.analysis import sensitivity
    from secateurs.demo import train_batches, trained_cnn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="pairs of (1 process, 2 processes) runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, batches = trained_cnn(), train_batches()[:4]
    times: dict[int, list[float]] = {1: [], 2: []}
    loads, profiles = [], {}
    for workers in (1, 2) * args.rounds:
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        profiles[workers] = sensitivity(
            model, batches, method="wanda", sparsities=GRID, workers=workers, backend="processes", progress=False
        )
        times[workers].append(time.perf_counter() - start)
        print(f"{workers} process(es): {times[workers][-1]:.1f} s (load {loads[-1]:.1f})", flush=True)
    same = [(c.target, c.sparsity, c.metric) for c in profiles[1].cells] == [
        (c.target, c.sparsity, c.metric) for c in profiles[2].cells
    ]
    cells = len(profiles[1].cells)
    speedups = [a / b for a, b in zip(times[1], times[2])]
    print(
        f"{cells} cells; 1 process {statistics.median(times[1]):.1f} s, "
        f"2 processes {statistics.median(times[2]):.1f} s; "
        f"speed-up {', '.join(f'{s:.2f}x' for s in speedups)}; identical profiles: {same}"
    )
    write_results(
        "sensitivity_walltime",
        {
            "machine": machine(),
            "loads": loads,
            "load_after": os.getloadavg(),
            "cells": cells,
            "times": times,
            "speedups": speedups,
            "identical": same,
        },
    )


if __name__ == "__main__":
    main()
