"""ALPS against SparseGPT and Wanda on pydoc-llama-12m: perplexity and pruning wall time.

The protocol of ``bench/llm_pruning.py`` (128 x 256-token calibration segments of
``pydoc-calib.txt``, seed 0; perplexity on non-overlapping 256-token windows of ``pydoc-test.txt``),
block runner (``prune_llm``), each run in its own process. Settings: 50/60/70/80% unstructured,
2:4, 4:8, and 70% with OWL allocation. For ALPS the table also gives the ADMM's largest iteration
count and how many layers hit the cap. The machine's load average is recorded before and after
every run (the machine is shared: compare within a row's load, not across runs).

    .venv/bin/python bench/alps_llm.py [--settings 70%,60%,80%,2:4] [--methods alps,sparsegpt,wanda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import llm_pruning as protocol  # noqa: E402  (the shared protocol: model, segments, perplexity)

SETTINGS = {  # name -> (sparsity, pattern, allocation); in the order run by default (the targets first)
    "70%": (0.7, "element", "uniform"),
    "60%": (0.6, "element", "uniform"),
    "80%": (0.8, "element", "uniform"),
    "2:4": (None, "2:4", "uniform"),
    "50%": (0.5, "element", "uniform"),
    "4:8": (None, "4:8", "uniform"),
    "70% OWL": (0.7, "element", "owl"),
}
METHODS = ("alps", "sparsegpt", "wanda")


def worker(method: str, setting: str, nsamples: int, eval_windows: int | None) -> dict:
    from transformers import AutoModelForCausalLM

    from secateurs.llm import prune_llm

    model = AutoModelForCausalLM.from_pretrained(protocol.MODEL, dtype=torch.float32)
    sparsity, pattern, allocation = SETTINGS[setting]
    segments = protocol._segments(nsamples, 256)
    load_before = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    report = prune_llm(model, method, sparsity, pattern=pattern, allocation=allocation, calibration=segments,
                       progress=False)  # fmt: skip
    result = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    result.update(load_before=load_before, load_after=os.getloadavg(), sparsity=report.sparsity)
    solved = [layer.solver for layer in report.details.solved if layer.solver]
    if solved and "iterations" in solved[0]:
        result["admm_iterations_max"] = max(s["iterations"] for s in solved)
        result["admm_iterations_mean"] = sum(s["iterations"] for s in solved) / len(solved)
        result["not_converged"] = sum(not s["converged"] for s in solved)
        result["layers"] = len(solved)
    result["perplexity"] = protocol._ppl(model, eval_windows)
    return result


def _run(cmd: list[str]) -> dict:
    """One worker process; like ``llm_pruning._run``, with the caller's PYTHONPATH kept after ``src``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH.parent / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], dense: float) -> str:
    lines = [
        "| setting | method | perplexity | vs dense | vs SparseGPT | prune time (CPU s) "
        "| load avg (1 min) before / after | ADMM iterations (mean / max, capped layers) | run at |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    obs = {r["setting"]: r["perplexity"] for r in rows if r["method"] == "sparsegpt"}
    for r in rows:
        versus = f"{r['perplexity'] / obs[r['setting']] - 1:+.1%}" if r["setting"] in obs else "-"
        admm = (
            f"{r['admm_iterations_mean']:.0f} / {r['admm_iterations_max']} ({r['not_converged']} of {r['layers']})"
            if "admm_iterations_max" in r
            else "-"
        )
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['perplexity']:.2f} | {r['perplexity'] / dense:.3f}x | {versus} "
            f"| {r['seconds']:.0f} s ({r['cpu_seconds']:.0f}) | {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} "
            f"| {admm} | {r.get('date', '-')[11:]} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, from: " + ", ".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--eval-windows", dest="eval_windows", type=int, help="evaluate on the first N windows only")
    p.add_argument("--dense", type=float, default=42.954, help="dense perplexity (all windows; measured if 0)")
    p.add_argument("--name", default="alps_llm")
    p.add_argument("--combine", help="comma-separated result names to merge into --name (no run)")
    p.add_argument("--merge", action="store_true", help="keep the rows of an earlier run (replacing the ones redone)")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.nsamples, args.eval_windows)))
        return
    if args.combine:  # runs split over several processes (a shared machine): one table, in SETTINGS order
        from _common import write_results

        parts = [json.loads((BENCH / "results" / f"{name}.json").read_text()) for name in args.combine.split(",")]
        rows = [r for part in parts for r in part["rows"]]
        order = {s: i for i, s in enumerate(SETTINGS)}
        rows.sort(key=lambda r: (order[r["setting"]], METHODS.index(r["method"]), r.get("date", "")))
        runs = [{"machine": p["machine"], "total_seconds": p["total_seconds"]} for p in parts]
        write_results(args.name, {**parts[0], "rows": rows, "table": table(rows, args.dense), "parts": runs})
        print(table(rows, args.dense))
        return
    from _common import machine, write_results

    common = ["--nsamples", str(args.nsamples)] + (
        ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
    )
    rows: list[dict] = []
    previous = BENCH / "results" / f"{args.name}.json"
    if args.merge and previous.exists():  # runs done earlier (the machine is shared: settings run in turns)
        rows = json.loads(previous.read_text())["rows"]
    started = time.perf_counter()
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            r = _run([sys.executable, __file__, "--worker", method, setting, *common])
            rows = [x for x in rows if (x["setting"], x["method"]) != (setting, method)]
            rows.append(
                {"setting": setting, "method": method, **r, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            )
            print(f"{setting:>8} {method:>10}: ppl {r['perplexity']:.3f}  {r['seconds']:.0f} s  "
                  f"load {r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}", flush=True)  # fmt: skip
            write_results(args.name, {
                "machine": machine(), "model": protocol.MODEL.name,
                "calibration": {"file": protocol.CALIB.name, "nsamples": args.nsamples, "seqlen": 256, "seed": 0},
                "evaluation": {"file": protocol.TEST.name, "seqlen": 256, "windows": args.eval_windows or "all"},
                "dense_perplexity": args.dense, "rows": rows, "table": table(rows, args.dense),
                "total_seconds": time.perf_counter() - started,
            })  # fmt: skip
    print(table(rows, args.dense))


if __name__ == "__main__":
    main()
