"""Group lasso + removal and network slimming + removal vs one-shot L1 channel removal, on a CNN (digits).

Per seed, from one dense ``digits_cnn`` (conv 32-64-64 with BatchNorm, fc 128) trained for
``--pretrain`` Adam steps, three arms get the same budget of ``--sparsify`` SGD steps (lr 0.05,
momentum 0.9) and ``--finetune`` Adam steps after removal:

- **group lasso** (Wen et al. 2016): ``regularizer='group_lasso'`` over the dependency graph's coupled
  channel groups (a filter, its BatchNorm entries, the next layer's columns), proximal step (exact
  zeros), then ``remove_zero_groups`` (outputs unchanged by the removal itself), then fine-tuning;
- **network slimming** (Liu et al. 2017): ``regularizer='bn_l1'`` with its proximal step, then
  ``method='bn_scale', mode='remove'`` at the fraction of scales that reached zero, then fine-tuning;
- **one-shot L1** (Li et al. 2017): the same SGD steps without a penalty, then
  ``method='magnitude', mode='remove'`` (L1 norm of each coupled channel group, global ranking) at
  the *same parameter count* as the arm it is compared with (found by bisection inside
  ``secateurs.trial``), then the same fine-tuning.

The first conv and the classifier are out of scope for every arm (the library's default scope).
Accuracy on the 450 held-out images; latency of each pruned model vs the dense one, paired
alternating runs on a batch of 256 (the machine is shared: see the load average). Writes
bench/results/training_group_sparsity_cnn.json.

    .venv/bin/python bench/training_group_sparsity_cnn.py [--seeds 0 1 2] [--no-latency]
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
from secateurs.demo.models import digits_cnn
from secateurs.evaluation import compare_latency
from secateurs.training import accuracy, remove_zero_groups, train
from secateurs.training.finetune import adam


def fit(model, batches, steps, pruner=None, sgd=False):
    sgd_momentum = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731
    train(model, batches, steps, sgd_momentum if sgd else adam(1e-3), pruner)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def widths(model) -> str:
    return f"{model.conv1.out_channels}-{model.conv2.out_channels}-{model.conv3.out_channels}-{model.fc.out_features}"


def l1_removal_at(model, target_params: int, x) -> float:
    """The one-shot L1 channel-removal sparsity whose removed model has ``target_params`` parameters."""
    low, high = 0.0, 0.95
    for _ in range(12):
        mid = (low + high) / 2
        with secateurs.trial(model):
            secateurs.prune(model, "magnitude", mid, mode="remove", example_inputs=x, progress=False,
                            structural={"latency": False})  # fmt: skip
            count = params(model)
        low, high = (mid, high) if count > target_params else (low, mid)
    return high


def one_seed(seed: int, data, args) -> list[dict]:
    batches = data.batches(64, seed=seed)
    test = data.batches(512, train=False)
    x = data.x_test[:256]
    torch.manual_seed(seed)
    dense = digits_cnn()
    fit(dense, batches, args.pretrain)
    rows = [{"seed": seed, "arm": "dense", "accuracy": accuracy(dense, test), "params": params(dense),
             "widths": widths(dense), "speedup": 1.0}]  # fmt: skip

    def finish(arm: str, model, started: float, extra: dict) -> dict:
        before = accuracy(model, test)
        fit(model, batches, args.finetune)
        lat = compare_latency(dense, model, x, repeats=30) if args.latency else None
        row = {
            "seed": seed,
            "arm": arm,
            "accuracy_before_finetune": before,
            "accuracy": accuracy(model, test),
            "params": params(model),
            "widths": widths(model),
            "speedup": lat.speedup.median if lat else None,
            "speedup_q1_q3": [lat.speedup.q1, lat.speedup.q3] if lat else None,
            "seconds": time.perf_counter() - started,
            "loadavg": os.getloadavg(),
            **extra,
        }
        print(
            f"seed {seed} {arm:>22}: {row['widths']:>14} params {row['params']:>6}, accuracy "
            f"{row['accuracy']:.4f} (before fine-tuning {before:.4f}), speed-up "
            f"{'-' if lat is None else f'{lat.speedup.median:.2f}x'} (load {row['loadavg'][0]:.1f})",
            flush=True,
        )
        return row

    t = time.perf_counter()
    lasso = copy.deepcopy(dense)
    pruner = secateurs.Pruner(lasso, regularizer="group_lasso", example_inputs=x[:2],
                              regularizer_options={"strength": args.lasso, "proximal_lr": 0.05})  # fmt: skip
    fit(lasso, batches, args.sparsify, pruner, sgd=True)
    zero = pruner.regularization_report()
    removed = remove_zero_groups(lasso, x[:2])
    rows.append(finish("group lasso + removal", lasso, t, {"zero_groups": zero.zero, "removed": removed.removed}))

    t = time.perf_counter()
    slim = copy.deepcopy(dense)
    pruner = secateurs.Pruner(
        slim, regularizer="bn_l1", regularizer_options={"strength": args.slim, "proximal_lr": 0.05}
    )
    fit(slim, batches, args.sparsify, pruner, sgd=True)
    zero_scales = int(sum(int((m.weight == 0).sum()) for n, m in slim.named_modules() if n in ("bn2", "bn3")))
    in_scope = slim.bn2.num_features + slim.bn3.num_features  # conv1's channels are out of the default scope
    secateurs.prune(slim, "bn_scale", zero_scales / in_scope, mode="remove", example_inputs=x[:2], progress=False,
                    scope={"exclude": ["fc", "classifier"]}, structural={"latency": False})  # fmt: skip
    rows.append(finish("slimming + removal", slim, t, {"zero_scales": zero_scales}))

    plain = copy.deepcopy(dense)
    fit(plain, batches, args.sparsify, sgd=True)
    for arm in ("group lasso + removal", "slimming + removal"):
        t = time.perf_counter()
        target = next(r["params"] for r in rows if r["arm"] == arm)
        model = copy.deepcopy(plain)
        sparsity = l1_removal_at(model, target, x[:2])
        secateurs.prune(model, "magnitude", sparsity, mode="remove", example_inputs=x[:2], progress=False,
                        structural={"latency": False})  # fmt: skip
        rows.append(finish(f"L1 one-shot @ {arm.split(' +')[0]}", model, t, {"sparsity": sparsity}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain", type=int, default=300)
    parser.add_argument("--sparsify", type=int, default=300)
    parser.add_argument("--finetune", type=int, default=150)
    parser.add_argument("--lasso", type=float, default=0.12)
    parser.add_argument("--slim", type=float, default=0.25)
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="accuracy and sizes only (latency on a shared machine is noise)")  # fmt: skip
    parser.add_argument("--name", default="training_group_sparsity_cnn", help="bench/results/<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits()
    rows = []
    for seed in args.seeds:
        rows += [{**r, "loadavg": os.getloadavg()} for r in one_seed(seed, data, args)]
    summary = {}
    keys = ("accuracy", "params", "speedup") if args.latency else ("accuracy", "params")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        own = [r for r in rows if r["arm"] == arm]
        summary[arm] = {k: statistics.median(r[k] for r in own) for k in keys}
    print(summary)
    write_results(args.name, {"machine": machine(), "loadavg": os.getloadavg(), "args": vars(args), "rows": rows,
                              "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
