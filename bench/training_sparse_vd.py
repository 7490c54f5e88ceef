"""Sparse variational dropout on LeNet-300-100, digits (Molchanov et al. 2017, arXiv:1701.05369).

Protocol (per seed): train LeNet-300-100 (64-300-100-10 on sklearn's 8x8 digits, 1,347 training
images) densely with Adam; then continue from those weights with ``regularizer='sparse_vd'`` on
every layer: KL weight 1/N (the ELBO divided by the N training images), ramped in linearly over
the first third (KL warm-up), log alpha clipped at 10, weights with log alpha > 3 pruned at test
time. Compression = dense weights / nonzero weights after ``secateurs.bake``; accuracy on the 450
held-out images, deterministic (test-time) network. Writes bench/results/training_sparse_vd.json.

Learning rate of the VD phase (``--lr-schedules``): ``constant`` 1e-3, or ``linear`` as the authors'
LeNet-300-100 script (bayesgroup/variational-dropout-sparsifies-dnn, ``optpolicy.lr_linear``):
1e-3 for the first half, then linearly down to 0 at the end. Both start from the same dense model.

    .venv/bin/python bench/training_sparse_vd.py [--seeds 0 1 2] [--dense-steps 1500] [--vd-steps 3000]
"""

from __future__ import annotations

import argparse
import copy
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


def fit(model, batches, steps, lr, pruner=None, lr_factor=None):
    train(model, batches, steps, adam(lr), pruner, lr_factor=lr_factor)


def lr_factor(schedule: str, steps: int):
    """None (constant), or the authors' lr_linear: full rate for the first half, then linearly to 0."""
    if schedule == "constant":
        return None
    return lambda step: min(1.0, 2.0 - 2.0 * step / steps)


def weights(model) -> tuple[int, int]:
    total = nonzero = 0
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            total += p.numel()
            nonzero += int((p != 0).sum())
    return total, nonzero


def one_seed(seed: int, data, dense_steps: int, vd_steps: int, schedules: list[str]) -> list[dict]:
    batches = data.batches(100, seed=seed)
    test = data.batches(512, train=False)
    torch.manual_seed(seed)
    dense = digits_mlp()
    fit(dense, batches, dense_steps, 1e-3)
    dense_acc = accuracy(dense, test)
    n = len(data.x_train)
    rows = []
    for schedule in schedules:
        t = time.perf_counter()
        model = copy.deepcopy(dense)
        torch.manual_seed(seed)
        pruner = secateurs.Pruner(model, regularizer="sparse_vd", scope=EVERY_LAYER,
                                  regularizer_options={"strength": 1.0 / n,
                                                       "strength_schedule": {"kind": "linear", "start": 0,
                                                                             "end": vd_steps // 3}})  # fmt: skip
        fit(model, batches, vd_steps, 1e-3, pruner, lr_factor(schedule, vd_steps))
        vd_acc = accuracy(model, test)
        secateurs.bake(model)
        baked_acc = accuracy(model, test)
        total, nonzero = weights(model)
        per_layer = {
            name: float((p != 0).float().mean()) for name, p in model.named_parameters() if name.endswith("weight")
        }
        rows.append({"seed": seed, "lr_schedule": schedule, "dense_accuracy": dense_acc, "vd_accuracy": vd_acc,
                     "baked_accuracy": baked_acc, "weights": total, "nonzero": nonzero,
                     "compression": total / max(nonzero, 1), "layer_density": per_layer,
                     "seconds": time.perf_counter() - t, "loadavg": os.getloadavg()})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-steps", type=int, default=1500)
    parser.add_argument("--vd-steps", type=int, default=3000)
    parser.add_argument("--lr-schedules", nargs="+", choices=["constant", "linear"], default=["constant", "linear"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    rows = []
    for seed in args.seeds:
        for row in one_seed(seed, data, args.dense_steps, args.vd_steps, args.lr_schedules):
            rows.append(row)
            print(f"seed {seed} lr {row['lr_schedule']}: dense {row['dense_accuracy']:.4f}, sparse VD "
                  f"{row['baked_accuracy']:.4f}, compression {row['compression']:.1f}x ({row['nonzero']}/"
                  f"{row['weights']}), layer density {[f'{d:.3f}' for d in row['layer_density'].values()]} "
                  f"({row['seconds']:.0f} s, load {row['loadavg'][0]:.1f})", flush=True)  # fmt: skip
    summary = {}
    for schedule in args.lr_schedules:
        mine = [r for r in rows if r["lr_schedule"] == schedule]
        drop = [100 * (r["dense_accuracy"] - r["baked_accuracy"]) for r in mine]
        comp = [r["compression"] for r in mine]
        summary[schedule] = {"compression_median": statistics.median(comp), "compression_min": min(comp),
                             "compression_max": max(comp), "accuracy_drop_points_median": statistics.median(drop),
                             "accuracy_drop_points_max": max(drop)}  # fmt: skip
    print(summary)
    write_results("training_sparse_vd", {"machine": machine(), "loadavg": os.getloadavg(), "args": vars(args),
                                         "rows": rows, "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
