"""Channel removal under a measured-latency budget of 0.5x dense: sensitivity knapsack vs uniform.

A ResNet-18 layout at half width (``structural_models.resnet_like``, 32x32 inputs) trained briefly on
scikit-learn's digits (8x8 upsampled to 32x32, three channels). The sensitivity analysis removes
each group of coupled channels alone at 25/50/75%, measuring the loss on calibration batches and
the latency of the whole model timed alternately with its dense copy (batch of 8): the latency
table. The knapsack solves for 0.5x dense latency, the result is measured, and the budget is
corrected by asked/achieved for up to three rounds (``fit_budget``). Uniform removal is then set
to the *same measured latency* (bisection on its sparsity, each step measured), and both are
compared on held-out accuracy before and after the same short fine-tune. Every latency in the
table is a fresh paired measurement against the dense model in this run.

    .venv/bin/python bench/sensitivity_cnn_latency.py [--train-steps 300] [--finetune-steps 100]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results
from structural_models import BasicBlock, resnet_like

BATCH = 8


def small_resnet(width: int, classes: int = 10) -> nn.Module:
    """``resnet_like``'s layout (ResNet-18: 2 basic blocks per stage, 4 stages) at base width ``width``."""
    if width == 32:
        return resnet_like(classes)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def _digits(size: int):
    from secateurs.demo.trained import digits

    d = digits(0)

    def up(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(d.x_train), generator=g)
    train = [(up(d.x_train[order[i : i + 64]]), d.y_train[order[i : i + 64]]) for i in range(0, len(order), 64)]
    test = [(up(d.x_test[i : i + 150]), d.y_test[i : i + 150]) for i in range(0, len(d.x_test), 150)]
    return train, test


def _latency(dense, pruned, inputs, repeats=25):
    from secateurs.evaluation import compare_latency

    c = compare_latency(dense, pruned, inputs, repeats=repeats)
    return {
        "ratio": 1.0 / c.speedup.median,
        "speedup_iqr": [c.speedup.q1, c.speedup.q3],
        "dense_ms": c.dense_s.median * 1e3,
        "pruned_ms": c.pruned_s.median * 1e3,
    }


def _removed(model, sparsities: dict[str, float], inputs):
    import secateurs

    pruned = copy.deepcopy(model)
    allocation = {name: s for name, s in sparsities.items() if s > 0}
    if allocation:
        secateurs.prune(
            pruned,
            "magnitude",
            mode="remove",
            allocation=allocation,
            example_inputs=inputs,
            structural={"latency": False},
            progress=False,
        )
    return pruned


def _uniform(model, sparsity: float, inputs):
    import secateurs

    pruned = copy.deepcopy(model)
    secateurs.prune(
        pruned,
        "magnitude",
        sparsity,
        mode="remove",
        example_inputs=inputs,
        structural={"latency": False},
        progress=False,
    )
    return pruned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", dest="train_steps", type=int, default=300)
    p.add_argument("--finetune-steps", dest="finetune_steps", type=int, default=100)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--width", type=int, default=32, help="base width (32: structural_models.resnet_like)")
    p.add_argument("--size", type=int, default=32, help="input side (digits upsampled from 8x8)")
    p.add_argument("--batch", type=int, default=BATCH, help="batch of the latency measurements")
    p.add_argument("--repeats", type=int, default=9, help="paired dense/pruned runs per latency measurement")
    args = p.parse_args()
    from secateurs.analysis import fit_budget, sensitivity
    from secateurs.training import accuracy, train

    load = [os.getloadavg()]
    torch.manual_seed(0)
    train_batches, test_batches = _digits(args.size)
    model = small_resnet(args.width)
    start = time.perf_counter()
    train(model, train_batches, args.train_steps)
    model.eval()
    train_seconds = time.perf_counter() - start
    dense_accuracy = accuracy(model, test_batches)
    inputs = torch.cat([x for x, _ in train_batches])[: args.batch]
    print(f"trained in {train_seconds:.0f} s: dense accuracy {dense_accuracy:.4f}", flush=True)

    start = time.perf_counter()
    profile = sensitivity(
        model,
        train_batches[:4],
        targets="groups",
        sparsities=(0.25, 0.5, 0.75),
        costs=("params", "macs", "latency"),
        example_inputs=inputs,
        latency_repeats=args.repeats,
        progress=False,
    )
    analysis_seconds = time.perf_counter() - start
    print(profile.table(), flush=True)
    print(f"analysis: {len(profile.cells)} cells in {analysis_seconds:.0f} s", flush=True)

    def measure(sparsities):
        return _latency(model, _removed(model, sparsities, inputs), inputs, repeats=args.repeats)["ratio"]

    sparsities, history = fit_budget(profile, {"latency": args.budget}, measure, rounds=3, tolerance=0.03)
    print(f"fit rounds: {history}", flush=True)
    ours = _removed(model, sparsities, inputs)

    low, high, rounds = 0.0, 0.9, []
    target = history[-1]["achieved"]  # uniform at the same measured latency as ours
    for _ in range(6):
        mid = (low + high) / 2
        ratio = _latency(model, _uniform(model, mid, inputs), inputs, repeats=args.repeats)["ratio"]
        rounds.append({"sparsity": mid, "ratio": ratio})
        low, high = (mid, high) if ratio > target else (low, mid)
    best = min(rounds, key=lambda r: abs(r["ratio"] - target))
    uniform = _uniform(model, best["sparsity"], inputs)
    load.append(os.getloadavg())

    rows = []
    for name, pruned in (("sensitivity (knapsack)", ours), (f"uniform {best['sparsity']:.3f}", uniform)):
        latency = _latency(model, pruned, inputs)
        before = accuracy(pruned, test_batches)
        tuned = copy.deepcopy(pruned)
        tuned.train()
        train(tuned, train_batches, args.finetune_steps)
        tuned.eval()
        after = accuracy(tuned, test_batches)
        params = sum(p.numel() for p in pruned.parameters())
        rows.append({"allocation": name, **latency, "params": params, "accuracy": before, "accuracy_finetuned": after})
        print(rows[-1], flush=True)
    load.append(os.getloadavg())
    result = {
        "machine": machine(),
        "width": args.width,
        "size": args.size,
        "batch": args.batch,
        "load": load,
        "budget": args.budget,
        "dense_accuracy": dense_accuracy,
        "dense_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "analysis_seconds": analysis_seconds,
        "fit_history": history,
        "uniform_search": rounds,
        "sensitivity_sparsities": sparsities,
        "rows": rows,
        "profile": profile.to_dict(),
    }
    print(table(result))
    write_results("sensitivity_cnn_latency", result)


def table(r: dict) -> str:
    lines = [
        f"dense accuracy {r['dense_accuracy']:.4f}, {r['dense_params']} params; budget {r['budget']}x dense latency",
        "| allocation | latency / dense (median) | speed-up IQR | params | accuracy | after fine-tune |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        q1, q3 = row["speedup_iqr"]
        lines.append(
            f"| {row['allocation']} | {row['ratio']:.3f} | {q1:.2f}-{q3:.2f}x | {row['params']} | "
            f"{row['accuracy']:.4f} | {row['accuracy_finetuned']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
