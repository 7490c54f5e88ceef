"""Expert removal on a small mixture-of-experts model trained here: REAP vs frequency vs random.

A tiny Mixtral (8 experts, top-2) is trained from scratch on ``pydoc-calib.txt`` with the
pydoc-llama-12m tokenizer (a few minutes of CPU; the router's load-balancing loss is on, so every
expert is used) and cached under ``bench/.cache/``. Then, per setting, from the same trained weights:
remove 25% (2 of 8) or 50% (4 of 8) of the experts of every block by REAP saliency, router frequency,
or at random (3 seeds: mean and range), and score perplexity on the first windows of
``pydoc-test.txt``. One more row prunes 50% inside every expert (Wanda, per-expert statistics).

    .venv/bin/python bench/moe_experts.py [--steps 300] [--eval-windows 150] [--retrain]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import llm_pruning as protocol  # noqa: E402  (shared fixtures: model dir for the tokenizer, text files)

CACHE = BENCH / ".cache" / "moe-pydoc-mixtral"
SEQLEN = 128


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(protocol.MODEL)


def train(steps: int, batch: int = 16, hidden: int = 128, seed: int = 0) -> dict:
    """Train the tiny Mixtral on the calibration text (next-token loss + the router's balancing loss)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from secateurs.calibration import token_stream

    tokenizer = _tokenizer()
    stream = token_stream(str(protocol.CALIB), tokenizer)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=SEQLEN, output_router_logits=True, router_aux_loss_coef=0.02, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        starts = torch.randint(0, stream.numel() - SEQLEN - 1, (batch,), generator=g)
        ids = torch.stack([stream[s : s + SEQLEN] for s in starts.tolist()])
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step}: loss {losses[-1]:.3f}  {time.perf_counter() - start:.0f} s", flush=True)
    model.config.output_router_logits = False
    model.eval()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CACHE)
    seconds = time.perf_counter() - start
    return {"steps": steps, "batch": batch, "hidden": hidden, "seconds": seconds, "final_loss": sum(losses[-20:]) / 20,
            "load_after": os.getloadavg()}  # fmt: skip


def _ppl(model, windows: int) -> float:
    from secateurs.calibration import token_stream
    from secateurs.llm import perplexity

    stream = token_stream(str(protocol.TEST), _tokenizer())[: windows * SEQLEN]
    return perplexity(model, stream, seqlen=SEQLEN, batch_size=8, progress=False).perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="training segments per step")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (experts: twice that)")
    p.add_argument("--eval-windows", dest="eval_windows", type=int, default=150)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    from transformers import MixtralForCausalLM

    from _common import machine, write_results
    from secateurs.calibration import sample_segments
    from secateurs.llm import prune_llm
    from secateurs.llm.moe import prune_experts

    training = None
    if args.retrain or not (CACHE / "config.json").exists():
        training = train(args.steps, args.batch, args.hidden)
    trained = MixtralForCausalLM.from_pretrained(CACHE, dtype=torch.float32).eval()
    segments = sample_segments(str(protocol.CALIB), _tokenizer(), args.nsamples, SEQLEN, seed=0)
    rows = [{"setting": "dense", "saliency": "-", "perplexity": _ppl(trained, args.eval_windows)}]
    print(f"dense: {rows[0]['perplexity']:.2f}", flush=True)
    for fraction in (0.25, 0.5):
        for saliency, seeds in (("reap", [0]), ("frequency", [0]), ("random", [0, 1, 2])):
            values, seconds = [], []
            for seed in seeds:
                model = copy.deepcopy(trained)
                start = time.perf_counter()
                prune_experts(model, fraction, saliency=saliency, calibration=segments, seed=seed)
                seconds.append(time.perf_counter() - start)
                values.append(_ppl(model, args.eval_windows))
            rows.append({"setting": f"remove {fraction:.0%} of experts", "saliency": saliency,
                         "perplexity": sum(values) / len(values), "runs": values, "seconds": seconds,
                         "load": os.getloadavg()})  # fmt: skip
            print(f"{fraction:.0%} {saliency}: {values}", flush=True)
    model = copy.deepcopy(trained)
    report = prune_llm(model, "wanda", 0.5, calibration=segments, progress=False)
    expert_layers = [layer for layer in report.layers if ".experts." in layer.name]
    zeros = 1 - sum(r.nonzeros for r in expert_layers) / sum(r.params for r in expert_layers)
    rows.append({"setting": "50% inside every expert (Wanda)", "saliency": "-",
                 "perplexity": _ppl(model, args.eval_windows), "expert_sparsity": zeros,
                 "fallbacks": dict(report.details.fallbacks)})  # fmt: skip
    lines = ["| setting | expert saliency | perplexity | vs dense |", "|---|---|---:|---:|"]
    dense = rows[0]["perplexity"]
    for r in rows:
        spread = f" ({min(r['runs']):.2f}-{max(r['runs']):.2f}, 3 seeds)" if len(r.get("runs", [])) > 1 else ""
        lines.append(
            f"| {r['setting']} | {r['saliency']} | {r['perplexity']:.2f}{spread} | {r['perplexity'] / dense:.3f}x |"
        )
    text = "\n".join(lines)
    print(text)
    write_results("moe_experts", {"machine": machine(), "load": os.getloadavg(), "training": training,
                                  "eval_windows": args.eval_windows, "seqlen": SEQLEN, "nsamples": args.nsamples,
                                  "rows": rows, "table": text})  # fmt: skip


if __name__ == "__main__":
    main()
