"""Channel removal on torchvision's classification zoo, secateurs vs Torch-Pruning 1.6.1.

Every model ``torchvision.models.list_models`` registers (those over ``--max-params`` parameters
are listed and left out, to keep the run within ~15 minutes on a shared 2-core machine), random
init, one 224x224 input: 30% of every channel group removed, L2 group norm, uniform ratio, the
final classifier kept (Torch-Pruning: its examples' settings, see ``_torch_pruning_vision_worker.py``,
run in ``bench/.envs/torch-pruning`` alongside, one thread each). Per model and tool: success or
the error, parameters and MACs after / before (the same counter for both), prune seconds. For
secateurs, the zero-unit check on a fresh model (``_vision_zoo.zero_unit_check``: zero exactly the
channels about to go, remove them, outputs unchanged), at ``--check-size`` (ViT and MaxViT are
built for that size; MaxViT needs 224).

    .venv/bin/python bench/structural_vision_zoo.py [--models resnet18,vit_b_16] [--no-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import secateurs
from _common import ensure_venv, machine, write_results
from _vision_zoo import MIN_SIZE, build, prune_ours, published_params, zero_unit_check, zoo

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEER_ENV = BENCH / ".envs" / "torch-pruning"
PEER_PINS = ("torch==2.13.0", "torchvision==0.28.0", "torch-pruning==1.6.1", "numpy", "safetensors", "pyyaml",
             "tqdm")  # fmt: skip


def start_peer(python: Path, names: list[str], size: int, timeout: int, log: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{BENCH}", "OMP_NUM_THREADS": "1"}
    cmd = [str(python), "-W", "ignore", str(BENCH / "_torch_pruning_vision_worker.py"), "--size", str(size),
           "--timeout", str(timeout), *names]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def collect_peer(proc: subprocess.Popen, log: Any, names: list[str], wait: float) -> dict[str, dict[str, Any]]:
    """The worker's JSON lines; past ``wait`` seconds it is stopped and the models it did not reach say so."""
    try:
        proc.wait(timeout=max(wait, 1.0))
        why = "worker exited before this model"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        why = "not reached before the run's deadline"
    log.seek(0)
    rows, other = {}, []
    for line in log.read().splitlines():
        if line.startswith('{"tool"'):
            row = json.loads(line)
            rows[row["model"]] = row
        else:
            other.append(line)
    for name in names:
        rows.setdefault(name, {"model": name, "ok": None, "error": f"{why}: {' '.join(other)[-300:]}"})
    return rows


