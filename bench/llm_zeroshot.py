"""Zero-shot accuracy of pruned pydoc-llama-12m through lm-eval, offline.

The papers report zero-shot accuracy next to perplexity; lm-eval's standard tasks download
their datasets, which this machine cannot. So the task is secateurs' offline cloze
(``secateurs.llm.cloze_task``): 1000 lines of the held-out ``pydoc-test.txt``, each split in
half, the model choosing the line's own ending over another line's (chance: 0.5). Calibration
as in ``llm_pruning.py`` (128 x 256 tokens of ``pydoc-calib.txt``, seed 0).

Needs lm-eval in this environment: ``.venv/bin/pip install -e '.[eval]'`` (``make test-slow``
installs it too).

    .venv/bin/python bench/llm_zeroshot.py [--count 1000] [--nsamples 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import machine, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "pydoc-llama-12m"
CALIB = SHARED / "data" / "pydoc-calib.txt"
HELD_OUT = SHARED / "data" / "pydoc-test.txt"
SETTINGS = {"50%": (0.5, "element"), "2:4": (None, "2:4"), "70%": (0.7, "element")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="cloze items")
    parser.add_argument("--nsamples", type=int, default=128)
    args = parser.parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("this benchmark needs lm-eval: .venv/bin/pip install -e '.[eval]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.llm import cloze_task, prune_llm, zero_shot

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = cloze_task(HELD_OUT, Path(tmp) / "tasks", name="pydoc_cloze", count=args.count)
        runs = [("dense", "-")] + [(s, m) for s in SETTINGS for m in ("magnitude", "wanda", "sparsegpt")]
        for setting, method in runs:
            model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
            if method != "-":
                sparsity, pattern = SETTINGS[setting]
                prune_llm(model, method, sparsity, pattern=pattern, calibration=str(CALIB),
                          nsamples=args.nsamples, progress=False)  # fmt: skip
            t = time.perf_counter()
            metrics = zero_shot(model, tokenizer, ["pydoc_cloze"], batch_size=8, include_path=tasks)["pydoc_cloze"]
            row = {"setting": setting, "method": method, "acc": metrics["acc,none"],
                   "acc_stderr": metrics["acc_stderr,none"], "acc_norm": metrics["acc_norm,none"],
                   "acc_norm_stderr": metrics["acc_norm_stderr,none"],
                   "eval_seconds": time.perf_counter() - t}  # fmt: skip
            rows.append(row)
            print(f"{setting:>6} {method:>10}: acc {row['acc']:.3f}  acc_norm {row['acc_norm']:.3f} "
                  f"(±{row['acc_norm_stderr']:.3f})", flush=True)  # fmt: skip
    lines = ["| setting | method | acc | acc_norm (± stderr) |", "|---|---|---:|---:|"]
    lines += [f"| {r['setting']} | {r['method']} | {r['acc']:.3f} | {r['acc_norm']:.3f} (±{r['acc_norm_stderr']:.3f}) |"
              for r in rows]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    write_results("llm_zeroshot", {"machine": machine(), "model": MODEL.name, "task": {"source": HELD_OUT.name,
                  "count": args.count, "seed": 0, "choices": 2}, "calibration": {"file": CALIB.name,
                  "nsamples": args.nsamples, "seqlen": 256}, "rows": rows, "table": table,
                  "total_seconds": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
