"""Sparse variational dropout on LeNet-300-100, digits (Molchanov et al. 2017, arXiv:1701.05369).

Protocol (per seed): train LeNet-300-100 (64-300-100-10 on sklearn's 8x8 digits, 1,347 training
images) densely with Adam; then continue from those weights with ``regularizer='sparse_vd'`` on
every layer: KL weight ``kl_scale / N`` (``--kl-scales``; 1 is the ELBO divided by the N training
images), ramped in linearly over the first third (KL warm-up), log alpha clipped at 10, weights
with log alpha > 3 pruned at test time. Compression = dense weights / nonzero weights after
``secateurs.bake``; accuracy on the 450 held-out images, deterministic (test-time) network.

Learning rate of the VD phase (``--lr-schedules``): ``constant`` 1e-3, or ``linear`` as the authors'
LeNet-300-100 script (bayesgroup/variational-dropout-sparsifies-dnn, ``optpolicy.lr_linear``):
1e-3 for the first half, then linearly down to 0 at the end. Both start from the same dense model.

Choosing the KL scale without the test set (``--validation-fraction 0.2``): a stratified split
(``--split-seed``, the same for every training seed) holds out that fraction of the training
images. Phase ``select`` trains dense + VD at every scale on the rest and picks, per seed and lr
schedule, the largest scale whose validation accuracy is at most ``--tolerance`` points below the
dense model's (trained on the same reduced set). Phase ``final`` then retrains dense + VD at every
scale on the whole training set; the row at the selected scale is the protocol's result, the other
rows are the full grid on test, for transparency. Without ``--validation-fraction`` only ``final``.
``--combine a.json b.json`` selects over the rows of runs that differ only in their KL scales.

    .venv/bin/python bench/training_sparse_vd.py [--seeds 0 1 2] [--kl-scales 1 0.5 0.25 0.1]
        [--validation-fraction 0.2] [--lr-schedules constant linear]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

import secateurs
from _common import machine, validation_split, write_results
from secateurs.demo.data import Digits, load_digits
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


def select_scale(val_drops: dict[float, float], tolerance: float) -> tuple[float, bool]:
    """Largest KL scale whose validation drop (points) is <= ``tolerance``; (scale, True).

    If none qualifies, the scale with the smallest drop (the larger on ties) and False, so the
    caller reports the miss instead of hiding it.
    """
    if not val_drops:
        raise ValueError("no KL scales to select from")
    passing = [s for s, d in val_drops.items() if d <= tolerance]
    if passing:
        return max(passing), True
    return min(val_drops, key=lambda s: (val_drops[s], -s)), False


def vd_run(dense, batches, n: int, kl_scale: float, schedule: str, vd_steps: int, seed: int, evals: dict) -> dict:
    """One sparse VD run from a copy of ``dense``: accuracies on each of ``evals`` and compression."""
    t = time.perf_counter()
    model = copy.deepcopy(dense)
    torch.manual_seed(seed)
    pruner = secateurs.Pruner(model, regularizer="sparse_vd", scope=EVERY_LAYER,
                              regularizer_options={"strength": kl_scale / n,
                                                   "strength_schedule": {"kind": "linear", "start": 0,
                                                                         "end": vd_steps // 3}})  # fmt: skip
    fit(model, batches, vd_steps, 1e-3, pruner, lr_factor(schedule, vd_steps))
    vd_acc = accuracy(model, evals["test"])
    secateurs.bake(model)
    total, nonzero = weights(model)
    per_layer = {
        name: float((p != 0).float().mean()) for name, p in model.named_parameters() if name.endswith("weight")
    }
    row = {"lr_schedule": schedule, "kl_scale": kl_scale, "kl_weight": kl_scale / n, "train_images": n,
           "vd_accuracy": vd_acc, "weights": total, "nonzero": nonzero, "compression": total / max(nonzero, 1),
           "layer_density": per_layer}  # fmt: skip
    for name, eval_batches in evals.items():
        row[f"baked_{name}_accuracy" if name != "test" else "baked_accuracy"] = accuracy(model, eval_batches)
    row.update(seconds=time.perf_counter() - t, loadavg=os.getloadavg())
    return row


def phase(seed: int, data: Digits, name: str, args, val: Digits | None = None) -> list[dict]:
    """Dense on ``data``'s training images, then VD at every (schedule, scale) from that dense model."""
    batches = data.batches(100, seed=seed)
    evals = {"test": data.batches(512, train=False)}
    if val is not None:
        evals["val"] = val.batches(512, train=False)
    torch.manual_seed(seed)
    dense = digits_mlp()
    fit(dense, batches, args.dense_steps, 1e-3)
    dense_acc = {k: accuracy(dense, b) for k, b in evals.items()}
    rows = []
    for schedule in args.lr_schedules:
        for scale in args.kl_scales:
            row = vd_run(dense, batches, len(data.x_train), scale, schedule, args.vd_steps, seed, evals)
            row.update(seed=seed, phase=name, dense_accuracy=dense_acc["test"])
            if val is not None:
                row["dense_val_accuracy"] = dense_acc["val"]
                row["val_drop_points"] = 100 * (dense_acc["val"] - row["baked_val_accuracy"])
            rows.append(row)
            print(f"[{name}] seed {seed} lr {schedule} kl x{scale:g}: dense {row['dense_accuracy']:.4f}, VD "
                  f"{row['baked_accuracy']:.4f}" + (f", val drop {row['val_drop_points']:.2f}" if val else "")
                  + f", compression {row['compression']:.1f}x ({row['nonzero']}/{row['weights']}), "
                  f"({row['seconds']:.0f} s, load {row['loadavg'][0]:.1f})", flush=True)  # fmt: skip
    return rows


