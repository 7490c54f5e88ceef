"""Out-of-core pruning: a random-weight Llama larger than a quarter of RAM, pruned with SparseGPT from disk.

Writes a random-weight Llama (fp32 safetensors, one shard per block, never held in memory whole), then
prunes it with ``secateurs.outofcore.prune_from_disk`` in a fresh process and measures the wall time and the
process's peak RSS (``ru_maxrss``, which counts the memory-mapped file pages it touched). On a smaller model
that fits, the same SparseGPT run in memory (``from_pretrained`` + ``prune_llm`` + ``save_pretrained``) is timed
side by side, in alternating order, and the two outputs are compared tensor by tensor. The large model's
files are deleted at the end.

    .venv/bin/python bench/outofcore_llm.py [--big-layers 272] [--small-layers 4] [--repeats 2] [--keep]
        [--skip-big | --skip-small] [--threads 2] [--name outofcore_llm]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from _common import machine, write_results  # noqa: E402

WORK = Path(os.environ.get("SECATEURS_BENCH_TMP", "/tmp/secateurs-outofcore-bench"))
#: square MLP (intermediate = hidden): SparseGPT's cost per byte grows with a layer's input width, and the CPU is
#: shared, so the widths are kept at 1024 and the size comes from the number of blocks (a valid Llama config)
SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 8192,
    "max_position_embeddings": 256,
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_model(directory: Path, layers: int) -> int:
    """A random-weight Llama written shard by shard (one block in memory at a time); its size in bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **SHAPE)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, tuple]] = {}
    for name, p in skeleton.named_parameters():
        shard = f"block-{int(name.split('.')[2]):05d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(shard, {})[name] = tuple(p.shape)
    weight_map, total = {}, 0
    for shard, tensors in groups.items():
        state = {}
        for name, shape in tensors.items():
            if len(shape) == 1:  # norms
                state[name] = torch.ones(shape)
            else:
                state[name] = torch.randn(shape, generator=generator) * 0.02
            total += state[name].numel() * 4
        save_file(state, str(directory / f"{shard}.safetensors"), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, f"{shard}.safetensors"))
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _segments(nsamples: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(1))


def worker(args: argparse.Namespace) -> dict:
    """One run in this fresh process: out-of-core or in memory."""
    torch.set_num_threads(args.threads)
    segments = _segments(args.nsamples, args.seqlen)
    options = dict(calibration=segments, batch_size=args.batch_size, progress=False)
    start = time.perf_counter()
    if args.worker == "disk":
        from secateurs.memory import resident_kib
        from secateurs.outofcore import prune_from_disk

        log = Path(args.out + ".progress")  # to follow a long run: each finished block, the time and the memory

        def note(i: int) -> None:
            with log.open("a") as handle:
                handle.write(f"block {i} done at {time.perf_counter() - start:.0f} s {resident_kib()}\n")

        prune_from_disk(args.model, args.out, "sparsegpt", 0.5, after_block=note, **options)
    else:
        from transformers import AutoModelForCausalLM

        from secateurs.llm import prune_llm

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        prune_llm(model, "sparsegpt", 0.5, rollback=False, **options)
        model.save_pretrained(args.out)
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": _peak_rss_bytes()}


def _run(kind: str, model: Path, out: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--model",
        str(model),
        "--out",
        str(out),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_before"] = load
    return result


def _small(payload: dict, args: argparse.Namespace) -> None:
    """Out-of-core vs in memory on a model that fits, in alternating order."""
    small = WORK / "small"
    payload["small_bytes"] = make_model(small, args.small_layers)
    runs: dict[str, list[dict]] = {"disk": [], "memory": []}
    for r in range(args.repeats):
        for kind in ("disk", "memory") if r % 2 == 0 else ("memory", "disk"):
            runs[kind].append(_run(kind, small, WORK / f"small-{kind}", args))
            print(kind, runs[kind][-1], flush=True)
    payload["small"] = runs
    payload["small_same_output"] = _same_output(WORK / "small-disk", WORK / "small-memory")


def _same_output(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, tuple[Path, str]]:
        return {k: (f, k) for f in directory.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}  # noqa: SIM118

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        with safe_open(str(left[name][0]), "pt") as x, safe_open(str(right[name][0]), "pt") as y:
            if not torch.equal(x.get_tensor(name), y.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", choices=("disk", "memory"))
    parser.add_argument("--model")
    parser.add_argument("--out")
    parser.add_argument("--big-layers", type=int, default=272)
    parser.add_argument("--small-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-small", action="store_true", help="only the big out-of-core run (its peak RSS)")
    parser.add_argument("--name", help="bench/results/<name>.json (default outofcore_llm, outofcore_llm_big alone)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shutil.rmtree(WORK, ignore_errors=True)
    payload: dict = {
        "machine": machine(),
        "ram_bytes": ram,
        "shape": SHAPE,
        "calibration": f"{args.nsamples}x{args.seqlen}",
        "threads": args.threads,
        "load_start": os.getloadavg(),
    }
    try:
        if not args.skip_big:
            big = WORK / "big"
            start = time.perf_counter()
            payload["big_bytes"] = make_model(big, args.big_layers)
            payload["big_write_seconds"] = time.perf_counter() - start
            print("big model written", payload["big_bytes"], flush=True)
            payload["big"] = _run("disk", big, WORK / "big-disk", args)
            payload["big"]["rss_share_of_model"] = payload["big"]["peak_rss_bytes"] / payload["big_bytes"]
            payload["big"]["per_block"] = (WORK / "big-disk.progress").read_text().splitlines()  # time, /proc memory
            print("big", payload["big"], flush=True)
            shutil.rmtree(big, ignore_errors=True)  # 8 GB: gone before the small runs
            shutil.rmtree(WORK / "big-disk", ignore_errors=True)
        if not args.skip_small:
            _small(payload, args)
    finally:
        payload["load_end"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    write_results(args.name or ("outofcore_llm_big" if args.skip_small else "outofcore_llm"), payload)
    print(table(payload))


def table(p: dict) -> str:
    gib = 2**30
    lines = [
        f"machine: {p['machine']['cpu']}, {p['machine']['cores']} cores, {p['ram_bytes'] / gib:.0f} GiB RAM, "
        f"{p['machine']['date']}, load {p['load_start'][0]:.1f} -> {p['load_end'][0]:.1f}, {p['threads']} thread(s), "
        f"calibration {p['calibration']}",
        "",
        "| model | run | wall s (each run) | peak RSS GiB | RSS / model size |",
        "|---|---|---|---|---|",
    ]
    for kind in ("disk", "memory") if "small" in p else ():
        runs = p["small"][kind]
        walls = ", ".join(f"{r['seconds']:.0f}" for r in runs)
        lines.append(
            f"| {p['small_bytes'] / gib:.2f} GiB ({p['shape']['hidden_size']} hidden) | "
            f"{'out-of-core' if kind == 'disk' else 'in memory'} | {walls} | "
            f"{max(r['peak_rss_bytes'] for r in runs) / gib:.2f} | "
            f"{max(r['peak_rss_bytes'] for r in runs) / p['small_bytes']:.2f} |"
        )
    if "big" in p:
        b = p["big"]
        lines.append(
            f"| {p['big_bytes'] / gib:.2f} GiB ({p['big_bytes'] / 1e9:.2f} GB) | out-of-core | {b['seconds']:.0f} | "
            f"{b['peak_rss_bytes'] / gib:.2f} | {b['rss_share_of_model']:.3f} |"
        )
    if "small" in p:
        lines.append(f"\nout-of-core output == in-memory output (small model, every tensor): {p['small_same_output']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
