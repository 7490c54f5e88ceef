"""Eigenpruning (arXiv:2404.03147) on pydoc-llama-12m, for cloze tasks built from held-out text.

Tasks (every answer one token, every prompt the ``context`` tokens before it):
- ``role``: in the Python docs' Sphinx markup ``:func:`iter```, predict the role name (``func``,
  ``meth``, ``class``, ``exc``, ``mod``, ``attr``, ``data``, ``const``) from the text before it;
  the model must guess which kind of object the sentence is about.
- ``constant``: predict ``True`` / ``False`` / ``None`` after a double backquote.

Occurrences in the first half of ``pydoc-test.txt`` form the train split (eigenpruning's prompts,
a sample per seed), the second half the held-out split. Accuracy: argmax over the whole
vocabulary equals the answer. We also report perplexity on held-out windows, to show what the
prune costs the model in general.

    OMP_NUM_THREADS=1 nice -n 10 python bench/eigenprune_llama.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import machine, write_results
from secateurs.eigenprune import eigenprune

MODEL = "/work/shared/models/pydoc-llama-12m"
TEXT = "/work/shared/data/pydoc-test.txt"
ANSWERS = {
    "role": ["func", "meth", "class", "exc", "mod", "attr", "data", "const"],
    "constant": ["True", "False", "None"],
}
#: the token before the answer, as the text spells it (`` :func:`` and ``(:func:`` tokenise differently)
CUE = {"role": (" :", ":", " (:"), "constant": (" ``", "``", ":`")}


def occurrences(ids: list[int], tokenizer, task: str, context: int) -> list[tuple[list[int], int, int]]:
    """``(prompt, answer, position)`` wherever the cue token is followed by one of the task's answers."""
    answers = {tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS[task]}
    cues = {i for i in set(ids) if tokenizer.decode([i]) in CUE[task]}
    return [
        (ids[p - context + 1 : p + 1], ids[p + 1], p)
        for p in range(context - 1, len(ids) - 1)
        if ids[p] in cues and ids[p + 1] in answers
    ]


@torch.no_grad()
def accuracy(model, examples) -> float:
    hits = 0
    for start in range(0, len(examples), 64):
        part = examples[start : start + 64]
        logits = model(input_ids=torch.tensor([e[0] for e in part])).logits[:, -1]
        hits += (logits.argmax(-1) == torch.tensor([e[1] for e in part])).sum().item()
    return hits / len(examples)


@torch.no_grad()
def perplexity(model, ids: list[int], windows: int, length: int = 256) -> float:
    half = len(ids) // 2
    total, count = 0.0, 0
    for w in range(windows):
        x = torch.tensor([ids[half + w * length : half + (w + 1) * length]])
        out = model(input_ids=x, labels=x)
        total, count = total + out.loss.item() * (length - 1), count + length - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["role", "constant"])
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--prune-examples", type=int, default=64)
    parser.add_argument("--test-examples", type=int, default=400)
    parser.add_argument("--components", nargs="+", default=["k", "q,k,v,o,mlp_in,mlp_out"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--out", default="eigenprune_llama")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    ids = tokenizer(Path(TEXT).read_text())["input_ids"]
    dense_ppl = perplexity(model, ids, args.ppl_windows)
    print(f"dense held-out perplexity ({args.ppl_windows} x 256 tokens): {dense_ppl:.2f}", flush=True)
    rows = []
    for task in args.tasks:
        found = occurrences(ids, tokenizer, task, args.context)
        half = len(ids) // 2
        train = [e for e in found if e[2] < half - args.context]
        test = [e for e in found if e[2] >= half][: args.test_examples]
        before_test, before_train = accuracy(model, test), accuracy(model, train)
        print(f"{task}: {len(train)} train / {len(test)} test occurrences; dense accuracy test {before_test:.3f} "
              f"train {before_train:.3f}", flush=True)  # fmt: skip
        for seed in args.seeds:
            g = torch.Generator().manual_seed(seed)
            sample = [train[k] for k in torch.randperm(len(train), generator=g)[: args.prune_examples].tolist()]
            for components in args.components:
                for fraction in args.fractions:
                    pruned = copy.deepcopy(model)
                    report = eigenprune(pruned, [e[0] for e in sample], [e[1] for e in sample],
                                        components=components.split(","), fraction=fraction)  # fmt: skip
                    row = {
                        "task": task, "seed": seed, "components": components, "fraction": fraction,
                        "removed": sum(report.removed.values()), "total": sum(report.total.values()),
                        "test_before": before_test, "test_after": accuracy(pruned, test),
                        "train_before": before_train, "train_after": accuracy(pruned, train),
                        "ppl_before": dense_ppl, "ppl_after": perplexity(pruned, ids, args.ppl_windows),
                        "n_train": len(train), "n_test": len(test),
                    }  # fmt: skip
                    rows.append(row)
                    print(f"{task} seed {seed} {components:>22} {fraction:.2f} removed {row['removed']}/{row['total']}"
                          f"  test {before_test:.3f} -> {row['test_after']:.3f}"
                          f"  train {before_train:.3f} -> {row['train_after']:.3f}"
                          f"  ppl {dense_ppl:.2f} -> {row['ppl_after']:.2f}", flush=True)  # fmt: skip
    write_results(args.out, {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
