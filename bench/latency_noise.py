"""How much does a busy CPU move the latency line of a removal report, before and after issue 10?

The trained digits CNN loses half its channels (3.96x fewer MACs) in every trial. Each trial
reports a speed-up two ways on the same machine state:

- *sequential* (the report before issue 10): median of 20 runs of the dense model, then the
  removal, then median of 20 runs of the pruned model;
- *alternating* (the report now): ``prune(..., mode="remove")``'s own figure, a dense copy and the
  pruned model timed alternately, the median of the 20 per-pair ratios, with its IQR.

``--burners N`` starts N busy-looping processes for the whole run, as another job on the machine
would. The table gives, per method, the spread of the reported speed-ups across trials and how
many trials reported an efficiency (speed-up / MACs reduction) above 1.2, which removal cannot
really reach, and how many trials the new report flagged with a warning.

    .venv/bin/python bench/latency_noise.py [--trials 15] [--burners 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import secateurs
from _common import machine, write_results
from secateurs.demo import trained_cnn
from secateurs.evaluation import measure_latency

X = torch.zeros(1, 1, 8, 8)


def trial() -> dict[str, float]:
    model = trained_cnn()
    dense_s = measure_latency(model, X).median  # the old report: before ...
    report = secateurs.prune(model, "magnitude", 0.5, mode="remove", example_inputs=X, progress=False)
    pruned_s = measure_latency(model, X).median  # ... and after, one after the other
    macs = report.macs_reduction
    sequential = dense_s / pruned_s
    return {
        "macs_reduction": macs,
        "sequential_speedup": sequential,
        "sequential_efficiency": sequential / macs,
        "alternating_speedup": report.speedup,
        "alternating_efficiency": report.latency_efficiency,
        "alternating_iqr": [report.latency.speedup.q1, report.latency.speedup.q3],
        "warned": bool(report.latency_warnings),
    }


def summary(rows: list[dict], key: str) -> str:
    values = sorted(r[f"{key}_speedup"] for r in rows)
    implausible = sum(r[f"{key}_efficiency"] > 1.2 for r in rows)
    return (f"median {statistics.median(values):.2f}x, range {values[0]:.2f}-{values[-1]:.2f}x, "
            f"efficiency > 1.2 in {implausible}/{len(rows)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--burners", type=int, default=1, help="busy-looping processes running meanwhile")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained_cnn()  # train once, outside the timed trials
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    started = time.perf_counter()
    try:
        rows = [trial() for _ in range(args.trials)]
    finally:
        for p in burners:
            p.kill()
    lines = [
        f"sequential (before): {summary(rows, 'sequential')}",
        f"alternating (now):   {summary(rows, 'alternating')}; flagged as noisy or implausible in "
        f"{sum(r['warned'] for r in rows)}/{len(rows)}",
    ]
    print("\n".join(lines))
    write_results("latency_noise", {"machine": machine(), "burners": args.burners, "trials": rows,
                                    "summary": lines, "total_seconds": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
