"""Run llm-compressor's SparseGPT or Wanda on the benchmark model (inside its own venv).

Called by ``bench/llm_pruning.py`` with the venv's python. Reads the calibration segments
the main script sampled (so both tools see the same tokens), times ``oneshot`` alone, saves
the pruned weights with ``safetensors.torch.save_model`` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--segments", required=True, help="torch.save'd (N, L) int64 token ids")
    p.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--pattern", default="0:0", help="N:M, or 0:0 for unstructured")
    p.add_argument("--owl", action="store_true")
    p.add_argument("--out", required=True, help="safetensors file for the pruned weights")
    args = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(torch.get_num_threads())
    segments = torch.load(args.segments, weights_only=True)
    data = Dataset.from_dict({"input_ids": segments.tolist(), "attention_mask": torch.ones_like(segments).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cls = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    options = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08} if args.owl else {}
    modifier = cls(
        sparsity=args.sparsity, mask_structure=args.pattern, targets=["Linear"], ignore=["re:.*lm_head"], **options
    )
    start, cpu = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        dataset=data,
        recipe=modifier,
        num_calibration_samples=segments.shape[0],
        max_seq_length=segments.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_model(model, args.out)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mib": peak_mib}))


if __name__ == "__main__":
    main()
