"""FBS (Feature Boosting and Suppression) on a digits CNN: MACs saved, accuracy, batch-1 latency vs dense.

The CNN (5 conv layers with BatchNorm, 16x16 inputs: sklearn's 8x8 digits upsampled 2x) is trained
dense, then FBS gates every conv but the first at each ``--density`` (``Pruner(regularizer='fbs')``) and
the gated copy is fine-tuned for ``--finetune`` epochs, the Pruner driving FBS's saliency lasso
(Gao et al. 2019, arXiv:1810.05331, section 3.3).
MACs are counted per test sample from the channels actually computed (output channels kept x input
channels not zero), predictors included; batch-1 latency alternates dense and gated runs
(``secateurs.evaluation.compare_latency``) on the shared, busy machine.

    .venv/bin/python bench/dynamic_fbs_digits.py [--epochs 8] [--finetune 8] [--density 0.5 0.35]
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

BENCH = Path(__file__).resolve().parent


def cnn() -> nn.Sequential:
    torch.manual_seed(0)

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


def data():
    from secateurs.demo.data import load_digits

    d = load_digits()
    up = lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    return up(d.x_train), d.y_train, up(d.x_test), d.y_test


def train(model, x, y, epochs: int, pruner=None, lr: float = 2e-3) -> None:
    """Adam with a cosine schedule; a ``Pruner(regularizer='fbs')`` drives FBS's lasso (its gradient enters
    during ``backward()``; ``regularize()`` checks it) exactly as it would in a user's loop."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if pruner is not None:
                pruner.regularize()
            opt.step()
            sched.step()
            if pruner is not None:
                pruner.step()
    model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--finetune", type=int, default=8)
    p.add_argument("--density", type=float, nargs="+", default=[0.5, 0.35])
    p.add_argument("--strength", type=float, default=1e-4, help="lasso strength on the saliencies")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    sys.path.insert(0, str(BENCH))
    from _common import machine, write_results
    from secateurs import Pruner
    from secateurs.evaluation import compare_latency, count_macs

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    x, y, xt, yt = data()
    dense = cnn()
    train(dense, x, y, args.epochs)
    dense_acc = accuracy(dense, xt, yt)
    dense_macs = count_macs(dense, xt[:1]).total
    print(f"dense: accuracy {dense_acc:.2%}, {dense_macs / 1e6:.2f} M MACs per sample", flush=True)
    rows = []
    for density in args.density:
        gated = copy.deepcopy(dense)
        pruner = Pruner(gated, regularizer="fbs", regularizer_options={"density": density, "strength": args.strength})
        fbs = pruner.config.regularizer_.fbs
        train(gated, x, y, args.finetune, pruner, lr=1e-3)
        fbs.reset_counts()
        with torch.no_grad():  # batch-1 forwards: the path that computes only the kept channels
            correct = sum(int(gated(xt[i : i + 1]).argmax(1) == yt[i]) for i in range(len(xt)))
        macs = fbs.macs(len(xt))
        batched_acc = accuracy(gated, xt, yt)
        gated_total = dense_macs - macs.dense + macs.computed + macs.predictors
        latency = compare_latency(dense, gated, xt[:1], repeats=args.repeats, warmup=5)
        row = {
            "density": density,
            "accuracy": correct / len(xt),
            "accuracy_batched_path": batched_acc,
            "macs_total": gated_total,
            "mac_reduction_model": dense_macs / gated_total,
            "mac_reduction_gated_layers": macs.reduction,
            "latency_dense_ms": latency.dense_s.median * 1e3,
            "latency_fbs_ms": latency.pruned_s.median * 1e3,
            "speedup": latency.speedup.__dict__,
            "load_average": os.getloadavg()[0],
        }
        rows.append(row)
        print(
            f"density {density}: accuracy {row['accuracy']:.2%} (dense {dense_acc:.2%}), MACs "
            f"{dense_macs / gated_total:.2f}x fewer, batch-1 latency {row['latency_dense_ms']:.3f} -> "
            f"{row['latency_fbs_ms']:.3f} ms ({latency.speedup.median:.2f}x)",
            flush=True,
        )
    lines = [
        "| channels kept | accuracy (dense) | accuracy loss | M MACs / sample (dense) | fewer MACs (model) "
        "| fewer MACs (gated layers, predictors incl.) | batch-1 latency dense -> FBS | speed-up (IQR) | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["speedup"]
        lines.append(
            f"| {r['density']:.0%} | {r['accuracy']:.2%} ({dense_acc:.2%}) "
            f"| {(dense_acc - r['accuracy']) * 100:+.2f} pt "
            f"| {r['macs_total'] / 1e6:.2f} ({dense_macs / 1e6:.2f}) | **{r['mac_reduction_model']:.2f}x** "
            f"| {r['mac_reduction_gated_layers']:.2f}x | {r['latency_dense_ms']:.3f} -> {r['latency_fbs_ms']:.3f} ms "
            f"| {s['median']:.2f}x ({s['q1']:.2f}-{s['q3']:.2f}) | {r['load_average']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(
        "dynamic_fbs_digits",
        {
            "machine": machine(),
            "threads": args.threads,
            "epochs": args.epochs,
            "finetune_epochs": args.finetune,
            "strength": args.strength,
            "dense_accuracy": dense_acc,
            "dense_macs": dense_macs,
            "test_samples": len(xt),
            "rows": rows,
            "table": table,
            "seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main()
