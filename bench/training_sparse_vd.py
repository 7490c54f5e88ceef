"""Sparse variational dropout on LeNet-300-100, digits (Molchanov et al. 2017, arXiv:1701.05369).

Protocol (per seed): train LeNet-300-100 (64-300-100-10 on sklearn's 8x8 digits, 1,347 training
images) densely with Adam; then continue from those weights with ``regularizer='sparse_vd'`` on
every layer: KL weight 1/N (the ELBO divided by the N training images), ramped in linearly over
the first third (KL warm-up), log alpha clipped at 10, weights with log alpha > 3 pruned at test
time. Compression = dense weights / nonzero weights after ``secateurs.bake``; accuracy on the 450
held-out images, deterministic (test-time) network. Writes bench/results/training_sparse_vd.json.

    .venv/bin/python bench/training_sparse_vd.py [--seeds 3] [--dense-steps 1500] [--vd-steps 3000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import secateurs
from _common import machine, write_results
from secateurs.demo.data import load_digits
from secateurs.demo.models import digits_mlp
from secateurs.training import accuracy, train
from secateurs.training.finetune import adam

EVERY_LAYER = {"skip_first": False, "skip_last": False}


def fit(model, batches, steps, lr, pruner=None):
    train(model, batches, steps, adam(lr), pruner)


def weights(model) -> tuple[int, int]:
    total = nonzero = 0
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            total += p.numel()
            nonzero += int((p != 0).sum())
    return total, nonzero


def one_seed(seed: int, data, dense_steps: int, vd_steps: int) -> dict:
    batches = data.batches(100, seed=seed)
    test = data.batches(512, train=False)
    torch.manual_seed(seed)
    model = digits_mlp()
    t = time.perf_counter()
    fit(model, batches, dense_steps, 1e-3)
    dense_acc = accuracy(model, test)
    n = len(data.x_train)
    pruner = secateurs.Pruner(model, regularizer="sparse_vd", scope=EVERY_LAYER,
                              regularizer_options={"strength": 1.0 / n,
                                                   "strength_schedule": {"kind": "linear", "start": 0,
                                                                         "end": vd_steps // 3}})  # fmt: skip
    fit(model, batches, vd_steps, 1e-3, pruner)
    vd_acc = accuracy(model, test)
    secateurs.bake(model)
    baked_acc = accuracy(model, test)
    total, nonzero = weights(model)
    per_layer = {
        name: float((p != 0).float().mean()) for name, p in model.named_parameters() if name.endswith("weight")
    }
    return {"seed": seed, "dense_accuracy": dense_acc, "vd_accuracy": vd_acc, "baked_accuracy": baked_acc,
            "weights": total, "nonzero": nonzero, "compression": total / max(nonzero, 1),
            "layer_density": per_layer, "seconds": time.perf_counter() - t}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dense-steps", type=int, default=1500)
    parser.add_argument("--vd-steps", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    rows = []
    for seed in range(args.seeds):
        row = one_seed(seed, data, args.dense_steps, args.vd_steps)
        rows.append(row)
        print(f"seed {seed}: dense {row['dense_accuracy']:.4f}, sparse VD {row['baked_accuracy']:.4f}, "
              f"compression {row['compression']:.1f}x ({row['nonzero']}/{row['weights']}), "
              f"layer density {[f'{d:.3f}' for d in row['layer_density'].values()]} ({row['seconds']:.0f} s)",
              flush=True)  # fmt: skip
    drop = [100 * (r["dense_accuracy"] - r["baked_accuracy"]) for r in rows]
    comp = [r["compression"] for r in rows]
    summary = {"compression_median": statistics.median(comp), "compression_min": min(comp),
               "compression_max": max(comp), "accuracy_drop_points_median": statistics.median(drop),
               "accuracy_drop_points_max": max(drop)}  # fmt: skip
    print(summary)
    write_results("training_sparse_vd", {"machine": machine(), "loadavg": os.getloadavg(), "args": vars(args),
                                         "rows": rows, "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
