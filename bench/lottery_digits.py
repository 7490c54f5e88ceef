"""Lottery tickets on digits: IMP with rewinding vs the same masks re-initialised.

Frankle & Carbin (2019, arXiv:1803.03635) on LeNet-300-100: iterative magnitude
pruning, rewinding the survivors to their initial values after each round, finds
subnetworks that train to the dense accuracy at ~10% density, while the same
masks with fresh random weights do worse. This script reproduces that on
scikit-learn's digits, over several seeds, with the library's own Pruner and
LotteryTicket schedule. Writes bench/results/lottery_digits.json.

    .venv/bin/python bench/lottery_digits.py [--seeds 5] [--rounds 5] [--steps 800]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from _common import machine, write_results
from secateurs import LotteryTicket, Pruner
from secateurs.demo.data import load_digits
from secateurs.demo.models import digits_mlp
from secateurs.masking import attach, masked_targets
from secateurs.training import accuracy

EVERY_LAYER = {"skip_first": False, "skip_last": False}


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1.2e-3)  # Frankle & Carbin's LeNet setting


def train(model, batches, steps, on_step=None):
    optimizer = make_optimizer(model)
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if on_step is not None and on_step(step):
            optimizer = make_optimizer(model)  # rewound: fresh optimizer state
    model.eval()


def one_seed(seed: int, rounds: int, steps: int, sparsity: float, data) -> dict:
    batches = data.batches(60, seed=seed)
    test = data.batches(512, train=False)
    torch.manual_seed(seed)
    init = digits_mlp()

    dense = copy.deepcopy(init)
    train(dense, batches, steps)
    dense_acc = accuracy(dense, test)

    ticket = copy.deepcopy(init)
    pruner = Pruner(ticket, "magnitude", sparsity, allocation="global", scope=EVERY_LAYER, allow_collapse=True,
                    schedule=LotteryTicket(rounds=rounds, steps_per_round=steps, rewind_to=0))  # fmt: skip
    levels: list[dict] = []  # (density, ticket accuracy, masks)
    density = 1.0

    def on_step(step: int) -> bool:
        nonlocal density
        if (step + 1) % steps == 0 and step + 1 > steps:  # end of a round trained at `density`
            levels.append({"density": density, "ticket": accuracy(ticket, test), "masks": _masks(ticket)})
        event = pruner.step()
        if event.pruned:
            density = 1.0 - event.sparsity
        return event.rewound

    train(ticket, batches, (rounds + 1) * steps, on_step)

    for level in levels:  # the same masks, fresh random weights (Frankle & Carbin's control)
        torch.manual_seed(10_000 + seed)
        reinit = digits_mlp()
        for target in _targets(reinit):
            attach(target, level["masks"][target.name])
        train(reinit, batches, steps)
        level["reinit"] = accuracy(reinit, test)
        del level["masks"]
    return {"seed": seed, "dense": dense_acc, "levels": levels}


def _targets(model):
    from secateurs.scope import ScopeSpec, resolve

    return resolve(model, ScopeSpec(**EVERY_LAYER))


def _masks(model) -> dict[str, torch.Tensor]:
    return {t.name: t.module.parametrizations.weight[0].mask.clone() for t in masked_targets(model)}


def summarise(runs: list[dict]) -> list[dict]:
    rows = [{"density": 1.0, "ticket": [r["dense"] for r in runs], "reinit": [r["dense"] for r in runs]}]
    for i, level in enumerate(runs[0]["levels"]):
        rows.append({"density": level["density"], "ticket": [r["levels"][i]["ticket"] for r in runs],
                     "reinit": [r["levels"][i]["reinit"] for r in runs]})  # fmt: skip
    for row in rows:
        for key in ("ticket", "reinit"):
            values = row.pop(key)
            row[f"{key}_mean"] = statistics.mean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=800, help="training steps per round (and for dense)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits(seed=0)
    started = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        runs.append(one_seed(seed, args.rounds, args.steps, args.sparsity, data))
        last = runs[-1]["levels"][-1]
        print(f"seed {seed}: dense {runs[-1]['dense']:.2%}  ticket@{last['density']:.1%} {last['ticket']:.2%}  "
              f"reinit {last['reinit']:.2%}")  # fmt: skip
    rows = summarise(runs)
    print(f"\nLeNet-300-100 on digits, {args.seeds} seeds, IMP with rewinding to init, global magnitude")
    print(f"{'density':>8} {'ticket (rewind)':>18} {'random re-init':>18} {'ticket - dense':>15}")
    for row in rows:
        print(f"{row['density']:>8.1%} {row['ticket_mean']:>11.2%} ± {row['ticket_std']:.2%} "
              f"{row['reinit_mean']:>11.2%} ± {row['reinit_std']:.2%} "
              f"{(row['ticket_mean'] - rows[0]['ticket_mean']) * 100:>+13.2f}pt")  # fmt: skip
    write_results("lottery_digits", {
        "machine": machine(), "seconds": time.perf_counter() - started, "args": vars(args),
        "rows": rows, "runs": runs,
    })  # fmt: skip


if __name__ == "__main__":
    main()
