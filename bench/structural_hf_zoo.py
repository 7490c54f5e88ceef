"""Structural removal on every transformers architecture that builds from a tiny config, vs Torch-Pruning.

The architectures come from transformers' auto mappings (``secateurs.hf_zoo.architectures``); each is
built from its own config class with hidden 32, 2 layers, 4 heads (2 KV heads where the config has
them). For each architecture x pattern (channel = FFN neurons, head, head+channel) at 30%:
secateurs removes the units, saves the model, reloads it (stock ``from_pretrained`` when the updated
config expresses every shape, ``load_structured`` otherwise) and compares logits. Torch-Pruning 1.6
(its own venv, ``_torch_pruning_hf_worker.py``) prunes the same tiny models the way its LLM example
does; we record whether it prunes, whether the pruned model still runs, and whether the saved model
reloads with stock ``from_pretrained``.

    python bench/structural_hf_zoo.py [--only llama bart ...] [--no-torch-pruning | --reuse-torch-pruning]
                                      [--tp-timeout 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import secateurs
from _common import machine, write_results
from secateurs import hf_zoo

# Torch-Pruning's venv (see _torch_pruning_worker.py); SECATEURS_TP_PYTHON points at another one
_TP_VENV = Path(__file__).resolve().parent / ".envs" / "torch-pruning" / "bin" / "python"
TP_PYTHON = Path(os.environ.get("SECATEURS_TP_PYTHON", _TP_VENV))
SPARSITY = 0.3
TP_TIMEOUT = 60
# the 35 architectures of the issue: the 9 that worked before it, and 26 other current families
TARGET = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gpt2",
    "opt",
    "bert",
    "roberta",
    "falcon",
    "gpt_neox",
    "bloom",
    "phi3",
    "mpt",
    "t5",
    "bart",
    "mbart",
    "marian",
    "pegasus",
    "whisper",
    "electra",
    "xlm-roberta",
    "camembert",
    "deberta-v2",
    "gpt_neo",
    "gptj",
    "phi",
    "stablelm",
    "starcoder2",
    "olmo",
    "olmo2",
    "granite",
    "mixtral",
    "qwen2_moe",
    "gemma2",
)


def _ours(archs: list[hf_zoo.Arch]) -> dict[str, dict]:
    rows = {}
    for arch in archs:
        start = time.perf_counter()
        row = {}
        for pattern in hf_zoo.PATTERNS:
            with tempfile.TemporaryDirectory() as folder:
                try:
                    row[pattern] = hf_zoo.sweep_one(arch, pattern, f"{folder}/m", SPARSITY)
                except Exception as exc:  # a bug, not a refusal: recorded as such
                    row[pattern] = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if row[pattern]["status"] == "unbuilt":
                break
        rows[arch.model_type] = {"class": arch.class_name, "seconds": round(time.perf_counter() - start, 2), **row}
        brief = {p: (r["status"], r.get("reload", r.get("reason", "")[:60])) for p, r in row.items()}
        print(f"{arch.model_type:28s} {brief}", flush=True)
    return rows


def _torch_pruning(names: list[str]) -> dict[str, dict]:
    if not TP_PYTHON.exists():
        print(f"no Torch-Pruning venv at {TP_PYTHON}: skipped")
        return {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SECATEURS_SRC": str(Path(secateurs.__file__).parent)}
    worker = Path(__file__).resolve().parent / "_torch_pruning_hf_worker.py"
    rows = {}
    for name in names:  # one process per architecture: a trace that never finishes is cut at TP_TIMEOUT
        try:
            out = subprocess.run([str(TP_PYTHON), str(worker), name], capture_output=True, text=True, env=env,
                                 timeout=TP_TIMEOUT)  # fmt: skip
        except subprocess.TimeoutExpired:
            rows[name] = {p: {"pruned": False, "runs": False, "stock_reload": False,
                              "error": f"timed out after {TP_TIMEOUT} s"} for p in hf_zoo.PATTERNS}  # fmt: skip
        else:
            for line in out.stdout.splitlines():
                if line.startswith("{"):
                    row = json.loads(line)
                    rows[row.pop("arch")] = row
        print(f"torch-pruning {name:24s} {({p: r.get('stock_reload') for p, r in rows.get(name, {}).items()})}",
              flush=True)  # fmt: skip
    return rows


def _tp_ok(theirs: dict, name: str, pattern: str, what: str) -> bool:
    r = theirs.get(name, {}).get(pattern, {})
    return bool(r.get(what)) and r.get("reduction", 0) > 0


def _cell(ours: dict, theirs: dict | None) -> str:
    if ours["status"] == "ok":
        mine = f"{ours['reduction']:.0%} {'stock' if ours['reload'] == 'stock' else 'load_structured'}"
        if not ours.get("zero_unit", {}).get("exact", True):
            mine += " (zero-unit n/a)" if not ours["zero_unit"].get("checked") else " (zero-unit FAILS)"
    else:
        mine = ours["status"]
    if theirs is None:
        return mine
    if theirs.get("pruned") and theirs.get("reduction", 0) > 0:
        tp_cell = f"{theirs['reduction']:.0%} " + ("stock" if theirs["stock_reload"] else
                                                   "runs, no reload" if theirs["runs"] else "broken")  # fmt: skip
    elif str(theirs.get("error", "")).startswith("timed out"):  # its time limit under load, not a diagnosis
        tp_cell = f"timeout ({TP_TIMEOUT} s)"
    else:
        tp_cell = "nothing pruned" if theirs.get("pruned") else "fails"
    return f"{mine} / {tp_cell}"


def table(payload: dict) -> str:
    """Markdown: one row per architecture, 'secateurs / Torch-Pruning' per pattern (parameter
    reduction and how the saved model reloads)."""
    ours, theirs = payload["secateurs"], payload.get("torch_pruning", {})
    lines = ["| architecture | " + " | ".join(hf_zoo.PATTERNS) + " |", "|---" * (len(hf_zoo.PATTERNS) + 1) + "|"]
    for name, row in ours.items():
        if row["channel"]["status"] == "unbuilt":
            lines.append(f"| {name} | " + " | ".join(["tiny config does not build"] * len(hf_zoo.PATTERNS)) + " |")
            continue
        cells = [_cell(row[p], theirs.get(name, {}).get(p) if theirs else None) for p in hf_zoo.PATTERNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(ours: dict, theirs: dict) -> dict:
    """Per pattern: architectures built, pruned and reloaded (stock or load_structured), and Torch-Pruning's
    counts (a run that removes nothing is not counted)."""
    built = [n for n, r in ours.items() if r["channel"]["status"] != "unbuilt"]
    summary = {"channel_and_head": sum(all(ours[n][p]["status"] == "ok" for p in hf_zoo.PATTERNS) for n in built)}
    for pattern in hf_zoo.PATTERNS:
        ok = [n for n in built if ours[n][pattern]["status"] == "ok"]
        summary[pattern] = {
            "built": len(built), "ok": len(ok),
            "stock_reload": sum(ours[n][pattern].get("reload") == "stock" for n in ok),
            "reload_max_abs_diff": max((ours[n][pattern]["max_abs_diff"] for n in ok), default=None),
            "zero_unit_exact": sum(bool(ours[n][pattern].get("zero_unit", {}).get("exact")) for n in ok),
            "torch_pruning_prunes_and_runs": sum(_tp_ok(theirs, n, pattern, "runs") for n in built),
            "torch_pruning_stock_reload": sum(_tp_ok(theirs, n, pattern, "stock_reload") for n in built),
        }  # fmt: skip
    return summary


def main() -> None:
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--all", action="store_true", help="every architecture of the auto mappings, not TARGET")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--tp-timeout", type=int, default=TP_TIMEOUT,
                        help="seconds Torch-Pruning gets per architecture (raise it on a loaded machine)")  # fmt: skip
    parser.add_argument("--reuse-torch-pruning", action="store_true",
                        help="take Torch-Pruning's cells from the last results (its runs do not depend on secateurs' "
                             "code); run it only for architectures they lack")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the table of the last results and stop")
    args = parser.parse_args()
    global TP_TIMEOUT
    TP_TIMEOUT = args.tp_timeout
    if args.table:
        payload = json.loads((Path(__file__).resolve().parent / "results" / "structural_hf_zoo.json").read_text())
        print(json.dumps(summarize(payload["secateurs"], payload["torch_pruning"]), indent=1))
        print(table(payload))
        return
    wanted = set(args.only or ([] if args.all else TARGET))
    archs = [a for a in hf_zoo.architectures() if not wanted or a.model_type in wanted]
    load = os.getloadavg()
    ours = _ours(archs)
    built = [n for n, r in ours.items() if r["channel"]["status"] != "unbuilt"]
    previous = {}
    if args.reuse_torch_pruning:
        last = Path(__file__).resolve().parent / "results" / "structural_hf_zoo.json"
        previous = {n: r for n, r in json.loads(last.read_text()).get("torch_pruning", {}).items() if n in built}
    missing = [n for n in built if n not in previous]
    theirs = previous if args.no_torch_pruning else {**previous, **_torch_pruning(missing)}
    summary = summarize(ours, theirs)
    print(json.dumps(summary, indent=1))
    payload = {
        "machine": machine(), "loadavg_start": load, "loadavg_end": os.getloadavg(),
        "transformers": transformers.__version__, "sparsity": SPARSITY, "summary": summary,
        "secateurs": ours, "torch_pruning": theirs,
    }  # fmt: skip
    write_results("structural_hf_zoo", payload)
    print(table(payload))


if __name__ == "__main__":
    sys.exit(main())
