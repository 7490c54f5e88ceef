"""Batch-1 decode tokens/s with TEAL activation sparsity vs dense, side by side, on a Llama shape past L3.

A random-weight Llama with TinyLlama's block shape (hidden 2048, intermediate 5632, 32 heads, 4 KV
heads), ``--layers`` blocks (2 by default: 348 MB of block weights, 7x this machine's 48 MB L3) and a
small vocabulary (so the dense LM head, which TEAL leaves alone, does not hide the blocks). Thresholds
are calibrated on random token ids with the uniform allocation (every block Linear at the target).

Each round decodes ``--tokens`` tokens greedily with a KV cache after an 8-token prompt, dense model
then sparse model (same weights; the dense one is the plain HF model), so a burst of load from the
other users of the machine hits both alike; the speed-up is the median of the per-round ratios. The
physical limit is the ratio of weight bytes a decode step must read (blocks + LM head).

    .venv/bin/python bench/dynamic_decode.py [--layers 2] [--rounds 9] [--tokens 16] [--sparsity 0.5]
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


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds per generated token (greedy, KV cache), the prompt's prefill excluded."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(prompt, cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(tokens):
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / tokens


def weight_bytes(model, sparsities: dict[str, float]) -> tuple[int, float]:
    """Bytes of Linear weights a decode step reads: dense, and with each sparsified layer's share."""
    dense = sparse = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            size = module.weight.numel() * module.weight.element_size()
            dense += size
            sparse += size * (1 - sparsities.get(name, 0.0))
    return int(dense), sparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.4, 0.25])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to run with")
    args = p.parse_args()
    sys.path.insert(0, str(BENCH))
    from _common import machine, write_results
    from secateurs.dynamic import kernel, sparsify_activations
    from secateurs.evaluation import Spread

    started = time.perf_counter()
    load_before = os.getloadavg()
    dense = build(args.layers)
    sparse_model = copy.deepcopy(dense)
    calibration = torch.randint(0, 1024, (4, 32), generator=torch.Generator().manual_seed(1))
    sparse = sparsify_activations(sparse_model, calibration, batch_size=2, allocation="uniform")
    built = kernel.compiled() is not None
    prompt = torch.randint(0, 1024, (1, 8), generator=torch.Generator().manual_seed(2))
    rows = []
    for threads, target in [(t, s) for t in args.threads for s in args.sparsity]:
        torch.set_num_threads(threads)
        sparse.set_sparsity(target)
        decoded = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(3))
        measured = sparse.measure(decoded)["<weighted>"]
        for model in (dense, sparse_model):  # warm-up (and the kernel build, once)
            decode(model, prompt, 2)
        pairs = []
        for _ in range(args.rounds):
            pairs.append((decode(dense, prompt, args.tokens), decode(sparse_model, prompt, args.tokens)))
        dense_bytes, sparse_bytes = weight_bytes(sparse_model, sparse.layer_sparsities())
        block_bytes = dense_bytes - sparse_model.lm_head.weight.numel() * 4
        row = {
            "threads": threads,
            "load_average": os.getloadavg()[0],
            "sparsity": target,
            "measured_sparsity_in_decode": measured,
            "dense_tokens_per_s": Spread.of([1 / d for d, _ in pairs]).__dict__,
            "sparse_tokens_per_s": Spread.of([1 / s for _, s in pairs]).__dict__,
            "speedup": Spread.of([d / s for d, s in pairs]).__dict__,
            "limit_bytes": dense_bytes / sparse_bytes,
            "limit_blocks_only": 1 / (1 - target),
            "dense_weight_mb": dense_bytes / 2**20,
            "block_weight_mb": block_bytes / 2**20,
        }
        rows.append(row)
        s = row["speedup"]
        print(
            f"{threads} thread(s), {target:.0%}: dense {row['dense_tokens_per_s']['median']:.1f} tok/s, sparse "
            f"{row['sparse_tokens_per_s']['median']:.1f} tok/s, speed-up {s['median']:.2f}x "
            f"(IQR {s['q1']:.2f}-{s['q3']:.2f}, range {s['low']:.2f}-{s['high']:.2f}), limit {row['limit_bytes']:.2f}x",
            flush=True,
        )
    lines = [
        "| threads | load avg | target | measured in decode | dense tok/s | sparse tok/s "
        "| speed-up (median of pairs) | IQR | range "
        "| bytes-read limit (blocks + head) | limit (blocks alone) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["speedup"]
        lines.append(
            f"| {r['threads']} | {r['load_average']:.1f} | {r['sparsity']:.0%} "
            f"| {r['measured_sparsity_in_decode']:.1%} | {r['dense_tokens_per_s']['median']:.1f} "
            f"| {r['sparse_tokens_per_s']['median']:.1f} | **{s['median']:.2f}x** | {s['q1']:.2f}-{s['q3']:.2f} "
            f"| {s['low']:.2f}-{s['high']:.2f} | {r['limit_bytes']:.2f}x | {r['limit_blocks_only']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(
        "dynamic_decode",
        {
            "machine": machine(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "model": {
                "hidden": 2048,
                "intermediate": 5632,
                "layers": args.layers,
                "heads": 32,
                "kv_heads": 4,
                "vocab": 1024,
                "weights": "random",
                "dtype": "float32",
            },
            "rounds": args.rounds,
            "tokens_per_round": args.tokens,
            "compiled_kernel": built,
            "kernel_notice": kernel.kernel_notice(),
            "rows": rows,
            "table": table,
            "seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main()
