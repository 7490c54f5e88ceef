"""Structured pruning of pydoc-llama-12m without retraining: FLAP and ShortGPT against baselines.

Heads and MLP neurons: FLAP (fluctuation, global adaptive ranking, bias compensation; An et
al. 2024) with and without its compensation, against the L2 group norm and random units per
layer, at the same fraction of head+neuron parameters removed. Blocks: ShortGPT's block
influence (Men et al. 2024) against a random block. Calibration: seeded 256-token segments of
``../shared/data/pydoc-calib.txt``; perplexity with the Wanda/SparseGPT protocol on
non-overlapping 256-token windows of ``../shared/data/pydoc-test.txt``.
Writes bench/results/structural_llama.json.

    .venv/bin/python bench/structural_llama.py [--windows 100] [--nsamples 32]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import machine, write_results
from secateurs.calibration import sample_segments
from secateurs.llm import perplexity, prune_heads_and_neurons, remove_layers
from structural_models import LLAMA, SHARED

HEADS_AND_NEURONS = {
    "flap": {"method": "flap"},
    "flap, no bias compensation": {"method": "flap", "solver": "none"},
    "magnitude (L2 group norm), per layer": {"method": "magnitude", "allocation": "uniform"},
    "random, per layer": {"method": "random", "allocation": "uniform"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=100, help="256-token test windows")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration segments")
    parser.add_argument("--ratios", default="0.2,0.4")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA)
    dense = AutoModelForCausalLM.from_pretrained(LLAMA).eval()
    calib = sample_segments(SHARED / "data" / "pydoc-calib.txt", tokenizer, args.nsamples, 256, seed=0)
    batches = [s.unsqueeze(0) for s in calib]
    test = tokenizer((SHARED / "data" / "pydoc-test.txt").read_text(), return_tensors="pt").input_ids[0]
    test = test[: args.windows * 256]

    def ppl(model) -> float:
        return perplexity(model, test, tokenizer, seqlen=256, progress=False).perplexity

    rows = [{"what": "dense", "params": sum(p.numel() for p in dense.parameters()), "perplexity": ppl(dense)}]
    print(f"dense: perplexity {rows[0]['perplexity']:.2f}", flush=True)
    for ratio in map(float, args.ratios.split(",")):
        for name, options in HEADS_AND_NEURONS.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = prune_heads_and_neurons(model, ratio, calibration=batches, progress=False, latency=False,
                                             **options)  # fmt: skip
            row = {"what": f"{name}, {ratio:.0%} of head+neuron params", "params": report.after.params,
                   "seconds": time.perf_counter() - start, "perplexity": ppl(model)}  # fmt: skip
            rows.append(row)
            print(f"{row['what']}: perplexity {row['perplexity']:.2f} ({row['params']:,} params)", flush=True)
    for n in (1, 2):
        for method in ("shortgpt", "random"):
            model = copy.deepcopy(dense)
            report = remove_layers(model, n, calibration=batches, method=method, progress=False, latency=False)
            row = {"what": f"remove {n} block(s), {method}", "removed": report.removed_blocks,
                   "params": report.after.params, "perplexity": ppl(model)}  # fmt: skip
            rows.append(row)
            print(f"{row['what']} {row['removed']}: perplexity {row['perplexity']:.2f}", flush=True)
    write_results("structural_llama", {"machine": machine(), "test_tokens": int(test.numel()), "rows": rows})


if __name__ == "__main__":
    main()
