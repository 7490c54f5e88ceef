"""Parameter sensitivity: Spearman correlation of each per-weight saliency estimate with the measured loss change.

On the demo's trained MLP (LeNet-300-100) and CNN (digits), random groups of weights (1 and 16 per
group, 32 groups per layer) are zeroed one at a time and the calibration loss change is measured
(``secateurs.analysis.saliency_check``); each estimate's group value is correlated with it, over all
groups and within each layer.

    .venv/bin/python bench/sensitivity_saliency.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results


def main() -> None:
    from secateurs.analysis import saliency_check
    from secateurs.analysis.saliencies import ESTIMATORS
    from secateurs.demo import train_batches, trained_cnn, trained_mlp

    load = os.getloadavg()
    rows = []
    for name, factory in (("MLP", trained_mlp), ("CNN", trained_cnn)):
        for size in (1, 16):
            start = time.perf_counter()
            check = saliency_check(factory(), train_batches()[:4], groups_per_layer=32, group_size=size, progress=False)
            rows.append(
                {
                    "model": name,
                    "group_size": size,
                    "groups": len(check.measured),
                    "spearman": check.spearman,
                    "within_layers": check.spearman_within_layers,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(name, size, check.table(), sep="\n", flush=True)
    lines = [
        "| model | weights per group | groups | " + " | ".join(ESTIMATORS) + " |",
        "|---|---|---|" + "---|" * len(ESTIMATORS),
    ]
    for r in rows:
        cells = " | ".join(f"{r['spearman'][e]:.3f} ({r['within_layers'][e]:.3f})" for e in ESTIMATORS)
        lines.append(f"| {r['model']} | {r['group_size']} | {r['groups']} | {cells} |")
    print("\n".join(lines))
    write_results(
        "sensitivity_saliency", {"machine": machine(), "load_before": load, "load_after": os.getloadavg(), "rows": rows}
    )


if __name__ == "__main__":
    main()