def summarise(rows: list[dict], args) -> dict:
    """Per lr schedule: the selected scale per seed and the final (whole training set) figures there."""
    summary = {}
    final = [r for r in rows if r["phase"] == "final"]
    for schedule in args.lr_schedules:
        chosen = []
        for seed in args.seeds:
            scale, met = 1.0, None
            if args.validation_fraction:
                sel = {r["kl_scale"]: r["val_drop_points"] for r in rows
                       if r["phase"] == "select" and r["seed"] == seed and r["lr_schedule"] == schedule}  # fmt: skip
                scale, met = select_scale(sel, args.tolerance)
            elif 1.0 not in args.kl_scales:
                scale = args.kl_scales[0]
            row = next(
                r for r in final if r["seed"] == seed and r["lr_schedule"] == schedule and r["kl_scale"] == scale
            )
            chosen.append({"seed": seed, "kl_scale": scale, "met_tolerance": met,
                           "drop_points": 100 * (row["dense_accuracy"] - row["baked_accuracy"]),
                           "compression": row["compression"]})  # fmt: skip
        drop = [c["drop_points"] for c in chosen]
        comp = [c["compression"] for c in chosen]
        summary[schedule] = {"selected": chosen, "compression_median": statistics.median(comp),
                             "compression_min": min(comp), "accuracy_drop_points_median": statistics.median(drop),
                             "accuracy_drop_points_max": max(drop)}  # fmt: skip
    return summary


def result_name(args) -> str:
    """Today's protocol keeps its old file; any other KL grid or a validation selection gets its own."""
    name = "training_sparse_vd"
    if args.kl_scales != [1.0]:
        name += "_kl" + "-".join(f"{s:g}" for s in args.kl_scales)
    if args.validation_fraction:
        name += f"_val{args.validation_fraction:g}"
    if sorted(args.lr_schedules) != ["constant", "linear"]:
        name += "_lr-" + "-".join(args.lr_schedules)
    if list(args.seeds) != [0, 1, 2]:  # a partial run must not overwrite the three-seed protocol's file
        name += "_s" + "-".join(str(s) for s in args.seeds)
    if (args.dense_steps, args.vd_steps) != (1500, 3000):
        name += f"_d{args.dense_steps}_v{args.vd_steps}"
    return name


SAME_PROTOCOL = ("seeds", "dense_steps", "vd_steps", "lr_schedules", "validation_fraction", "split_seed", "tolerance")


def merge_runs(payloads: list[dict]) -> tuple[dict, list[dict]]:
    """(args, rows) of several runs of one protocol over disjoint KL scales, e.g. a grid extended later.

    Refuses runs that differ in anything but their scales, that share a scale, or whose dense models
    differ (each run retrains them from the same seed, so they must agree exactly).
    """
    if len(payloads) < 2:
        raise ValueError("--combine needs at least two result files")
    first = payloads[0]["args"]
    for other in payloads[1:]:
        differ = [k for k in SAME_PROTOCOL if other["args"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"runs differ in {differ}: only runs of one protocol over different KL scales combine")
    scales = [s for p in payloads for s in p["args"]["kl_scales"]]
    if len(set(scales)) != len(scales):
        raise ValueError(f"runs share KL scales {sorted(scales)}: each scale must come from one run")
    rows = [r for p in payloads for r in p["rows"]]
    dense: dict[tuple, float] = {}
    for r in rows:
        for key in ("dense_accuracy", "dense_val_accuracy"):
            if key in r and dense.setdefault((r["phase"], r["seed"], key), r[key]) != r[key]:
                raise ValueError(f"dense models differ between runs (seed {r['seed']}, {r['phase']}, {key})")
    return {**first, "kl_scales": sorted(scales, reverse=True)}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-steps", type=int, default=1500)
    parser.add_argument("--vd-steps", type=int, default=3000)
    parser.add_argument("--lr-schedules", nargs="+", choices=["constant", "linear"], default=["constant", "linear"])
    parser.add_argument("--kl-scales", "--kl-scale", type=float, nargs="+", default=[1.0],
                        help="multiplies the 1/N KL weight (1 = the ELBO per training image)")  # fmt: skip
    parser.add_argument("--validation-fraction", type=float, default=None)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.5, help="max validation drop (points) when selecting")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="no training: select over these runs' rows")
    args = parser.parse_args()
    if args.combine:
        merged, rows = merge_runs([json.loads(Path(p).read_text()) for p in args.combine])
        args = argparse.Namespace(**{**merged, "combine": args.combine})
        summary = summarise(rows, args)
        print(summary)
        write_results(result_name(args), {"machine": machine(), "args": vars(args), "rows": rows, "summary": summary})
        return
    if any(s <= 0 for s in args.kl_scales):
        parser.error(f"--kl-scales must be positive, got {args.kl_scales}")
    if args.tolerance < 0:
        parser.error(f"--tolerance must be >= 0 (points of validation accuracy), got {args.tolerance}")
    torch.set_num_threads(1)
    data = load_digits()
    rows = []
    for seed in args.seeds:
        if args.validation_fraction:
            fit_set, val = validation_split(data, args.validation_fraction, args.split_seed)
            rows += phase(seed, fit_set, "select", args, val)
        rows += phase(seed, data, "final", args)
    summary = summarise(rows, args)
    print(summary)
    write_results(result_name(args), {"machine": machine(), "loadavg": os.getloadavg(), "args": vars(args),
                                      "rows": rows, "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
