"""Movement vs magnitude pruning while fine-tuning the pretrained MiniLM encoder (Sanh et al. 2020).

Task (``--task``, built in ``segment_pairs.py`` from the Python-docs text; train examples from
``pydoc-calib.txt``, dev examples from ``pydoc-test.txt``, no shared document; balanced labels, so
the initial loss is ln 2 and the movement scores have a signal from the first step):

- **word_order** (default): is this 20-word segment in its original order or a permutation of its
  words? One segment per example (max 64 tokens), a fresh two-class head on the mean-pooled
  all-MiniLM-L6-v2 encoder. The dense model learns it within 200 steps of batch 16 and it carries
  across documents; the frozen embeddings (``--methods frozen``: only the head trains) do far worse;
- **same_section**: are two segments of the same section (negatives from a section at most
  ``--near`` away)? Bi-encoder, SBERT head on (u, v, |u-v|, u*v). Fine-tuning fits the training
  file but did not carry over to the dev file (RESULTS.md), so it is kept for the record only;
- **adjacent**: does segment B directly follow segment A? Cross-encoder; too slow to learn here.

Every arm fine-tunes the same pretrained encoder with the same batches, steps, Adam learning rate
and seed; the pruned scope is every Linear of the six encoder blocks (36 matrices, 10.6M weights;
embeddings and the head stay dense), each matrix pruned to the target (the paper's local top-v):

- **dense**: no pruning (the reference);
- **magnitude**: ``Pruner(model, 'magnitude', s, schedule=cubic)`` (gradual magnitude pruning);
- **movement** (hard): ``Pruner(model, 'movement', s, regularizer='movement', schedule=cubic)``;
- **soft_movement**: ``Pruner(model, regularizer='soft_movement', strength=lambda)`` with the
  strength on the same cubic ramp and the scores at their own learning rate (the paper: 1e-2);
  its sparsity is not set but reached, so each lambda is reported at the sparsity it reached.

The cubic schedule has the paper's warm-ups: dense for the first 10% of the steps, cubic up to the
target at 70%, then fine-tuning at the target. Writes bench/results/<--name>.json.

    .venv/bin/python bench/training_movement_minilm.py --methods dense magnitude movement --seeds 0

Cells can run in separate processes (``--name`` per process); ``--merge NAME ...`` then reads their
JSONs, prints the table and writes them together as bench/results/<--name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import secateurs
from _common import RESULTS, machine, write_results
from secateurs.training import train
from segment_pairs import (
    BiEncoderClassifier,
    PairClassifier,
    batches,
    bi_batches,
    evaluate,
    pairs,
    same_section_pairs,
    single_batches,
    word_order,
)
from structural_models import SHARED, minilm, minilm_tokenizer

SCOPE = {"include": ["encoder.encoder.layer"], "skip_last": False}


def schedule(steps: int) -> dict:
    start, end = steps // 10 // 5 * 5, int(steps * 0.7) // 5 * 5
    return {"kind": "cubic", "start": start, "end": end, "every": 5}


def optimizer_for(pruner, lr: float, score_lr: float):
    """Adam; soft movement's scores in their own group at ``score_lr`` (the paper's separate rate)."""
    reg = getattr(pruner.config, "regularizer_", None) if pruner is not None else None
    scores = reg.score_parameters() if reg is not None and reg.name == "soft_movement" else []
    ids = {id(p) for p in scores}

    def make(params):
        rest = [p for p in params if id(p) not in ids]
        groups = [{"params": rest, "lr": lr}] + ([{"params": scores, "lr": score_lr}] if scores else [])
        return torch.optim.Adam(groups)

    return make


def encoder_sparsity(model) -> float:
    """Zeros the encoder blocks' Linear layers compute with now (masks and gates included)."""
    total = zeros = 0
    for module in model.encoder.encoder.layer.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel()
            zeros += int((module.weight.detach() == 0).sum())
    return zeros / total


def task_data(tokenizer, args, seed: int) -> tuple[list[dict], list[dict]]:
    """Train batches (``pydoc-calib.txt``, ``seed``) and dev batches (``pydoc-test.txt``, fixed seed) of ``--task``."""
    calib, test = SHARED / "data" / "pydoc-calib.txt", SHARED / "data" / "pydoc-test.txt"
    count = args.steps * args.batch
    if args.task == "word_order":
        train_data, dev_data = word_order(calib, count, 20, seed), word_order(test, args.dev_pairs, 20, 1000)
        return single_batches(tokenizer, train_data, args.batch, args.max_length), single_batches(
            tokenizer, dev_data, 64, args.max_length
        )
    if args.task == "adjacent":
        train_pairs, dev_pairs = pairs(calib, count, 20, seed), pairs(test, args.dev_pairs, 20, 1000)
        make = batches
    else:
        train_pairs = same_section_pairs(calib, count, 20, seed, args.near)
        dev_pairs = same_section_pairs(test, args.dev_pairs, 20, 1000, args.near)
        make = bi_batches
    return make(tokenizer, train_pairs, args.batch, args.max_length), make(tokenizer, dev_pairs, 64, args.max_length)


