"""LLM post-training pruning on pydoc-llama-12m: perplexity, time, memory, size; vs llm-compressor.

For dense, magnitude, Wanda and SparseGPT at 50% unstructured, 2:4, 4:8, 70% and 70% with OWL:
held-out perplexity (Wanda/SparseGPT protocol: non-overlapping 256-token windows of
``pydoc-test.txt``), pruning wall time, peak RSS of the pruning process (each run in its own
subprocess), and the compressed sparse checkpoint's size against dense. The same 128 x 256
calibration segments of ``pydoc-calib.txt`` go to llm-compressor's SparseGPT and Wanda, run
in a venv this script creates under ``bench/.envs/``; their pruned weights are evaluated by the
same perplexity code.

    .venv/bin/python bench/llm_pruning.py [--peers 50%,2:4] [--eval-windows 200] [--no-peers] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHARED = Path(os.environ.get("SECATEURS_SHARED", ROOT.parent / "shared"))
MODEL = SHARED / "models" / "pydoc-llama-12m"
CALIB = SHARED / "data" / "pydoc-calib.txt"
TEST = SHARED / "data" / "pydoc-test.txt"
PEER_ENV = BENCH / ".envs" / "llmcompressor"
PEER_PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1", "transformers>=5.15,<5.18")
SETTINGS = {  # name -> (sparsity, pattern, OWL), in the order they are run
    "50%": (0.5, "element", False),
    "2:4": (None, "2:4", False),
    "70% OWL": (0.7, "element", True),
    "70%": (0.7, "element", False),
    "4:8": (None, "4:8", False),
}
METHODS = ("magnitude", "wanda", "sparsegpt")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _segments(nsamples: int, seqlen: int):
    from transformers import AutoTokenizer

    from secateurs.calibration import sample_segments

    return sample_segments(str(CALIB), AutoTokenizer.from_pretrained(MODEL), nsamples, seqlen, seed=0)


def _ppl(model, eval_windows: int | None) -> float:
    return _evaluated(model, eval_windows).perplexity


def _evaluated(model, eval_windows: int | None):
    """``secateurs.llm.perplexity`` on the first ``eval_windows`` windows of 256 tokens of the held-out text
    (its ``window_nll`` lets two models be compared window by window)."""
    from transformers import AutoTokenizer

    from secateurs.calibration import token_stream
    from secateurs.llm import perplexity

    stream = token_stream(str(TEST), AutoTokenizer.from_pretrained(MODEL))
    if eval_windows:
        stream = stream[: eval_windows * 256]
    return perplexity(model, stream, seqlen=256, batch_size=8, progress=False)


def worker(args: argparse.Namespace) -> dict:
    """One pruning run in this (fresh) process; prints its result as JSON."""
    from transformers import AutoModelForCausalLM

    from secateurs.export import save_compressed
    from secateurs.llm import prune_llm
    from secateurs.patterns import NM, parse_pattern

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    result: dict = {"rss_before_mib": _peak_rss_mib()}
    if args.method != "dense":
        sparsity, pattern, owl = SETTINGS[args.setting]
        segments = _segments(args.nsamples, 256)
        start, cpu = time.perf_counter(), time.process_time()
        report = prune_llm(
            model, args.method, sparsity, pattern=pattern, allocation="owl" if owl else "uniform",
            calibration=segments, batch_size=args.batch_size, progress=False,
        )  # fmt: skip
        result.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu)
        result["peak_rss_mib"] = _peak_rss_mib()
        result["sparsity"] = report.sparsity
        nm = parse_pattern(pattern)
        with tempfile.TemporaryDirectory() as tmp:
            size = save_compressed(model, Path(tmp) / "m.safetensors", nm if isinstance(nm, NM) else None)
        result.update(compressed_bytes=size.file_bytes, dense_bytes=size.dense_bytes, formats=size.formats)
    result["perplexity"] = _ppl(model, args.eval_windows)
    return result


def peer_worker(args: argparse.Namespace) -> dict:
    """Evaluate weights llm-compressor saved, with our perplexity code (same protocol, same text)."""
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    load_model(model, args.weights)
    layers = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    zeros = sum(int((w == 0).sum()) for w in layers) / sum(w.numel() for w in layers)
    return {"perplexity": _ppl(model, args.eval_windows), "sparsity": zeros}


def _run(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_peer(python: Path, method: str, setting: str, segments_file: Path, common: list[str]) -> dict:
    sparsity, pattern, owl = SETTINGS[setting]
    mask = "0:0" if pattern == "element" else pattern
    s = sparsity if sparsity is not None else 1 - int(pattern.split(":")[0]) / int(pattern.split(":")[1])
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "pruned.safetensors"
        cmd = [str(python), str(BENCH / "_llmcompressor_worker.py"), "--model", str(MODEL),
               "--segments", str(segments_file), "--method", method, "--sparsity", str(s),
               "--pattern", mask, "--out", str(weights)]  # fmt: skip
        timing = _run([*cmd, "--owl"] if owl else cmd)
        evaluation = _run([sys.executable, __file__, "--peer-eval", str(weights), *common])
    return {**timing, **evaluation}


def table(rows: list[dict], peers: list[dict], dense: dict) -> str:
    lines = [
        "| setting | method | perplexity | vs dense | prune time | peak RSS | compressed / dense |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| dense | - | {dense['perplexity']:.2f} (all windows: {dense['full']['perplexity']:.3f}) | - | - | - | - |",
    ]
    for r in rows:
        size = f"{r['compressed_bytes'] / 2**20:.1f} / {r['dense_bytes'] / 2**20:.1f} MiB"
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['perplexity']:.2f} | {r['perplexity'] / dense['perplexity']:.3f}x "
            f"| {r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB | {size} |"
        )
    if peers:
        lines += [
            "",
            "| setting | method | secateurs ppl | llm-compressor ppl | ppl diff | secateurs time (cpu) "
            "| llm-compressor time (cpu) | time ratio (theirs / ours) | peak RSS ours / theirs |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ours = {(r["setting"], r["method"]): r for r in rows}
        for p in peers:
            o = ours[(p["setting"], p["method"])]
            diff = (o["perplexity"] / p["perplexity"] - 1) * 100
            lines.append(
                f"| {p['setting']} | {p['method']} | {o['perplexity']:.2f} | {p['perplexity']:.2f} | {diff:+.2f}% "
                f"| {o['seconds']:.1f} s ({o['cpu_seconds']:.0f}) | {p['seconds']:.1f} s ({p['cpu_seconds']:.0f}) "
                f"| {p['seconds'] / o['seconds']:.2f}x | {o['peak_rss_mib']:.0f} / {p['peak_rss_mib']:.0f} MiB |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    p.add_argument("--peer-eval", help=argparse.SUPPRESS)
    p.add_argument("--peers", default="50%,2:4", help="settings to run llm-compressor on (comma-separated)")
    p.add_argument("--no-peers", action="store_true", help="skip llm-compressor")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    p.add_argument("--eval-windows", dest="eval_windows", type=int, help="evaluate on the first N windows only")
    p.add_argument("--quick", action="store_true", help="16 segments, 40 eval windows, 50%% only (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.nsamples, args.eval_windows, args.peers = 16, args.eval_windows or 40, "50%"
    full = ["--nsamples", str(args.nsamples), "--batch-size", str(args.batch_size)]
    common = [*full, "--eval-windows", str(args.eval_windows)] if args.eval_windows else full
    if args.worker:
        args.method, args.setting = args.worker
        print(json.dumps(worker(args)))
        return
    if args.peer_eval:
        args.weights = args.peer_eval
        print(json.dumps(peer_worker(args)))
        return
    sys.path.insert(0, str(BENCH))
    from _common import ensure_venv, machine, write_results

    started = time.perf_counter()
    dense = {"full": _run([sys.executable, __file__, "--worker", "dense", "50%", *full])}
    print(f"dense: ppl {dense['full']['perplexity']:.3f} on every window", flush=True)
    dense.update(_run([sys.executable, __file__, "--worker", "dense", "50%", *common]) if args.eval_windows else {})
    dense.setdefault("perplexity", dense["full"]["perplexity"])
    print(f"dense: ppl {dense['perplexity']:.3f} on the evaluated windows", flush=True)
    settings = ["50%"] if args.quick else list(SETTINGS)
    peer_settings = [] if args.no_peers else [s.strip() for s in args.peers.split(",") if s.strip()]
    python = ensure_venv(PEER_ENV, PEER_PINS) if peer_settings else None
    rows, peers = [], []

    def save(partial: bool) -> None:
        text = table(rows, peers, dense)
        payload = {
            "machine": machine(),
            "model": str(MODEL.name),
            "calibration": {"file": CALIB.name, "nsamples": args.nsamples, "seqlen": 256, "seed": 0},
            "evaluation": {"file": TEST.name, "seqlen": 256, "windows": args.eval_windows or "all"},
            "batch_size": args.batch_size,
            "peer": {"name": "llm-compressor", "pins": PEER_PINS},
            "dense": dense,
            "secateurs": rows,
            "llm_compressor": peers,
            "table": text,
            "total_seconds": time.perf_counter() - started,
            "partial": partial,
        }
        write_results("llm_pruning" if not args.quick else "llm_pruning_quick", payload)

    with tempfile.TemporaryDirectory() as tmp:
        segments_file = Path(tmp) / "segments.pt"
        torch.save(_segments(args.nsamples, 256), segments_file)
        for setting in settings:
            for method in METHODS:  # each peer run right after ours: both see the same machine load
                r = _run([sys.executable, __file__, "--worker", method, setting, *common])
                rows.append({"setting": setting, "method": method, **r})
                print(f"{setting:>8} {method:>10}: ppl {r['perplexity']:.3f}  {r['seconds']:.1f} s", flush=True)
                save(partial=True)
                if setting in peer_settings and method in ("wanda", "sparsegpt"):
                    r = run_peer(python, method, setting, segments_file, common)
                    peers.append({"setting": setting, "method": method, **r})
                    print(f"  llm-compressor: ppl {r['perplexity']:.3f}  {r['seconds']:.1f} s", flush=True)
                    save(partial=True)
    print(table(rows, peers, dense))
    save(partial=False)


if __name__ == "__main__":
    main()
