"""Eigenpruning (arXiv:2404.03147) on a small transformer trained here on modular arithmetic.

The paper's phenomenon: a model that is imperfect on a task gets *better* on held-out examples
once the singular directions with the lowest attribution-patching effect on a train split are
removed. We train a tiny GPT-2 jointly on ``i + j =`` and ``i * j =`` (mod ``base``, every number
one token) for a fixed, short budget so it stays imperfect, then eigenprune it for one operation
at a time on that operation's train pairs and measure accuracy on its held-out pairs.

    OMP_NUM_THREADS=1 nice -n 10 python bench/eigenprune_arithmetic.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F

from _common import machine, write_results
from secateurs.eigenprune import eigenprune

OPS = {"+": lambda i, j, m: (i + j) % m, "*": lambda i, j, m: (i * j) % m}


def vocabulary(base: int, modulus: int) -> int:
    """Numbers up to the largest answer are tokens, then '+', '*', '='."""
    return max(base, min(modulus, (base - 1) ** 2 + 1))


def make_task(base: int, modulus: int, seed: int, train_share: float) -> dict[str, dict[str, list]]:
    """Per operation: prompts ``[i, op, j, =]`` (token ids) and answers, split into train and test pairs."""
    numbers = vocabulary(base, modulus)
    plus, times, equals = numbers, numbers + 1, numbers + 2
    op_token = {"+": plus, "*": times}
    g = torch.Generator().manual_seed(seed)
    task = {}
    for op, fn in OPS.items():
        pairs = [(i, j) for i in range(base) for j in range(base)]
        order = torch.randperm(len(pairs), generator=g).tolist()
        cut = int(len(pairs) * train_share)
        split = {"train": [pairs[k] for k in order[:cut]], "test": [pairs[k] for k in order[cut:]]}
        task[op] = {
            part: ([[i, op_token[op], j, equals] for i, j in ps], [fn(i, j, modulus) for i, j in ps])
            for part, ps in split.items()
        }
    return task


def build_model(vocab: int, seed: int, width: int, layers: int, heads: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab + 3, n_positions=8, n_embd=width, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def train(model: torch.nn.Module, task: dict, steps: int, lr: float, batch: int, seed: int, decay: float) -> None:
    """Both operations' train pairs, loss on the answer only; stopped early on purpose (imperfect)."""
    x = torch.tensor([p for op in task for p in task[op]["train"][0]])
    y = torch.tensor([a for op in task for a in task[op]["train"][1]])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(input_ids=x[idx]).logits[:, -1], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, prompts: list, answers: list) -> float:
    logits = model(input_ids=torch.tensor(prompts)).logits[:, -1]
    return (logits.argmax(-1) == torch.tensor(answers)).double().mean().item()


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    settings = [(tuple(c.split(",")), f, r) for c in args.components for f in args.fractions for r in args.reductions]
    for seed in args.seeds:
        task = make_task(args.base, args.modulus, seed, args.train_share)
        model = build_model(vocabulary(args.base, args.modulus), seed, args.width, args.layers, args.heads)
        train(model, task, args.steps, args.lr, args.batch, seed, args.weight_decay)
        for op in OPS:
            (train_p, train_a), (test_p, test_a) = task[op]["train"], task[op]["test"]
            before = accuracy(model, test_p, test_a), accuracy(model, train_p, train_a)
            # the paper scores on a small sample of the train split (its code reads one batch of 5)
            g = torch.Generator().manual_seed(1000 + seed)
            pick = torch.randperm(len(train_p), generator=g)[: args.prune_examples].tolist()
            for components, fraction, reduction in settings:
                pruned = copy.deepcopy(model)
                report = eigenprune(pruned, [train_p[k] for k in pick], [train_a[k] for k in pick],
                                    components=components, fraction=fraction, reduction=reduction)  # fmt: skip
                after = accuracy(pruned, test_p, test_a), accuracy(pruned, train_p, train_a)
                other = next(o for o in OPS if o != op)
                row = {
                    "seed": seed, "op": op, "components": ",".join(components), "fraction": fraction,
                    "reduction": reduction, "removed": sum(report.removed.values()),
                    "total": sum(report.total.values()),
                    "test_before": before[0], "test_after": after[0],
                    "train_before": before[1], "train_after": after[1],
                    "other_op_test_before": accuracy(model, *task[other]["test"]),
                    "other_op_test_after": accuracy(pruned, *task[other]["test"]),
                }  # fmt: skip
                rows.append(row)
                print(
                    f"seed {seed} {op} {row['components']:>22} {fraction:.2f} {reduction}"
                    f" removed {row['removed']:4d}/{row['total']:4d}"
                    f"  test {before[0]:.3f} -> {after[0]:.3f}  train {before[1]:.3f} -> {after[1]:.3f}"
                    f"  other op test {row['other_op_test_before']:.3f} -> {row['other_op_test_after']:.3f}",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base", type=int, default=23, help="operands are 0 .. base-1")
    parser.add_argument("--modulus", type=int, default=23, help="answers are taken mod this (large: plain arithmetic)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--train-share", type=float, default=0.6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prune-examples", type=int, default=64)
    parser.add_argument("--components", nargs="+", default=["k", "q,k,v,o,mlp_in,mlp_out"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--reductions", nargs="+", default=["max"], help="max: the paper's score; mean: a variant")
    parser.add_argument("--out", default="eigenprune_arithmetic")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = run(args)
    write_results(args.out, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
