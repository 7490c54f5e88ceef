"""Every criterion against random pruning on digits, post-training and at initialisation.

Post-training: train the digits MLP, prune without fine-tuning, report test accuracy.
At initialisation: prune the fresh MLP and CNN (global allocation, every layer), then
train, as SNIP / GraSP / SynFlow do. Mean over seeds. Writes bench/results/criteria_digits.json.

    .venv/bin/python bench/criteria_digits.py [--seeds 3]
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

EVERY_LAYER = {"skip_first": False, "skip_last": False}
POST_TRAINING = ("random", "magnitude", "lamp", "gradient", "taylor", "obd", "wanda", "snip")
AT_INIT = ("random", "magnitude", "snip", "grasp", "synflow")
FILTERS = ("random", "magnitude", "activation", "apoz", "taylor")


def post_training(data, seeds, sparsities) -> list[dict]:
    batches, test = data.batches(64, 0), data.batches(512, train=False)
    rows = []
    for sparsity in sparsities:
        accs: dict[str, list[float]] = {m: [] for m in POST_TRAINING}
        dense = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = digits_mlp()
            train(model, data.batches(64, seed), 300)
            dense.append(accuracy(model, test))
            for method in POST_TRAINING:
                pruned = copy.deepcopy(model)
                prune(pruned, method, sparsity, calibration=batches[:4], progress=False, seed=seed,
                      allow_collapse=True)  # fmt: skip
                accs[method].append(accuracy(pruned, test))
        rows.append({"sparsity": sparsity, "dense": statistics.mean(dense),
                     **{m: statistics.mean(v) for m, v in accs.items()}})  # fmt: skip
    return rows


def filters(data, seeds, sparsities) -> list[dict]:
    """Whole CNN filters masked (output_channel pattern) after training, no fine-tuning."""
    test = data.batches(512, train=False)
    rows = []
    for sparsity in sparsities:
        accs: dict[str, list[float]] = {m: [] for m in FILTERS}
        for seed in seeds:
            batches = data.batches(64, seed)
            torch.manual_seed(seed)
            model = digits_cnn()
            train(model, batches, 300)
            for method in FILTERS:
                pruned = copy.deepcopy(model)
                prune(pruned, method, sparsity, pattern="output_channel", calibration=batches[:4], progress=False,
                      seed=seed, allow_collapse=True)  # fmt: skip
                accs[method].append(accuracy(pruned, test))
        rows.append({"sparsity": sparsity, **{m: statistics.mean(v) for m, v in accs.items()}})
    return rows


def at_init(data, seeds, sparsities) -> list[dict]:
    test = data.batches(512, train=False)
    rows = []
    for name, factory in (("mlp", digits_mlp), ("cnn", digits_cnn)):
        for sparsity in sparsities:
            accs: dict[str, list[float]] = {m: [] for m in AT_INIT}
            for seed in seeds:
                batches = data.batches(64, seed)
                for method in AT_INIT:
                    torch.manual_seed(seed)
                    model = factory()
                    # collapse (global magnitude at 98%) is one of the findings here, so it is allowed
                    prune(model, method, sparsity, allocation="global", scope=EVERY_LAYER, calibration=batches[:4],
                          example_inputs=data.x_test[:1], progress=False, seed=seed, allow_collapse=True)  # fmt: skip
                    train(model, batches, 300)
                    accs[method].append(accuracy(model, test))
            rows.append({"model": name, "sparsity": sparsity, **{m: statistics.mean(v) for m, v in accs.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    post = post_training(data, seeds, (0.5, 0.8, 0.9))
    print(f"post-training, MLP, no fine-tuning (mean of {len(seeds)} seeds)")
    print(f"{'sparsity':>8} {'dense':>7} " + " ".join(f"{m:>9}" for m in POST_TRAINING))
    for row in post:
        print(f"{row['sparsity']:>8.0%} {row['dense']:>7.2%} " + " ".join(f"{row[m]:>9.2%}" for m in POST_TRAINING))
    channel = filters(data, seeds, (0.3, 0.5))
    print(f"\nCNN filters (output_channel), after training, no fine-tuning ({len(seeds)} seeds)")
    print(f"{'sparsity':>8} " + " ".join(f"{m:>10}" for m in FILTERS))
    for row in channel:
        print(f"{row['sparsity']:>8.0%} " + " ".join(f"{row[m]:>10.2%}" for m in FILTERS))
    init = at_init(data, seeds, (0.9, 0.95, 0.98))
    print(f"\nat initialisation, global allocation over every layer, then 300 training steps ({len(seeds)} seeds)")
    print(f"{'model':<5} {'sparsity':>8} " + " ".join(f"{m:>9}" for m in AT_INIT))
    for row in init:
        print(f"{row['model']:<5} {row['sparsity']:>8.0%} " + " ".join(f"{row[m]:>9.2%}" for m in AT_INIT))
    payload = {"machine": machine(), "seconds": time.perf_counter() - started, "seeds": seeds}
    write_results("criteria_digits", {**payload, "post_training": post, "filters": channel, "at_init": init})


if __name__ == "__main__":
    main()
