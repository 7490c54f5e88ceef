"""Why hard movement collapses on MiniLM at a short budget: the train loss every 10 steps, and how far
the movement mask agrees with magnitude's.

Runs the word-order protocol of ``training_movement_minilm.py`` (seed 0, lr 1e-4, batch 16, the
200-step cubic schedule) for ``--steps`` steps with ``Pruner(model, method, target)``, then, per
encoder matrix, the overlap of the kept weights with the same number of largest-|W| weights (50% is
what a random mask of that density gets at 50%) and the share of the |W| mass kept. Prints only.

    .venv/bin/python bench/training_movement_trace.py --steps 60 --method movement  # and --method magnitude
"""

from __future__ import annotations

import argparse

import torch

import secateurs
from secateurs.training import train
from segment_pairs import PairClassifier, single_batches, word_order
from structural_models import SHARED, minilm, minilm_tokenizer
from training_movement_minilm import SCOPE, optimizer_for, schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--method", choices=["movement", "magnitude"], default="movement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = single_batches(minilm_tokenizer(), word_order(SHARED / "data" / "pydoc-calib.txt", 200 * 16, 20, 0), 16, 64)
    model = PairClassifier(minilm(), 0)
    extra = {"regularizer": "movement"} if args.method == "movement" else {}
    pruner = secateurs.Pruner(model, args.method, args.target, schedule=schedule(200), scope=SCOPE, **extra)
    torch.manual_seed(0)
    losses = train(model, data, args.steps, optimizer_for(pruner, 1e-4, 1e-2), pruner=pruner)
    print("train loss per 10 steps:", [round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 3)
                                       for i in range(0, args.steps, 10)])  # fmt: skip
    overlap = mass = 0.0
    zeros = total = count = 0
    for module in model.encoder.encoder.layer.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        kept = (module.weight != 0).flatten()
        zeros, total = zeros + int((~kept).sum()), total + kept.numel()
        if kept.all():
            continue
        magnitude = module.parametrizations.weight.original.detach().abs().flatten()  # pruned values too
        top = torch.zeros_like(kept)
        top[magnitude.topk(int(kept.sum())).indices] = True
        overlap += float((kept & top).sum() / kept.sum())
        mass += float(magnitude[kept].sum() / magnitude.sum())
        count += 1
    print(f"encoder sparsity {zeros / total:.3f}; {count} matrices masked; kept weights among the largest |W|: "
          f"{overlap / max(count, 1):.1%}; |W| mass kept {mass / max(count, 1):.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
