"""SparseGPT's reconstruction on models that are not LLMs: the digits MLP and CNN, one shot, no fine-tuning.

``prune(model, "sparsegpt", s, calibration=...)`` runs the OBS update on every Linear and Conv layer
in scope through the whole-model runner (a conv through its unfolded input patches, as OBC does),
against masks alone: magnitude (per layer) and Wanda (per output row), and the magnitude mask with
the OBS update (``mode='reconstruct'``), which separates what the mask choice buys from what the
update buys. "sequential" is SparseGPT's own protocol: the block runner over the model's children
(``runner='blocks', blocks=''``), each layer calibrated on the outputs of the already pruned ones.
Each model is trained (300 Adam steps), pruned at 70/80/90% with the default scope (the CNN's
first conv and both classifiers' last layer stay dense), calibrated on 512 training images, and
tested on the 450 held-out ones. Mean and std over seeds.

    .venv/bin/python bench/reconstruct_digits.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _common import machine, write_results
from secateurs import prune
from secateurs.demo.data import load_digits
from secateurs.demo.models import digits_cnn, digits_mlp
from secateurs.training import accuracy, train

METHODS = {
    "magnitude": {"method": "magnitude", "mode": "bake"},
    "wanda": {"method": "wanda", "mode": "bake"},
    "magnitude mask + OBS update": {"method": "magnitude", "mode": "reconstruct"},
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt, sequential": {"method": "sparsegpt", "runner": "blocks", "blocks": ""},
}
SPARSITIES = (0.7, 0.8, 0.9)


def run(seeds: list[int]) -> list[dict]:
    data = load_digits()
    test = data.batches(512, train=False)
    rows = []
    for name, factory in (("MLP 64-300-100-10", digits_mlp), ("CNN (3 conv + 2 linear)", digits_cnn)):
        results: dict[tuple[float, str], list[float]] = {}
        dense, seconds = [], {}
        for seed in seeds:
            torch.manual_seed(seed)
            model = factory()
            train(model, data.batches(64, seed), 300)
            dense.append(accuracy(model, test))
            calibration = data.batches(64, seed + 100)[:8]
            for sparsity in SPARSITIES:
                for method, options in METHODS.items():
                    pruned = copy.deepcopy(model)
                    start = time.perf_counter()
                    prune(pruned, sparsity=sparsity, calibration=calibration, progress=False, **options)
                    seconds.setdefault(method, []).append(time.perf_counter() - start)
                    results.setdefault((sparsity, method), []).append(accuracy(pruned, test))
        for sparsity in SPARSITIES:
            row = {"model": name, "sparsity": sparsity, "dense": statistics.mean(dense)}
            for method in METHODS:
                accs = results[(sparsity, method)]
                row[method] = statistics.mean(accs)
                row[f"{method} std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append(row)
        rows.append({"model": name, "seconds": {m: statistics.mean(v) for m, v in seconds.items()}})
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | sparsity | dense | " + " | ".join(METHODS) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(METHODS)]
    for r in rows:
        if "sparsity" not in r:
            continue
        cells = " | ".join(f"{100 * r[m]:.2f} ± {100 * r[m + ' std']:.2f}" for m in METHODS)
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {100 * r['dense']:.2f} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = run(list(range(args.seeds)))
    text = table(rows)
    print(text)
    write_results("reconstruct_digits", {"machine": machine(), "seeds": args.seeds, "rows": rows, "table": text,
                                         "total_seconds": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