def run_ours(name: str, size: int, check_size: int | None) -> dict[str, Any]:
    result: dict[str, Any] = {"tool": f"secateurs {secateurs.__version__}", "model": name}
    model, x = build(name, size)
    try:
        with torch.no_grad():
            dense_shape = tuple(model(x).shape)
        start = time.perf_counter()
        report = prune_ours(model, x)
        result["seconds"] = time.perf_counter() - start
        with torch.no_grad():
            out = model(x)
        assert tuple(out.shape) == dense_shape and bool(torch.isfinite(out).all())
        result.update(params_dense=report.before.params, params_pruned=report.after.params,
                      macs_dense=report.before.macs, macs_pruned=report.after.macs, ok=True)  # fmt: skip
    except Exception as exc:  # a refusal is a result
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
        return result
    if check_size:
        csize = max(check_size, MIN_SIZE.get(name, 0))
        try:
            result["zero_unit_check"] = {"size": csize, **zero_unit_check(*build(name, csize))}
        except Exception as exc:
            result["zero_unit_check"] = {"size": csize, "exact": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return result


def _red(r: dict[str, Any], what: str) -> str:
    return f"{1 - r[f'{what}_pruned'] / r[f'{what}_dense']:.0%}" if r.get("ok") else "-"


def _status(r: dict[str, Any]) -> str:
    return {True: "ok", False: "FAIL", None: "not run"}[r.get("ok")]


def table(names: list[str], ours: dict, peer: dict) -> str:
    head = (f"{'model':<20} {'M params':>8} | {'secateurs':<9} {'params-':>7} {'MACs-':>6} {'zero-unit check':<22} | "
            f"{'Torch-Pruning':<13} {'params-':>7} {'MACs-':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for n in names:
        o, p = ours[n], peer.get(n, {})
        check = o.get("zero_unit_check")
        if check is None:
            ctext = "-"
        elif "error" in check:
            ctext = "ERROR"
        else:
            verdict = "exact" if check["exact"] else "DIFFERS"
            ctext = f"{verdict} {check['checked']}/{check['groups']} {check['relative_diff']:.0e}"
        dense = o.get("params_dense") or p.get("params_dense") or 0
        status, peer_status = _status(o), _status(p) if p else "n/a"
        lines.append(
            f"{n:<20} {dense / 1e6:>8.1f} | {status:<9} {_red(o, 'params'):>7} {_red(o, 'macs'):>6} {ctext:<22} | "
            f"{peer_status:<13} {_red(p, 'params'):>7} {_red(p, 'macs'):>6}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated subset (default: the whole zoo)")
    parser.add_argument("--max-params", type=float, default=100e6, help="leave out larger models (0: none)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--check-size", type=int, default=96, help="input size of the zero-unit check (0: skip)")
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--peer-timeout", type=int, default=90, help="seconds per Torch-Pruning model")
    parser.add_argument("--deadline", type=float, default=0, help="minutes: start no model after this (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    every = zoo()
    names = args.models.split(",") if args.models else every
    left_out = {}
    if args.max_params and not args.models:
        sizes = {n: published_params(n) for n in names}
        left_out = {n: s for n, s in sizes.items() if s > args.max_params}
        names = [n for n in names if n not in left_out]
    print(f"{len(names)} of {len(every)} zoo models; left out (> {args.max_params / 1e6:.0f}M params): "
          f"{', '.join(left_out) or 'none'}", flush=True)  # fmt: skip
    load_start = os.getloadavg()
    started = time.perf_counter()
    names.sort(key=published_params)  # smallest first: a deadline cuts the largest
    with tempfile.TemporaryFile("w+") as log:
        proc = None
        if not args.no_peer:
            proc = start_peer(ensure_venv(PEER_ENV, PEER_PINS), names, args.size, args.peer_timeout, log)
        ours = {}
        for name in names:
            if args.deadline and time.perf_counter() - started > args.deadline * 60:
                ours[name] = {"model": name, "ok": None, "error": "not reached before the run's deadline"}
                continue
            ours[name] = run_ours(name, args.size, args.check_size)
            print(
                f"[{name}] secateurs {'ok' if ours[name]['ok'] else 'FAIL: ' + ours[name]['error'][:150]}", flush=True
            )
        wait = args.deadline * 60 - (time.perf_counter() - started) if args.deadline else 1e9
        peer = collect_peer(proc, log, names, wait) if proc is not None else {}
    print(table(names, ours, peer))
    summary = {
        "models": len(names),
        "secateurs_ok": sum(r["ok"] is True for r in ours.values()),
        "secateurs_not_run": sum(r["ok"] is None for r in ours.values()),
        "secateurs_zero_unit_exact": sum(bool(r.get("zero_unit_check", {}).get("exact")) for r in ours.values()),
        "torch_pruning_ok": sum(r.get("ok") is True for r in peer.values()) if peer else None,
        "torch_pruning_not_run": sum(r.get("ok") is None for r in peer.values()) if peer else None,
    }
    print(f"\nsummary: {summary}")
    write_results("structural_vision_zoo", {
        "machine": {**machine(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "seconds": time.perf_counter() - started, "size": args.size, "ratio": 0.3, "left_out": left_out,
        "summary": summary, "secateurs": ours, "torch_pruning": peer,
        "protocol": "random init, uniform 30% of every channel group, L2 group norm, final classifier kept; "
                    "one thread per tool, both tools running at the same time",
    })  # fmt: skip


if __name__ == "__main__":
    main()
