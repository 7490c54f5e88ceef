"""Why OWL does not help pydoc-llama-12m at 70%: its outlier ratios, and a sweep of M and lambda.

OWL (Yin et al. 2023, arXiv:2310.05175) min-max normalises the blocks' outlier ratios, so any
difference between blocks, however small, becomes the full +-lambda sparsity spread. This
prints each block's ratio and resulting sparsity, then Wanda-at-70% perplexity for a few
(M, lambda), on the same calibration segments and evaluation windows as ``llm_pruning.py``.

    .venv/bin/python bench/llm_owl_sweep.py [--eval-windows 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results
from llm_pruning import MODEL, _ppl, _segments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-windows", dest="eval_windows", type=int, default=200)
    p.add_argument("--method", default="wanda")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from secateurs.llm import prune_llm

    segments = _segments(128, 256)
    grid = [(5.0, 0.08), (5.0, 0.02), (3.0, 0.08)]  # uniform 70% is in llm_pruning.json
    rows = []
    for m, lam in grid:
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        options = {"allocation": "owl", "allocation_options": {"m": m, "lam": lam}} if m else {}
        report = prune_llm(model, args.method, 0.7, calibration=segments, progress=False, **options)
        row = {
            "owl_m": m,
            "owl_lambda": lam,
            "outlier_ratios": report.outlier_ratios,
            "block_sparsities": report.block_sparsities,
            "perplexity": _ppl(model, args.eval_windows),
        }
        rows.append(row)
        ratios = ", ".join(f"{r:.4f}" for r in row["outlier_ratios"] or [])
        sparsities = ", ".join(f"{s:.3f}" for s in row["block_sparsities"])
        print(f"M={m} lambda={lam}: ppl {row['perplexity']:.3f} | ratios [{ratios}] | sparsities [{sparsities}]")
    write_results(f"llm_owl_sweep_{args.method}", {"machine": machine(), "method": args.method, "rows": rows})


if __name__ == "__main__":
    main()
