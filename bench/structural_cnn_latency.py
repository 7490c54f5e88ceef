"""Where does channel removal turn into CPU speed? The three CNNs of the structural benchmark,
half their channels removed by secateurs, timed at batch 1 over input sizes and memory formats.

The structural benchmark times the CNNs on 32x32 inputs, where a batch-1 forward takes a few
milliseconds and per-op dispatch is a fixed cost that removal cannot shrink. This script
separates that cost from the compute: for each input size it times dense and pruned
alternately in one process (median), in contiguous and ``channels_last`` layout, and reports
speed-up / MACs reduction (efficiency): the median of ``--repeats`` paired measurements, with
their range, because a shared machine moves single measurements by tens of percent. The
smallest size (8x8 by default) shows the floor: what a forward costs when its convolutions
cost almost nothing, dense and pruned.

    .venv/bin/python bench/structural_cnn_latency.py [--sizes 32,64,128,224] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from _common import machine, write_results
from structural_models import build, copy_model, macs, paired_latency
from structural_vs_torch_pruning import prune_ours

CNNS = ("resnet_like", "densenet_like", "mobilenet_like")


def images(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def measure_model(name: str, sizes: list[int], budget: float, repeats: int) -> list[dict[str, Any]]:
    dense = build(name)
    pruned = copy_model(dense)
    prune_ours(name, pruned)
    rows = []
    for fmt in ("contiguous", "channels_last"):
        memory = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        a, b = copy_model(dense).to(memory_format=memory), copy_model(pruned).to(memory_format=memory)
        for size in sizes:
            x = images(size).to(memory_format=memory)
            md, mp = macs(a, x), macs(b, x)
            pairs = [paired_latency(a, b, x, budget_s=budget) for _ in range(repeats)]
            effs = sorted((td / tp) / (md / mp) for td, tp in pairs)
            td, tp = (statistics.median(t) for t in zip(*pairs))
            row = {"model": name, "format": fmt, "size": size, "macs_dense": md, "macs_pruned": mp,
                   "latency_dense_ms": td * 1e3, "latency_pruned_ms": tp * 1e3, "speedup": td / tp,
                   "macs_reduction": md / mp, "efficiency": statistics.median(effs),
                   "efficiency_range": [effs[0], effs[-1]]}  # fmt: skip
            print(f"  {name:<15} {fmt:<13} {size:>4}px  {td * 1e3:8.2f} -> {tp * 1e3:8.2f} ms  "
                  f"eff {row['efficiency']:.2f} ({effs[0]:.2f}-{effs[-1]:.2f})", flush=True)  # fmt: skip
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    head = "| model | layout | " + " | ".join(f"{s}px" for s in sizes) + " |"
    lines = [head, "|---|---|" + "---:|" * len(sizes)]
    for name, fmt in dict.fromkeys((r["model"], r["format"]) for r in rows):
        cells = []
        for s in sizes:
            r = next(r for r in rows if r["model"] == name and r["format"] == fmt and r["size"] == s)
            lo, hi = r["efficiency_range"]
            cells.append(f"**{r['efficiency']:.2f}** ({lo:.2f}-{hi:.2f}; {r['latency_dense_ms']:.1f} → "
                         f"{r['latency_pruned_ms']:.1f})")  # fmt: skip
        lines.append(f"| {name} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8,32,64,128,224", help="input sizes (square images)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per (size, layout) pair")
    parser.add_argument("--repeats", type=int, default=5, help="paired measurements per cell (median, range)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in CNNS:
        rows += measure_model(name, sizes, args.budget, args.repeats)
    text = table(rows, sizes)
    print(text)
    write_results("structural_cnn_latency", {"machine": machine(), "ratio": 0.5, "batch": 1, "repeats": args.repeats,
                                             "rows": rows, "table": text,
                                             "total_seconds": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
