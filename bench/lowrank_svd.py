"""Low-rank factorisation: activation-aware (whitened, SVD-LLM) against plain truncated SVD at equal parameters.

Every Linear inside the blocks of pydoc-llama-12m (q/k/v/o, gate/up/down) and of all-MiniLM-L6-v2
(query/key/value/output, intermediate/output) is factored to the rank that keeps ``ratio`` of its
weights, once by the plain SVD and once whitened by the calibration inputs' second moment; the two
models have exactly the same parameter count. Quality: held-out perplexity (Wanda/SparseGPT protocol,
non-overlapping 256-token windows of pydoc-test.txt) for the Llama, mean cosine of sentence
embeddings to the dense model's for MiniLM. Latency: dense vs factored, timed alternately
(``paired_latency``), batch 8 x 256 tokens (Llama) and 32 sentences (MiniLM). No retraining.

    .venv/bin/python bench/lowrank_svd.py [--ratios 0.8,0.6] [--windows 40] [--nsamples 16] [--no-latency]
    .venv/bin/python bench/lowrank_svd.py --latency-only   # timings only (quiet machine), no quality

``--no-latency`` measures quality only (a busy machine); ``--latency-only`` factors the models and
times them only, writing ``bench/results/lowrank_svd_latency.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from _common import machine, write_results
from structural_models import (
    SHARED,
    embedding_fidelity,
    llama,
    minilm,
    minilm_tokenizer,
    paired_latency,
    params,
    sentences,
)

LLAMA_SCOPE = {"include": ["model.layers.*"], "skip_last": False}
MINILM_SCOPE = {"include": ["encoder.layer.*"], "skip_first": False, "skip_last": False}


def main() -> None:
    from transformers import AutoTokenizer

    from secateurs.calibration import sample_segments
    from secateurs.llm import perplexity
    from secateurs.lowrank import factorize
    from structural_models import LLAMA

    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", default="0.8,0.6", help="fraction of each layer's weights kept")
    parser.add_argument("--windows", type=int, default=40, help="256-token test windows")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration segments")
    timing = parser.add_mutually_exclusive_group()
    timing.add_argument("--no-latency", action="store_true", help="quality only")
    timing.add_argument("--latency-only", action="store_true", help="timings only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine)")
    args = parser.parse_args()
    name = "lowrank_svd_latency" if args.latency_only else "lowrank_svd"
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    tokenizer = AutoTokenizer.from_pretrained(LLAMA)
    calib = [s.unsqueeze(0) for s in sample_segments(SHARED / "data" / "pydoc-calib.txt", tokenizer, args.nsamples,
                                                     256, seed=0)]  # fmt: skip
    test = tokenizer((SHARED / "data" / "pydoc-test.txt").read_text(), return_tensors="pt").input_ids[0]
    test = test[: args.windows * 256]

    def ppl(model) -> float | None:
        if args.latency_only:
            return None
        return perplexity(model, test, tokenizer, seqlen=256, progress=False).perplexity

    dense = llama()
    rows = [{"model": "pydoc-llama-12m", "method": "dense", "ratio": 1.0, "params": params(dense),
             "perplexity": ppl(dense)}]  # fmt: skip
    print(f"llama dense: perplexity {rows[0]['perplexity']}", flush=True)
    mtok = minilm_tokenizer()
    mdense = minilm()
    mcalib = [mtok(s, return_tensors="pt", truncation=True, max_length=128)["input_ids"]
              for s in (SHARED / "data" / "pydoc-calib.txt").read_text().split("\n\n")[:32] if s.strip()]  # fmt: skip
    latency_inputs = torch.randint(0, 8192, (8, 256), generator=torch.Generator().manual_seed(0))
    ratios = [float(r) for r in args.ratios.split(",")]

    def save(partial: bool, table: str = "") -> None:  # after every row: a slow, shared machine may cut the run short
        write_results(name, {"machine": machine(), "loadavg_start": load_start,
                                      "loadavg_end": os.getloadavg(), "partial": partial,
                                      "calibration": {"nsamples": args.nsamples, "seqlen": 256, "seed": 0},
                                      "test_tokens": int(test.numel()), "rows": rows, "table": table})  # fmt: skip

    for ratio in ratios:  # the Llama first (perplexity), then MiniLM
        for method in ("svd", "whitened"):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = factorize(model, ratio=ratio, method=method, calibration=calib, scope=LLAMA_SCOPE)
            seconds = time.perf_counter() - start
            row = {"model": "pydoc-llama-12m", "method": method, "ratio": ratio, "params": params(model),
                   "layers": len(report.layers), "seconds": seconds, "perplexity": ppl(model)}  # fmt: skip
            if not args.no_latency:
                td, tp = paired_latency(dense, model, latency_inputs, budget_s=3.0)
                row.update(latency_dense_s=td, latency_factored_s=tp, speedup=td / tp, loadavg=os.getloadavg())
            rows.append(row)
            save(True)
            print(f"llama {method} keep {ratio:.0%}: ppl {row['perplexity']}, params {row['params']:,}, "
                  f"speed-up {row.get('speedup')}", flush=True)  # fmt: skip
    for ratio in ratios:
        for method in ("svd", "whitened"):
            model = copy.deepcopy(mdense)
            start = time.perf_counter()
            report = factorize(model, ratio=ratio, method=method, calibration=mcalib, scope=MINILM_SCOPE)
            seconds = time.perf_counter() - start
            if args.latency_only:
                batch = mtok(sentences(SHARED / "data" / "pydoc-test.txt", 32), padding="max_length", max_length=128,
                             truncation=True, return_tensors="pt")  # fmt: skip
                td, tp = paired_latency(mdense, model, dict(batch))
                fid = {"latency_ratio_b32": td / tp, "loadavg": os.getloadavg()}
            else:
                fid = embedding_fidelity(mdense, model, mtok, latency=not args.no_latency)
            row = {"model": "all-MiniLM-L6-v2", "method": method, "ratio": ratio, "params": params(model),
                   "params_dense": params(mdense), "layers": len(report.layers), "seconds": seconds, **fid}  # fmt: skip
            rows.append(row)
            save(True)
            print(f"minilm {method} keep {ratio:.0%}: cosine {fid.get('cosine_mean')}, "
                  f"speed-up {fid.get('latency_ratio_b32')}", flush=True)  # fmt: skip
    lines = ["| model | keep | method | params | perplexity / mean cosine | speed-up (dense/factored) |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if r.get("perplexity") is not None:
            quality = f"{r['perplexity']:.2f}"
        else:
            quality = f"{r['cosine_mean']:.4f}" if "cosine_mean" in r else "-"
        speed = r.get("speedup", r.get("latency_ratio_b32"))
        lines.append(f"| {r['model']} | {r['ratio']:.0%} | {r['method']} | {r['params']:,} | {quality} | "
                     + (f"{speed:.2f}x |" if speed else "- |"))  # fmt: skip
    table = "\n".join(lines)
    print(table)
    save(False, table)


if __name__ == "__main__":
    main()
