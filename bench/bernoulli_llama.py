"""Forward-only Bernoulli-mask structural pruning (Gao et al. 2024, arXiv:2406.10576) on pydoc-llama-12m.

At 20% and 40% of the head+neuron parameters removed (whole GQA groups, ``gqa='kv_groups'``, and MLP
neurons; the same structures for every method), without retraining: FLAP (fluctuation metric, global
ranking, bias compensation), the Bernoulli search's own initialisation (FLAP ranks mapped to
probabilities and projected on the budget, ``steps=0``), and the search (``steps`` x ``samples``
forward passes, REINFORCE with a moving-average baseline, mean ablation, bias compensation at the
end). Each run is its own subprocess, so the peak RSS is that run's. Perplexity: Wanda/SparseGPT
protocol on non-overlapping 256-token windows of pydoc-test.txt. Writes bench/results/bernoulli_llama.json.

    .venv/bin/python bench/bernoulli_llama.py [--steps N] [--samples K] [--lr LR] [--windows 20] [--nsamples 8]
        [--runs 0,1,2,3,4] [--threads 2] [--name bernoulli_llama]

Without --steps/--samples/--lr the search runs with the method's defaults (200 steps, K = 4, the max-normalised
step on a band of uncertain units, leave-one-out baseline, standardised estimator, best calibration mask
kept; see docs/subspace.md).

The prune wall time is also given as CPU seconds of the process (meaningful on a busy machine).
``--pattern layer`` compares whole-block removal instead: ShortGPT's block influence, the block
search's initialisation (ShortGPT ranks, ``steps=0``) and the block search; ``--ratios`` is then the
fraction of the blocks removed (e.g. ``0.17,0.34`` for 1 and 2 of 6).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from _common import machine, paired_windows, write_results

PAPER = {
    "init_spread": 0.8,
    "eps": 1e-3,
    "baseline": "moving_average",
    "estimator": "score",
    "update": "max_normalised",
    "lr": 0.05,
    "eval_every": 0,
}  # the first implementation (before 2026-12-01)
RUNS = {  # name -> prune() options (search settings not given here come from the command line or the defaults)
    "flap": {"method": "flap"},
    "bernoulli init (flap ranks, steps=0)": {"method": "bernoulli", "method_options": {"steps": 0}},
    "bernoulli search (defaults)": {"method": "bernoulli", "method_options": {}},
    "bernoulli search (first implementation: max-normalised step, moving average)": {
        "method": "bernoulli",
        "method_options": dict(PAPER),
    },
    "bernoulli init (first implementation, steps=0)": {
        "method": "bernoulli",
        "method_options": {**PAPER, "steps": 0},
    },
    "bernoulli init (wanda-sp ranks, steps=0)": {
        "method": "bernoulli",
        "method_options": {"init": "wanda", "steps": 0},
    },
    "bernoulli search (wanda-sp init)": {"method": "bernoulli", "method_options": {"init": "wanda"}},
}

BLOCK_RUNS = {  # --pattern layer: whole blocks
    "shortgpt": {"method": "shortgpt"},
    "bernoulli init (shortgpt ranks, steps=0)": {"method": "bernoulli", "method_options": {"steps": 0}},
    "bernoulli search (paper: moving-average baseline)": {"method": "bernoulli", "method_options": {}},
}


def worker(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from secateurs import prune
    from secateurs.calibration import sample_segments
    from secateurs.llm import perplexity
    from structural_models import LLAMA, SHARED, llama

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA)
    calib = [s.unsqueeze(0) for s in sample_segments(SHARED / "data" / "pydoc-calib.txt", tokenizer, args.nsamples,
                                                     256, seed=0)]  # fmt: skip
    test = tokenizer((SHARED / "data" / "pydoc-test.txt").read_text(), return_tensors="pt").input_ids[0]
    test = test[: args.windows * 256]
    model = llama()
    options = json.loads(args.options)
    if options.get("method") == "bernoulli" and "steps" not in options.get("method_options", {}):
        given = {"steps": args.steps, "samples": args.samples, "lr": args.lr}
        options["method_options"] = {**{k: v for k, v in given.items() if v is not None},
                                     **options.get("method_options", {})}  # fmt: skip
    before = sum(p.numel() for p in model.parameters())
    start, cpu = time.perf_counter(), time.process_time()
    report = None
    if args.ratio > 0:
        structural = {"latency": False} if args.pattern == "layer" else {"latency": False, "gqa": "kv_groups"}
        report = prune(model, sparsity=args.ratio, mode="remove", pattern=args.pattern, calibration=calib,
                       progress=False, structural=structural, **options)  # fmt: skip
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # of the prune, before the evaluation
    ppl = perplexity(model, test, tokenizer, seqlen=256, progress=False)
    return {"params_before": before, "params": sum(p.numel() for p in model.parameters()), "seconds": seconds,
            "cpu_seconds": cpu, "loadavg": os.getloadavg(),
            "peak_rss_mib": peak, "perplexity": ppl.perplexity, "window_nll": ppl.window_nll,
            "removed_params": report.before.params - report.after.params if report else 0}  # fmt: skip


#: a search and the initialisation it starts from: compared window by window on the same held-out text
PAIRS = {
    "bernoulli search (defaults)": "bernoulli init (flap ranks, steps=0)",
    "bernoulli search (wanda-sp init)": "bernoulli init (wanda-sp ranks, steps=0)",
}


def paired(search: dict, init: dict) -> str:
    """Search minus init, window by window (``_common.paired_windows``)."""
    return paired_windows(search.get("window_nll"), init.get("window_nll"), "search")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--steps", type=int, default=None, help="default: the method's")
    parser.add_argument("--samples", type=int, default=None, help="default: the method's")
    parser.add_argument("--lr", type=float, default=None, help="default: the method's")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--ratio", type=float, default=0.0)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine)")
    parser.add_argument("--runs", default=",".join(str(i) for i in range(len(RUNS))), help="indices into RUNS")
    parser.add_argument("--name", default="bernoulli_llama", help="bench/results/<name>.json")
    parser.add_argument(
        "--pattern", default="head+channel", choices=["head+channel", "layer"], help="'layer': whole blocks"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    load_start = os.getloadavg()
    given = [(f"--{k}", str(getattr(args, k))) for k in ("steps", "samples", "lr") if getattr(args, k) is not None]
    common = [*(x for pair in given for x in pair), "--windows", str(args.windows), "--nsamples", str(args.nsamples),
              "--threads", str(args.threads), "--pattern", args.pattern]  # fmt: skip

    def run(ratio: float, options: dict) -> dict:
        cmd = [sys.executable, __file__, "--worker", "--ratio", str(ratio), "--options", json.dumps(options), *common]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def save(rows: list[dict], table: str = "") -> None:  # after every row: a shared machine may cut the run
        write_results(args.name, {"machine": machine(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                                  "settings": vars(args), "rows": rows, "table": table})  # fmt: skip

    rows = [{"method": "dense", "ratio": 0.0, **run(0.0, {})}]
    print(f"dense: ppl {rows[0]['perplexity']:.2f}", flush=True)
    runs = BLOCK_RUNS if args.pattern == "layer" else RUNS
    chosen = [list(runs)[int(i)] for i in args.runs.split(",")]
    for ratio in map(float, args.ratios.split(",")):
        for name in chosen:
            row = {"method": name, "ratio": ratio, **run(ratio, runs[name])}
            rows.append(row)
            save(rows)
            print(f"{name} {ratio:.0%}: ppl {row['perplexity']:.2f}, params {row['params']:,}, "
                  f"{row['seconds']:.1f} s ({row['cpu_seconds']:.1f} CPU s, load {row['loadavg'][0]:.1f}), "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    removed = "blocks" if args.pattern == "layer" else "head+neuron params"
    lines = [f"| {removed} removed | method | perplexity | params | prune wall (CPU) s | peak RSS |",
             "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['ratio']:.0%} | {r['method']} | {r['perplexity']:.2f} | {r['params']:,} | {r['seconds']:.0f} "
              f"({r['cpu_seconds']:.0f}) | {r['peak_rss_mib']:.0f} MiB |" for r in rows]  # fmt: skip
    for r in rows:
        init = next((i for i in rows if i["method"] == PAIRS.get(r["method"]) and i["ratio"] == r["ratio"]), None)
        if init is not None:
            r["vs_init"] = paired(r, init)
            lines.append(f"\n{r['method']} vs its initialisation at {r['ratio']:.0%}: {r['vs_init']}")
    table = "\n".join(lines)
    print(table)
    save(rows, table)


if __name__ == "__main__":
    main()
