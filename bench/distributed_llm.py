"""Distributed calibration: 1 process vs ``torchrun --nproc_per_node 2`` (gloo, CPU) with prune_llm.

For pydoc-llama-12m (the ``bench/llm_pruning.py`` protocol: seeded 256-token segments of ``pydoc-calib.txt``,
perplexity on non-overlapping 256-token windows of ``pydoc-test.txt``) and a larger random-weight Llama (random
token calibration; its "perplexity" only checks that both runs compute the same model), Wanda and SparseGPT at
50%: wall time of the prune_llm call, peak RSS of every process, perplexity, and whether the 2-process masks equal
the 1-process ones. Each process uses one thread, so 2 processes use 2 cores. Also runs the CLI
(``torchrun ... -m secateurs prune``) on pydoc-llama-12m and compares its output with the 1-process weights.

    .venv/bin/python bench/distributed_llm.py [--nsamples 32] [--eval-windows 40] [--methods wanda,sparsegpt,owl,flap]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from _common import machine, write_results  # noqa: E402
from llm_pruning import CALIB, MODEL, _ppl, _segments  # noqa: E402

RANDOM = {
    "hidden_size": 1024,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 8192,
    "num_hidden_layers": 8,
    "max_position_embeddings": 256,
}


#: what ``--methods`` names: prune_llm's method and options (OWL: Wanda with OWL's layer-wise sparsities; FLAP and
#: ShortGPT remove heads/neurons and whole blocks, so their "masks" compare the shapes left)
METHODS = {
    "wanda": ("wanda", {"sparsity": 0.5}),
    "sparsegpt": ("sparsegpt", {"sparsity": 0.5}),
    "owl": ("wanda", {"sparsity": 0.5, "allocation": "owl"}),
    "flap": ("flap", {"sparsity": 0.2}),
    "shortgpt": ("shortgpt", {"sparsity": 0.25}),
}


def _model(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "pydoc-llama-12m":
        return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**RANDOM)).eval()


def _calibration(name: str, nsamples: int) -> torch.Tensor:
    if name == "pydoc-llama-12m":
        return _segments(nsamples, 256)
    return torch.randint(0, RANDOM["vocab_size"], (nsamples, 256), generator=torch.Generator().manual_seed(1))


def _perplexity(name: str, model, eval_windows: int) -> float:
    if name == "pydoc-llama-12m":
        return _ppl(model, eval_windows)
    from secateurs.llm import perplexity

    stream = torch.randint(0, RANDOM["vocab_size"], (eval_windows * 256,), generator=torch.Generator().manual_seed(2))
    return perplexity(model, stream, seqlen=256, batch_size=8, progress=False).perplexity


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): prune, then rank 0 evaluates and writes the masks and the result."""
    from safetensors.torch import save_file

    from secateurs.llm import prune_llm

    torch.set_num_threads(1)
    model = _model(args.model)
    calibration = _calibration(args.model, args.nsamples)
    start = time.perf_counter()
    method, options = METHODS[args.method]
    prune_llm(model, method, calibration=calibration, batch_size=1, progress=False, **options)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranks = [rss]
    if torch.distributed.is_initialized():
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, rss)
        if torch.distributed.get_rank() != 0:
            return
    out = Path(args.out)
    layers = {
        n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    }
    save_file({n: (w != 0).to(torch.uint8).contiguous() for n, w in layers.items()}, str(out / "masks.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
        str(out / "weights.safetensors"),
    )
    result = {
        "seconds": seconds,
        "peak_rss_mib": ranks,
        "perplexity": _perplexity(args.model, model, args.eval_windows),
    }
    (out / "result.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(BENCH), os.environ.get("PYTHONPATH", "")]),
    }


def _torchrun(processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
    ]


def run(model: str, method: str, processes: int, args: argparse.Namespace, out: Path) -> dict:
    out.mkdir(parents=True)
    command = [
        str(Path(__file__)),
        "--worker",
        "--model",
        model,
        "--method",
        method,
        "--out",
        str(out),
        "--nsamples",
        str(args.nsamples),
        "--eval-windows",
        str(args.eval_windows),
    ]
    launcher = [sys.executable] if processes == 1 else _torchrun(processes)
    load = os.getloadavg()[0]
    wall = time.perf_counter()
    done = subprocess.run([*launcher, *command], capture_output=True, text=True, env=_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{model} {method} x{processes} failed:\n{done.stderr[-4000:]}")
    result = json.loads((out / "result.json").read_text())
    result.update(
        model=model,
        method=method,
        processes=processes,
        load_before=load,
        process_wall_seconds=time.perf_counter() - wall,
    )
    return result


def _same(a: Path, b: Path) -> tuple[bool, float]:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    if left.keys() != right.keys():
        return False, float("inf")
    same = all(torch.equal(left[k], right[k]) for k in left)
    return same, 0.0


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    if left.keys() != right.keys() or any(left[k].shape != right[k].shape for k in left):
        return float("inf")  # other units or blocks removed
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def cli_check(args: argparse.Namespace, work: Path, single: Path) -> dict:
    """``torchrun --nproc_per_node 2 -m secateurs prune`` on pydoc-llama-12m: the same weights as one process?"""
    from transformers import AutoModelForCausalLM

    out = work / "cli"
    command = [
        *_torchrun(2),
        "-m",
        "secateurs",
        "prune",
        str(MODEL),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calib",
        str(CALIB),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        "256",
        "--format",
        "hf",
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"CLI under torchrun failed:\n{done.stderr[-4000:]}")
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = load_file(single / "weights.safetensors")
    state = model.state_dict()
    same = all(torch.equal(state[k], v) for k, v in expected.items())
    return {
        "seconds": time.perf_counter() - start,
        "same_weights_as_one_process": same,
        "files": sorted(p.name for p in out.iterdir()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="pydoc-llama-12m")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--out")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--eval-windows", dest="eval_windows", type=int, default=40)
    parser.add_argument("--models", default="pydoc-llama-12m,random-llama-75m")
    parser.add_argument("--methods", default="wanda,sparsegpt", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--name", default="distributed_llm", help="bench/results/<name>.json")
    parser.add_argument("--no-cli", dest="cli", action="store_false", help="skip the torchrun CLI check")
    args = parser.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    if args.worker:
        worker(args)
        return
    payload: dict = {
        "machine": machine(),
        "load_start": os.getloadavg(),
        "nsamples": args.nsamples,
        "eval_windows": args.eval_windows,
        "random_llama": RANDOM,
        "runs": [],
    }
    work = Path(tempfile.mkdtemp(prefix="secateurs-distributed-"))
    try:
        for model in args.models.split(","):
            for method in args.methods.split(","):
                results = {}
                for processes in (1, 2):
                    results[processes] = run(model, method, processes, args, work / f"{model}-{method}-{processes}")
                    print(json.dumps(results[processes]), flush=True)
                one, two = (work / f"{model}-{method}-{p}" for p in (1, 2))
                results[2]["same_masks"] = _same(one / "masks.safetensors", two / "masks.safetensors")[0]
                results[2]["bit_identical_weights"] = _same(one / "weights.safetensors", two / "weights.safetensors")[0]
                results[2]["max_weight_diff"] = _max_weight_diff(
                    one / "weights.safetensors", two / "weights.safetensors"
                )
                payload["runs"] += [results[1], results[2]]
        if args.cli and (work / "pydoc-llama-12m-wanda-1").exists():
            payload["cli"] = cli_check(args, work, work / "pydoc-llama-12m-wanda-1")
            print(json.dumps(payload["cli"]), flush=True)
    finally:
        payload["load_end"] = os.getloadavg()
        shutil.rmtree(work, ignore_errors=True)
    write_results(args.name, payload)
    print(table(payload))


def table(p: dict) -> str:
    m = p["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['date']}, load {p['load_start'][0]:.1f} -> "
        f"{p['load_end'][0]:.1f}; calibration {p['nsamples']} x 256 tokens; 1 thread per process",
        "",
        "| model | method | processes | prune wall s | speedup | peak RSS MiB per process | perplexity | "
        "same masks as 1 process | weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    single = {}
    for r in p["runs"]:
        key = (r["model"], r["method"])
        if r["processes"] == 1:
            single[key] = r
        base = single[key]
        weights = (
            "-"
            if r["processes"] == 1
            else ("bit-identical" if r["bit_identical_weights"] else f"max diff {r['max_weight_diff']:.1e}")
        )
        same = "-" if r["processes"] == 1 else str(r["same_masks"])
        rss = ", ".join(f"{x:.0f}" for x in r["peak_rss_mib"])
        lines.append(
            f"| {r['model']} | {r['method']} | {r['processes']} | {r['seconds']:.1f} | "
            f"{base['seconds'] / r['seconds']:.2f}x | {rss} | {r['perplexity']:.3f} | {same} | {weights} |"
        )
    if "cli" in p:
        c = p["cli"]
        lines.append(
            f"\nCLI under torchrun (2 ranks, wanda 50%, pydoc-llama-12m): same weights as one process: "
            f"{c['same_weights_as_one_process']}; wrote {', '.join(c['files'])}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