def run(method: str, target: float, seed: int, data, dev, args) -> dict:
    name = method
    model = (BiEncoderClassifier if args.task == "same_section" else PairClassifier)(minilm(), seed)
    pruner = None
    if method == "frozen":  # the reference: only the head learns, so the pretrained embeddings as they are
        model.encoder.requires_grad_(False)
    elif method in ("magnitude", "random", "movement", "movement_adam"):  # random: a control for the selection
        extra = {} if method in ("magnitude", "random") else {"regularizer": "movement"}
        if method == "movement_adam":  # the scores take Adam's steps, as the authors' released code trains them
            extra["regularizer_options"] = {"score_update": "adam"}
        method = method if method in ("magnitude", "random") else "movement"
        pruner = secateurs.Pruner(model, method, target, schedule=schedule(args.steps), scope=SCOPE, **extra)
    elif method == "soft_movement":
        ramp = schedule(args.steps)
        options = {"strength": target, "initial_score": args.initial_score,
                   "strength_schedule": {"kind": "cubic", "start": ramp["start"], "end": ramp["end"]}}  # fmt: skip
        pruner = secateurs.Pruner(model, regularizer="soft_movement", scope=SCOPE, regularizer_options=options)
    torch.manual_seed(seed)
    t = time.perf_counter()
    losses = train(model, data, args.steps, optimizer_for(pruner, args.lr, args.score_lr), pruner=pruner)
    seconds = time.perf_counter() - t
    reached = encoder_sparsity(model)
    row = {"method": name, "seed": seed, "seconds": seconds, "sparsity": reached,
           "train_loss_first10": sum(losses[:10]) / 10, "train_loss_last20": sum(losses[-20:]) / 20}  # fmt: skip
    if method == "soft_movement":
        row["strength"] = target
    else:
        row["target"] = target
    row.update({f"dev_{k}": v for k, v in evaluate(model, dev).items()})
    return row


def merge(names: list[str], out: str) -> None:
    """One table from the JSONs of several processes (same protocol: their args must agree)."""
    parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    keys = ("task", "near", "steps", "batch", "max_length", "lr", "score_lr")
    protocol = {k: parts[0]["args"].get(k, "adjacent" if k == "task" else None) for k in keys}
    for n, part in zip(names, parts, strict=True):
        other = {k: part["args"].get(k, "adjacent" if k == "task" else None) for k in keys}
        if other != protocol:
            raise SystemExit(f"{n} ran another protocol: {other} vs {protocol}")
    rows = sorted((r for p in parts for r in p["rows"]),
                  key=lambda r: (r["seed"], r["method"], r.get("target", r.get("strength", 0.0))))  # fmt: skip
    print("| seed | method | target or lambda | sparsity | dev accuracy | dev loss | train loss (first 10, last 20) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        level = f"lambda {r['strength']:g}" if "strength" in r else f"{r['target']:.0%}"
        print(f"| {r['seed']} | {r['method']} | {level} | {r['sparsity']:.1%} | {r['dev_accuracy']:.2%} | "
              f"{r['dev_loss']:.4f} | {r['train_loss_first10']:.3f} -> {r['train_loss_last20']:.3f} |")  # fmt: skip
    write_results(out, {"machines": [p["machine"] for p in parts], "args": parts[0]["args"],
                                               "parts": names, "rows": rows})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["word_order", "same_section", "adjacent"], default="word_order")
    parser.add_argument(
        "--near", type=int, default=3, help="same_section: negatives from at most this many sections away"
    )
    methods = ["frozen", "dense", "magnitude", "random", "movement", "movement_adam", "soft_movement"]
    parser.add_argument("--methods", nargs="+", default=["dense", "magnitude", "movement"], choices=methods)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9])
    parser.add_argument("--strengths", nargs="+", type=float, default=[1e-6, 1e-5, 1e-4],
                        help="soft movement's lambdas (its sparsity is reached, not set)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--score-lr", type=float, default=1e-2)
    parser.add_argument("--initial-score", type=float, default=0.1)
    parser.add_argument("--dev-pairs", type=int, default=512)
    parser.add_argument("--name", default="training_movement_minilm")
    parser.add_argument("--merge", nargs="+", metavar="NAME", help="print and join the results of these runs")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.name)
    torch.set_num_threads(1)
    tokenizer = minilm_tokenizer()
    rows = []
    for seed in args.seeds:
        data, dev = task_data(tokenizer, args, seed)
        for method in args.methods:
            levels = (
                [0.0]
                if method in ("dense", "frozen")
                else args.strengths
                if method == "soft_movement"
                else args.sparsities
            )
            for level in levels:
                row = run(method, level, seed, data, dev, args)
                row["loadavg"] = os.getloadavg()
                rows.append(row)
                print(f"seed {seed} {method:>13} {level:g}: encoder sparsity {row['sparsity']:.1%}, dev accuracy "
                      f"{row['dev_accuracy']:.2%}, dev loss {row['dev_loss']:.4f}, train loss "
                      f"{row['train_loss_first10']:.3f} -> {row['train_loss_last20']:.3f}, {row['seconds']:.0f} s, "
                      f"load {row['loadavg'][0]:.1f}", flush=True)  # fmt: skip
                write_results(args.name, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
