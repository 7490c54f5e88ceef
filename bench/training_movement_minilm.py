"""Movement vs magnitude pruning while fine-tuning the pretrained MiniLM encoder (Sanh et al. 2020).

Task (built from the text available here): distil the dense all-MiniLM-L6-v2 into a pruned copy of
itself, i.e. fine-tune the pruned student to reproduce the dense model's sentence embeddings
(mean-pooled, normalised) on sentences of ``pydoc-calib.txt``; loss ``1 - cos(student, teacher)``.
Both methods prune every Linear of the six encoder blocks (the default scope: embeddings and
pooler stay dense) to 50%, 80% and 90% on the same cubic schedule (GMP's, the paper's too), with
the same optimizer (Adam), batches and steps:

- **magnitude**: ``Pruner(model, 'magnitude', s, schedule=cubic)``;
- **movement** (hard): ``Pruner(model, 'movement', s, regularizer='movement', schedule=cubic)``:
  ``pruner.regularize()`` accumulates ``S += -W * dL/dW`` between backward and the optimizer step.

Quality: mean cosine similarity of the pruned student's embeddings to the dense model's on
``--held-out`` (128) held-out sentences of ``pydoc-test.txt``. The paper's finding to check: movement beats magnitude at
high sparsity, magnitude wins at low sparsity. Writes bench/results/training_movement_minilm.json.

    .venv/bin/python bench/training_movement_minilm.py [--steps 40] [--batch 8] [--held-out 128]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import secateurs
from _common import machine, write_results
from structural_models import SHARED, embed, minilm, minilm_tokenizer, sentences

SPARSITIES = (0.5, 0.8, 0.9)


def pooled(model, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def held_out_batches(tokenizer, count: int) -> list[dict]:
    text = sentences(SHARED / "data" / "pydoc-test.txt", count)
    out = []
    for i in range(0, len(text), 32):
        b = tokenizer(text[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append({k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def fidelity(model, batches, teacher) -> dict:
    sims = torch.cat([(embed(model, b) * t).sum(-1) for b, t in zip(batches, teacher, strict=True)])
    return {"sentences": len(sims), "cosine_mean": float(sims.mean()), "cosine_min": float(sims.min())}


def run(method: str, sparsity: float, batches, targets, steps: int) -> dict:
    model = minilm()
    end = int(steps * 0.7) // 5 * 5  # prune over the first 70% of the steps, then fine-tune at the final sparsity
    schedule = {"kind": "cubic", "start": 0, "end": end, "every": 5}
    extra = {"regularizer": "movement"} if method == "movement" else {}
    pruner = secateurs.Pruner(model, method, sparsity, schedule=schedule, **extra)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-5)
    model.train()
    t = time.perf_counter()
    losses = []
    for step in range(steps):
        batch, target = batches[step % len(batches)], targets[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = (1 - (pooled(model, batch) * target).sum(-1)).mean()
        loss.backward()
        if method == "movement":
            pruner.regularize()
        optimizer.step()
        pruner.step()
        losses.append(float(loss.detach()))
    model.eval()
    report = pruner.report()
    return {"method": method, "sparsity": sparsity, "reached": report.sparsity, "seconds": time.perf_counter() - t,
            "final_loss": sum(losses[-10:]) / 10, "model": model}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = minilm_tokenizer()
    dense = minilm()
    train = sentences(SHARED / "data" / "pydoc-calib.txt", args.batch * 40)
    batches, targets = [], []
    for i in range(0, len(train), args.batch):
        b = tokenizer(train[i : i + args.batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        b = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batches.append(b)
        targets.append(embed(dense, b))
    held_out = held_out_batches(tokenizer, args.held_out)
    teacher = [embed(dense, b) for b in held_out]
    rows = []
    for sparsity in SPARSITIES:
        for method in ("magnitude", "movement"):
            row = run(method, sparsity, batches, targets, args.steps)
            row.update(fidelity(row.pop("model"), held_out, teacher))
            rows.append(row)
            print(f"{sparsity:.0%} {method:>9}: cosine to dense {row['cosine_mean']:.4f} "
                  f"(min {row['cosine_min']:.4f}), "
                  f"train loss {row['final_loss']:.4f}, {row['seconds']:.0f} s", flush=True)  # fmt: skip
    write_results("training_movement_minilm", {"machine": machine(), "loadavg": os.getloadavg(), "args": vars(args),
                                               "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
