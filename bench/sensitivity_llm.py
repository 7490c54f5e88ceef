"""Sensitivity allocation vs uniform and OWL on pydoc-llama-12m at 70% unstructured (Wanda and SparseGPT).

Same protocol as ``llm_pruning.py`` (128 x 256 seeded calibration segments of ``pydoc-calib.txt``,
perplexity on non-overlapping 256-token windows of ``pydoc-test.txt``), all in one run. The profile
is measured on the calibration text only (never the test text):

- ``sensitivity (block loss)``: each block pruned alone by the method at 50..90% (the others dense),
  language-model loss on 16 further calibration segments (seed 1), blocks' loss increases summed;
- ``sensitivity (local error)``: each block's relative reconstruction error on its own captured
  dense inputs (the fast mode), summed;
- ``sensitivity (spdy)``: :func:`secateurs.analysis.spdy_search`: a database of every block pruned at
  50..90% (step 5%) on the inputs the sequential runner gives it, the knapsack over coefficient-scaled
  local errors, and a local search over the coefficients scored by the loss of the assembled model on
  ``--held-samples`` further calibration segments (seed 1); the best ``--verify`` candidates are pruned
  for real and the one of least calibration loss is kept.

The knapsack then picks the block sparsities of least summed damage averaging exactly 70%.

    .venv/bin/python bench/sensitivity_llm.py [--eval-windows 200] [--cell-samples 32] [--profiles spdy]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, paired_windows, write_results
from llm_pruning import CALIB, MODEL, _evaluated, _ppl, _segments

GRID = (0.5, 0.6, 0.7, 0.8, 0.9)


def _model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


def _profile(method: str, kind: str, segments: torch.Tensor, evaluation: list, cell_samples: int):
    from secateurs.analysis import sensitivity

    model = _model()
    batches = [segments[i : i + 8] for i in range(0, cell_samples, 8)]
    start = time.perf_counter()
    if kind == "local":
        profile = sensitivity(
            model,
            batches,
            method=method,
            targets="blocks",
            local=True,
            sparsities=GRID,
            mode="mask",
            costs=(),
            progress=False,
        )
    else:
        profile = sensitivity(
            model,
            batches,
            method=method,
            targets="blocks",
            runner="blocks",
            mode="mask",
            evaluation=evaluation,
            sparsities=GRID,
            costs=(),
            progress=False,
        )
    return profile, time.perf_counter() - start


def _spdy(method: str, segments: torch.Tensor, evaluation: list, args: argparse.Namespace):
    from secateurs.analysis import spdy_search

    model = _model()
    batches = [segments[i : i + 8] for i in range(0, len(segments), 8)]  # what prune_llm reads (batch_size 8)
    start = time.perf_counter()
    result = spdy_search(
        model,
        batches,
        method=method,
        sparsity=0.7,
        evaluation=evaluation,
        evaluations=args.evaluations,
        verify=args.verify,
        seed=0,
        granularity=args.granularity,
        progress=False,
    )
    return result, time.perf_counter() - start


def _prune(method: str, segments: torch.Tensor, eval_windows: int, **options) -> dict:
    from secateurs.llm import prune_llm

    model = _model()
    start = time.perf_counter()
    report = prune_llm(model, method, 0.7, calibration=segments, progress=False, **options)
    seconds = time.perf_counter() - start
    evaluated = _evaluated(model, eval_windows)
    r = {
        "perplexity": evaluated.perplexity,
        "window_nll": evaluated.window_nll,
        "sparsity": report.sparsity,
        "seconds": seconds,
        "block_sparsities": report.block_sparsities,
    }
    print(
        f"{method:<9} {options.get('allocation', 'uniform'):<12} ppl {r['perplexity']:.2f}  sparsity "
        f"{r['sparsity']:.4f}  blocks {[round(s, 3) for s in r['block_sparsities']]}  load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-windows", dest="eval_windows", type=int, default=200)
    p.add_argument("--cell-samples", dest="cell_samples", type=int, default=16, help="calibration segments per cell")
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument(
        "--nsamples", type=int, default=128, help="calibration segments of every prune (128: llm_pruning.py)"
    )
    p.add_argument("--profiles", default="block loss,local error,spdy", help="which profiles to measure")
    p.add_argument("--held-samples", dest="held_samples", type=int, default=32, help="calibration segments (seed 1) "
                   "the profiles and the search are scored on")  # fmt: skip
    p.add_argument("--evaluations", type=int, default=40, help="spdy: distinct assembled candidates scored")
    p.add_argument("--verify", type=int, default=3, help="spdy: best candidates pruned for real")
    p.add_argument("--granularity", choices=("blocks", "layers"), default="blocks", help="spdy: one sparsity per ...")
    p.add_argument("--tag", default="", help="suffix of the results file (parallel runs of one method each)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from secateurs.calibration import sample_segments
    from secateurs.hf import load_tokenizer

    load = os.getloadavg()
    segments = _segments(args.nsamples, 256)
    held = sample_segments(str(CALIB), load_tokenizer(str(MODEL)), args.held_samples, 256, seed=1)
    evaluation = [{"input_ids": held[i : i + 8], "labels": held[i : i + 8]} for i in range(0, len(held), 8)]
    dense = _ppl(_model(), args.eval_windows)
    rows = []
    for method in args.methods.split(","):
        results = {
            "uniform": _prune(method, segments, args.eval_windows),
            "owl": _prune(method, segments, args.eval_windows, allocation="owl"),
        }
        for kind in args.profiles.split(","):
            if kind == "spdy":
                result, seconds = _spdy(method, segments, evaluation, args)
                row = _prune(
                    method, segments, args.eval_windows, allocation="sensitivity",
                    allocation_options={"profile": result.profile},
                )  # fmt: skip
                row.update(analysis_seconds=seconds, search=result.profile.settings, history=result.history,
                           search_seconds=result.seconds)  # fmt: skip
                results["sensitivity (spdy)" if args.granularity == "blocks" else "sensitivity (spdy, layers)"] = row
                print(f"spdy: calibration loss {result.loss:.4f} (uniform {result.uniform_loss:.4f}), "
                      f"{len(result.history)} candidates, {seconds:.0f} s", flush=True)  # fmt: skip
                continue
            profile, seconds = _profile(
                method, "local" if kind == "local error" else "loss", segments, evaluation, args.cell_samples
            )
            row = _prune(
                method, segments, args.eval_windows, allocation="sensitivity", allocation_options={"profile": profile}
            )
            row["analysis_seconds"] = seconds
            row["profile_table"] = profile.table()
            results[f"sensitivity ({kind})"] = row
        for name, r in results.items():
            if name.startswith("sensitivity"):  # window by window against the baselines, on the same text
                r["vs_uniform"] = paired_windows(r.get("window_nll"), results["uniform"].get("window_nll"), name)
                r["vs_owl"] = paired_windows(r.get("window_nll"), results["owl"].get("window_nll"), name)
                print(f"{method} {name} vs uniform: {r['vs_uniform']}\n{method} {name} vs OWL: {r['vs_owl']}",
                      flush=True)  # fmt: skip
            rows.append({"method": method, "allocation": name, **r})
        _write(args, rows, dense, load)  # after each method: a partial run keeps what it measured
    print(table(rows, dense))


def _write(args: argparse.Namespace, rows: list[dict], dense: float, load: tuple) -> None:
    write_results(
        f"sensitivity_llm_{args.nsamples}{args.tag}",
        {
            "machine": machine(),
            "load_before": load,
            "load_after": os.getloadavg(),
            "dense_perplexity": dense,
            "eval_windows": args.eval_windows,
            "cell_samples": args.cell_samples,
            "held_samples": args.held_samples,
            "evaluations": args.evaluations,
            "nsamples": args.nsamples,
            "grid": GRID,
            "rows": rows,
        },
    )


def table(rows: list[dict], dense: float) -> str:
    lines = [
        f"dense perplexity {dense:.2f}",
        "| method | allocation | perplexity | sparsity | block sparsities | analysis |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        blocks = " ".join(f"{s:.2f}" for s in r["block_sparsities"])
        analysis = f"{r['analysis_seconds']:.0f} s" if "analysis_seconds" in r else "-"
        lines.append(
            f"| {r['method']} | {r['allocation']} | {r['perplexity']:.2f} | {r['sparsity']:.4f} | {blocks} | "
            f"{analysis} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
