"""Subspace node pruning (Offergeld et al. 2024, arXiv:2405.17506) against channel-removal baselines.

1. Digits CNN (``secateurs.demo.models.digits_cnn``, trained 300 steps per seed): the channels of conv1
   and conv2 are removed (``mode='remove'``, no fine-tuning) at the same fraction of channels by
   subspace node pruning (global: per-layer ratios from the variance; and uniform), by L1 filter norm,
   mean activation and FPGM (uniform per layer, the papers' setting), and subspace without its
   least-squares reconstruction. Test accuracy, mean over seeds.
2. pydoc-llama-12m MLP neurons (``scope: model.layers.*.mlp``): subspace vs FLAP (its fluctuation metric,
   global ranking and bias compensation) at 20% and 40% of the neurons; held-out perplexity with the
   Wanda/SparseGPT protocol (non-overlapping 256-token windows of pydoc-test.txt).

    .venv/bin/python bench/subspace_pruning.py [--seeds 3] [--windows 40] [--nsamples 16]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from _common import machine, write_results
from secateurs import prune
from secateurs.demo.data import load_digits
from secateurs.demo.models import digits_cnn
from secateurs.training import accuracy, train

CNN_METHODS = {  # name -> prune() options
    "subspace (global, variance ratios)": {"method": "subspace"},
    "subspace (uniform)": {"method": "subspace", "allocation": "uniform"},
    "subspace, no reconstruction": {"method": "subspace", "solver": "none"},
    "L1 filter norm": {"method": "magnitude", "allocation": "uniform"},
    "activation": {"method": "activation", "allocation": "uniform"},
    "fpgm": {"method": "fpgm", "allocation": "uniform"},
}


def digits(seeds: list[int], ratios: list[float]) -> list[dict]:
    data = load_digits()
    test = data.batches(512, train=False)
    accs = {(r, m): [] for r in ratios for m in CNN_METHODS}
    params = {(r, m): [] for r in ratios for m in CNN_METHODS}
    dense = []
    for seed in seeds:  # one trained model per seed, pruned at every ratio by every method
        batches = data.batches(64, seed)
        torch.manual_seed(seed)
        model = digits_cnn().eval()
        train(model, batches, 300)
        model.eval()
        dense.append(accuracy(model, test))
        for ratio in ratios:
            for name, options in CNN_METHODS.items():
                pruned = copy.deepcopy(model)
                start = time.process_time()
                report = prune(pruned, sparsity=ratio, mode="remove", pattern="channel", calibration=batches[:8],
                               scope={"exclude": ["fc"]}, progress=False, seed=seed,
                               structural={"latency": False}, **options)  # fmt: skip
                accs[ratio, name].append(accuracy(pruned, test))
                params[ratio, name].append(report.after.params)
                print(f"seed {seed} {ratio:.0%} {name}: {accs[ratio, name][-1]:.3f} "
                      f"({time.process_time() - start:.1f} CPU s)", flush=True)  # fmt: skip
    rows = []
    for ratio in ratios:
        row = {"ratio": ratio, "dense": statistics.mean(dense), "dense_spread": [min(dense), max(dense)]}
        for name in CNN_METHODS:
            a = accs[ratio, name]
            row[name] = {"accuracy": statistics.mean(a), "spread": [min(a), max(a)], "per_seed": a,
                         "params": statistics.mean(params[ratio, name])}  # fmt: skip
        rows.append(row)
        print(f"digits {ratio:.0%}: dense {row['dense']:.3f} | "
              + " | ".join(f"{n} {row[n]['accuracy']:.3f}" for n in CNN_METHODS), flush=True)  # fmt: skip
    return rows


def llama_mlp(ratios: list[float], windows: int, nsamples: int) -> list[dict]:
    from transformers import AutoTokenizer

    from secateurs.calibration import sample_segments
    from secateurs.llm import perplexity
    from structural_models import LLAMA, SHARED, llama

    tokenizer = AutoTokenizer.from_pretrained(LLAMA)
    calib = [s.unsqueeze(0) for s in sample_segments(SHARED / "data" / "pydoc-calib.txt", tokenizer, nsamples, 256,
                                                     seed=0)]  # fmt: skip
    test = tokenizer((SHARED / "data" / "pydoc-test.txt").read_text(), return_tensors="pt").input_ids[0]
    test = test[: windows * 256]
    dense = llama()
    rows = [{"method": "dense", "ratio": 0.0, "params": sum(p.numel() for p in dense.parameters()),
             "perplexity": perplexity(dense, test, tokenizer, seqlen=256, progress=False).perplexity}]  # fmt: skip
    print(f"llama dense: ppl {rows[0]['perplexity']:.2f}", flush=True)
    for ratio in ratios:
        for method in ("flap", "subspace"):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = prune(model, method, ratio, mode="remove", pattern="channel", calibration=calib,
                           scope={"include": ["model.layers.*.mlp"]}, progress=False,
                           structural={"latency": False})  # fmt: skip
            seconds = time.perf_counter() - start
            widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
            row = {"method": method, "ratio": ratio, "params": report.after.params, "seconds": seconds,
                   "mlp_widths": widths,
                   "perplexity": perplexity(model, test, tokenizer, seqlen=256, progress=False).perplexity}  # fmt: skip
            rows.append(row)
            print(
                f"llama {method} {ratio:.0%}: ppl {row['perplexity']:.2f} widths {widths} ({seconds:.1f} s)", flush=True
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--name", default="", help="suffix of bench/results/subspace_pruning<...>.json")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--llm-ratios", default="0.2,0.4")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    cnn = [] if args.skip_digits else digits(seeds, [float(r) for r in args.ratios.split(",")])
    lines = ["| channels removed | method | test accuracy (mean, min-max) | params |", "|---:|---|---:|---:|"]
    for row in cnn:
        lines.append(f"| {row['ratio']:.0%} | dense | {row['dense']:.3f} | |")
        for name in CNN_METHODS:
            r = row[name]
            spread = f"{r['spread'][0]:.3f}-{r['spread'][1]:.3f}"
            lines.append(f"| {row['ratio']:.0%} | {name} | {r['accuracy']:.3f} ({spread}) | {r['params']:,.0f} |")
    llm_ratios = [float(r) for r in args.llm_ratios.split(",")]
    llm = [] if args.skip_llama else llama_mlp(llm_ratios, args.windows, args.nsamples)
    lines += [
        "",
        "| MLP neurons removed | method | perplexity | params | MLP widths per layer |",
        "|---:|---|---:|---:|---|",
    ]
    for r in llm:
        widths = r.get("mlp_widths", "")
        lines.append(f"| {r['ratio']:.0%} | {r['method']} | {r['perplexity']:.2f} | {r['params']:,} | {widths} |")
    table = "\n".join(lines)
    print(table)
    payload = {"machine": machine(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "seeds": args.seeds,
               "digits": cnn, "llama_mlp": llm, "table": table}  # fmt: skip
    part = "_llama" if args.skip_digits else "_digits" if args.skip_llama else ""
    write_results(f"subspace_pruning{part}{args.name}", payload)


if __name__ == "__main__":
    main()
