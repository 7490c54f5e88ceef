"""L0 hard-concrete gates on a LeNet-5-like CNN, digits (Louizos et al. 2018, arXiv:1712.01312).

Model: conv1 (1->20, 3x3) - pool - conv2 (20->50, 3x3) - pool - fc1 (200->500) - fc2 (500->10) on
sklearn's 8x8 digits (the paper's LeNet-5-Caffe, shrunk to 8x8 inputs). Gates, as in the paper's
group sparsity, on the *inputs* of conv2 (= conv1's channels), of fc1 in blocks of 2x2 = 4 columns
(= conv2's channels, flattened) and of fc2 (= fc1's neurons); stretch (-0.1, 1.1), beta = 2/3,
expected-L0 penalty, trained from scratch. Then ``secateurs.bake`` folds the test-time gates into
the weights and ``remove_zero_groups`` takes out every channel / neuron nothing reads. Reported:
the architecture that comes out, accuracy (dense trained for the same steps, gated, removed) and
the latency of the removed model vs the dense one (paired, alternating runs, batch 256). Writes
bench/results/training_l0_lenet5.json.

    .venv/bin/python bench/training_l0_lenet5.py [--seeds 3] [--steps 1500] [--strength 2e-5] [--name NAME]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import OrderedDict

import torch
from torch import nn

import secateurs
from _common import machine, write_results
from secateurs.demo.data import load_digits
from secateurs.evaluation import compare_latency
from secateurs.training import accuracy, remove_zero_groups, train


def lenet5() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 20, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(20, 50, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(200, 500)), ("relu3", nn.ReLU()), ("fc2", nn.Linear(500, 10)),
    ]))  # fmt: skip


def fit(model, batches, steps, lr, pruner=None, gate_lr=1e-2):
    # the gates' log alpha learns 10x faster than the weights: with Adam, a gate needs ~2.4 / lr steps to
    # close from its initial drop rate of 0.5, and our budget is a few thousand steps, not the paper's 200 epochs
    gates = [p for n, p in model.named_parameters() if n.endswith("log_alpha")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("log_alpha")]
    train(
        model,
        batches,
        steps,
        lambda _: torch.optim.Adam([{"params": rest}, {"params": gates, "lr": gate_lr}], lr=lr),
        pruner,
    )


def architecture(model) -> str:
    return f"{model.conv1.out_channels}-{model.conv2.out_channels}-{model.fc1.out_features}"


def one_seed(seed: int, data, steps: int, strength: float) -> dict:
    batches = data.batches(100, seed=seed)
    test = data.batches(512, train=False)
    t = time.perf_counter()
    torch.manual_seed(seed)
    dense = lenet5()
    fit(dense, batches, steps, 1e-3)
    torch.manual_seed(seed)
    model = lenet5()
    pruner = secateurs.Pruner(model, regularizer="l0", scope={"include": ["conv2", "fc1", "fc2"], "skip_last": False},
                              regularizer_options={"strength": strength, "granularity": "neuron",
                                                   "blocks": {"fc1": 4}})  # fmt: skip
    fit(model, batches, steps, 1e-3, pruner)
    gated_acc = accuracy(model, test)
    secateurs.bake(model)
    x = data.x_test[:256]
    removed = remove_zero_groups(model, x)
    params = (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in model.parameters()))
    latency = compare_latency(dense, model, x, repeats=30)
    return {"seed": seed, "dense_accuracy": accuracy(dense, test), "gated_accuracy": gated_acc,
            "removed_accuracy": accuracy(model, test), "architecture": architecture(model),
            "removed_units": removed.removed, "params_dense": params[0], "params_removed": params[1],
            "latency_speedup_median": latency.speedup.median,
            "latency_speedup_iqr": [latency.speedup.q1, latency.speedup.q3],
            "seconds": time.perf_counter() - t}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--strength", type=float, default=2e-5)
    parser.add_argument("--name", default="training_l0_lenet5", help="bench/results/<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    rows = []
    for seed in range(args.seeds):
        row = one_seed(seed, data, args.steps, args.strength)
        row["loadavg"] = os.getloadavg()  # right after this seed's latency measurement
        rows.append(row)
        print(f"seed {seed}: 20-50-500 -> {row['architecture']}, accuracy dense {row['dense_accuracy']:.4f} / gated "
              f"{row['gated_accuracy']:.4f} / removed {row['removed_accuracy']:.4f}, params {row['params_dense']} -> "
              f"{row['params_removed']}, speed-up {row['latency_speedup_median']:.2f}x ({row['seconds']:.0f} s)",
              flush=True)  # fmt: skip
    write_results(args.name, {"machine": machine(), "loadavg": os.getloadavg(), "args": vars(args),
                              "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
