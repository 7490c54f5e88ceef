"""Trace of one Bernoulli-mask search on pydoc-llama-12m: is it learning, and what?

Every ``eval_every`` steps the search measures its deterministic mask (the units ``mode='remove'``
would keep) on the calibration windows; this script also measures the same mask on held-out windows
(through the search's own mean-ablation hooks), so one sees side by side the mean *sampled* loss, the
*calibration* loss of the deterministic mask and its *held-out* loss. After the search the model is
actually cut (``mode='remove'``, bias compensation) and its held-out loss is measured with the same
loss on the same windows: it must equal the hooked loss of the mask it kept (the search optimises the
model it builds). Writes bench/results/<name>.json.

    PYTHONPATH=src .venv/bin/python bench/bernoulli_trace.py --ratio 0.4 --options '{"steps": 200}' \\
        [--nsamples 8] [--windows 20] [--name bernoulli_trace]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from _common import machine, write_results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--options", default="{}", help="Bernoulli method_options (JSON)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="bernoulli_trace")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from secateurs import prune
    from secateurs.calibration import sample_segments
    from secateurs.structural.bernoulli import Bernoulli, search_loss
    from structural_models import LLAMA, SHARED, llama

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA)
    calib = [s.unsqueeze(0) for s in sample_segments(SHARED / "data" / "pydoc-calib.txt", tokenizer, args.nsamples,
                                                     256, seed=0)]  # fmt: skip
    test = tokenizer((SHARED / "data" / "pydoc-test.txt").read_text(), return_tensors="pt").input_ids[0]
    held = [test[i * 256 : (i + 1) * 256].unsqueeze(0) for i in range(args.windows)]
    model = llama()
    options = {"eval_every": 25, **json.loads(args.options)}
    crit = Bernoulli(**options)
    rows: list[dict] = []
    start = time.perf_counter()

    def monitor(step: int, mask: torch.Tensor, apply) -> None:
        held_loss = sum(float(search_loss(model, w)) for w in held) / len(held)
        _, sampled, calib_loss = crit.trace_[-1]
        rows.append({"step": step, "sampled": sampled, "calibration": calib_loss, "held_out": held_loss,
                     "changed_vs_init": None, "seconds": time.perf_counter() - start})  # fmt: skip
        rows[-1]["kept"] = mask.clone()
        ppl, seconds = float(torch.tensor(held_loss).exp()), time.perf_counter() - start
        print(f"step {step:5d}: sampled {sampled:.4f}  calib(det) {calib_loss:.4f}  held-out(det) {held_loss:.4f}"
              f"  ppl {ppl:.2f}  ({seconds:.0f} s)", flush=True)  # fmt: skip

    crit.monitor = monitor
    prune(model, method=crit, sparsity=args.ratio, mode="remove", calibration=calib, progress=False,
          structural={"latency": False, "gqa": "kv_groups"})  # fmt: skip
    with torch.no_grad():
        removed = sum(float(search_loss(model, w)) for w in held) / len(held)
    first = rows[0]["kept"]
    for r in rows:
        r["changed_vs_init"] = int((r.pop("kept") != first).sum())
    best = min(rows, key=lambda r: r["calibration"])
    print(f"removed model held-out loss {removed:.5f} (ppl {torch.tensor(removed).exp():.2f}); "
          f"hooked loss of the kept mask (step {best['step']}) {best['held_out']:.5f}")  # fmt: skip
    write_results(args.name, {"machine": machine(), "loadavg": os.getloadavg(), "settings": vars(args),
                              "options": options, "trace": rows, "removed_held_out_loss": removed,
                              "kept_step": best["step"]})  # fmt: skip


if __name__ == "__main__":
    main()
