"""TEAL activation sparsity on pydoc-llama-12m: perplexity at 0-60% with the greedy allocation on and off.

The protocol of ``bench/llm_pruning.py`` (its calibration segments of ``pydoc-calib.txt`` and its
perplexity on non-overlapping 256-token windows of ``pydoc-test.txt``). Each configuration is
calibrated ONCE; every target is then set at run time from the stored distributions (no
recalibration), which is the point of the method. CATS (the MLP gate activation only) is shown
beside it. Also reported: the sparsity measured entering the layers on held-out text (the thresholds
come from calibration text), and a plot of the quality curve.

    .venv/bin/python bench/dynamic_llm_quality.py [--nsamples 16] [--eval-windows 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
LEVELS = (0.0, 0.25, 0.4, 0.5, 0.6)
CONFIGS = {
    "TEAL greedy": ("teal", "greedy"),
    "TEAL uniform": ("teal", "uniform"),
    "CATS (MLP gate)": ("cats", "uniform"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--eval-windows", dest="eval_windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    sys.path.insert(0, str(BENCH))
    from transformers import AutoModelForCausalLM

    from _common import RESULTS, machine, write_results
    from llm_pruning import MODEL, _ppl, _segments
    from secateurs.dynamic import sparsify_activations

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    segments = _segments(args.nsamples, 256)
    held_out = _held_out(args.eval_windows)
    results: dict[str, list[dict]] = {}
    dense_ppl = None
    for label, (method, allocation) in CONFIGS.items():
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
        if dense_ppl is None:
            dense_ppl = _ppl(model, args.eval_windows)
        start = time.perf_counter()
        sparse = sparsify_activations(model, segments, method=method, allocation=allocation, batch_size=4)
        seconds = time.perf_counter() - start
        results[label] = []
        for level in LEVELS:
            sparse.set_sparsity(level)
            ppl = _ppl(model, args.eval_windows)
            measured = sparse.measure(held_out, batch_size=4)["<weighted>"]
            results[label].append({"sparsity": level, "perplexity": ppl, "measured_held_out": measured,
                                   "calibration_seconds": seconds})  # fmt: skip
            print(
                f"{label:>16} {level:.0%}: ppl {ppl:.3f} (dense {dense_ppl:.3f}), measured {measured:.1%}", flush=True
            )
    table = _table(results, dense_ppl)
    print(table)
    plot = _plot(results, dense_ppl, RESULTS / "dynamic_llm_quality.png")
    write_results(
        "dynamic_llm_quality",
        {
            "machine": machine(),
            "load_average_end": os.getloadavg(),
            "model": MODEL.name,
            "calibration": {"file": "pydoc-calib.txt", "nsamples": args.nsamples, "seqlen": 256, "seed": 0},
            "evaluation": {"file": "pydoc-test.txt", "seqlen": 256, "windows": args.eval_windows},
            "dense_perplexity": dense_ppl,
            "results": results,
            "plot": str(plot.relative_to(BENCH.parent)) if plot else None,
            "table": table,
            "seconds": time.perf_counter() - started,
        },
    )


def _held_out(windows: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from llm_pruning import MODEL, TEST
    from secateurs.calibration import token_stream

    stream = token_stream(str(TEST), AutoTokenizer.from_pretrained(MODEL))[: min(windows, 8) * 256]
    return stream.reshape(-1, 256)


def _table(results: dict[str, list[dict]], dense: float) -> str:
    labels = list(results)
    lines = [
        "| target | "
        + " | ".join(f"{label} ppl (x dense)" for label in labels)
        + " | "
        + " | ".join(f"{label} measured on held-out" for label in labels)
        + " |",
        "|---:|" + "---:|" * (2 * len(labels)),
    ]
    for i, level in enumerate(LEVELS):
        cells = [
            f"{results[label][i]['perplexity']:.2f} ({results[label][i]['perplexity'] / dense:.3f}x)"
            for label in labels
        ]
        measured = [f"{results[label][i]['measured_held_out']:.1%}" for label in labels]
        lines.append(f"| {level:.0%} | " + " | ".join(cells + measured) + " |")
    return "\n".join(lines)


def _plot(results: dict[str, list[dict]], dense: float, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in results.items():
        ax.plot([r["sparsity"] * 100 for r in rows], [r["perplexity"] for r in rows], marker="o", label=label)
    ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("activation sparsity target (%)")
    ax.set_ylabel("perplexity (pydoc-test, 256-token windows)")
    ax.set_title("pydoc-llama-12m: activation sparsity vs quality")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
