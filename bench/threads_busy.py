"""Layerwise LLM pruning on a busy CPU: torch's default thread count against ``--threads 1``.

Runs ``secateurs prune pydoc-llama-12m --method wanda --sparsity 0.5 --calib pydoc-calib.txt``
as a user would (a fresh process each time), alternating the thread settings so both see the
same machine, while ``--burners`` busy-looping processes stand for other work on the machine.
Records wall seconds, the load average before each run and whether the CLI printed its
oversubscription note.

    .venv/bin/python bench/threads_busy.py [--repeats 3] [--burners 1] [--method wanda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, write_results

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "pydoc-llama-12m"
CALIB = SHARED / "data" / "pydoc-calib.txt"
SECATEURS = Path(sys.executable).parent / "secateurs"


def run(threads: int | None, method: str, out: Path) -> dict:
    args = [str(SECATEURS), "prune", str(MODEL), "--method", method, "--sparsity", "0.5", "--calib", str(CALIB),
            "--out", str(out), "--overwrite"]  # fmt: skip
    if threads is not None:
        args += ["--threads", str(threads)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return {"threads": threads or "default", "seconds": seconds, "load_before": load,
            "noted": "secateurs: note:" in done.stderr}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burners", type=int, default=1, help="busy-looping processes running meanwhile")
    parser.add_argument("--method", default="wanda")
    args = parser.parse_args()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    started = time.perf_counter()
    rows = []
    try:
        time.sleep(5)  # let the load average see the burners
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for threads in (None, 1):
                    rows.append(run(threads, args.method, Path(tmp) / "out"))
                    print(rows[-1], flush=True)
    finally:
        for p in burners:
            p.kill()
    summary = {}
    for setting in ("default", 1):
        times = [r["seconds"] for r in rows if r["threads"] == setting]
        summary[str(setting)] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    print(summary)
    write_results("threads_busy", {"machine": machine(), "burners": args.burners, "method": args.method,
                                   "rows": rows, "summary": summary,
                                   "total_seconds": time.perf_counter() - started})  # fmt: skip


if __name__ == "__main__":
    main()
