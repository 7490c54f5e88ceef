"""The demo's experiments: one dense baseline and five ways to prune, per model."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..api import Pruner, prune
from ..io import atomic_dir, refuse_existing
from ..report import Report, build_report
from ..schedules import LotteryTicket
from ..scope import ScopeSpec, resolve
from ..training import accuracy, train
from .data import Digits, load_digits
from .models import digits_cnn, digits_mlp


@dataclass
class Row:
    model: str
    method: str
    accuracy: float
    sparsity: float  # of the pruned layers
    nonzeros: int  # whole model
    params: int
    size_bytes: int  # compressed estimate
    dense_bytes: int
    seconds: float


def measure(model: nn.Module, example: torch.Tensor) -> Report:
    """The report of ``model`` as it is now (the default scope), without pruning anything."""
    return build_report(model, resolve(model, ScopeSpec()), example_inputs=example)


def _row(model: str, method: str, acc: float, report: Report, seconds: float) -> Row:
    return Row(model, method, acc, report.sparsity, report.nonzeros, report.params,
               report.bytes_compressed, report.bytes_dense, seconds)  # fmt: skip


def _experiments(
    name: str, factory: Callable[[], nn.Module], data: Digits, steps: int, seed: int
) -> tuple[list[Row], dict[str, dict]]:
    torch.manual_seed(seed)
    init = factory()
    batches = data.batches(64, seed)
    test = data.batches(256, train=False)
    calibration = batches[:4]
    example = data.x_test[:1]
    rows: list[Row] = []
    reports: dict[str, dict] = {}

    def record(method: str, model: nn.Module, report: Report, started: float) -> None:
        rows.append(_row(name, method, accuracy(model, test), report, time.perf_counter() - started))
        reports[method] = report.to_dict()
        print(f"  {name:<4} {method:<40} acc {rows[-1].accuracy:6.2%}  sparsity {report.sparsity:6.2%}")

    started = time.perf_counter()
    dense = copy.deepcopy(init)
    train(dense, batches, steps)
    record("dense", dense, measure(dense, example), started)

    for method, options in (
        ("global magnitude 90% + fine-tune", dict(method="magnitude", sparsity=0.9, allocation="global")),
        ("2:4 magnitude + fine-tune", dict(method="magnitude", pattern="2:4")),
    ):
        started = time.perf_counter()
        model = copy.deepcopy(dense)
        prune(model, **options, example_inputs=example)
        train(model, batches, steps // 2, optimizer=lambda p: torch.optim.Adam(p, lr=3e-4))
        record(method, model, measure(model, example), started)

    for method, options in (
        ("SNIP 90% at init, then train", dict(method="snip", sparsity=0.9, calibration=calibration)),
        ("SynFlow 90% at init, then train", dict(method="synflow", sparsity=0.9, example_inputs=example)),
    ):
        started = time.perf_counter()
        model = copy.deepcopy(init)
        prune(model, **options, progress=False)
        train(model, batches, steps)
        record(method, model, measure(model, example), started)

    started = time.perf_counter()
    model = copy.deepcopy(init)
    rounds = 3
    pruner = Pruner(model, "magnitude", 0.9, allocation="global", schedule=LotteryTicket(rounds, steps))
    train(model, batches, (rounds + 1) * steps, pruner=pruner)
    record(f"lottery ticket ({rounds} IMP rounds, rewind)", model, pruner.report(example), started)
    return rows, reports


def table(rows: list[Row]) -> str:
    head = f"{'model':<5} {'method':<40} {'accuracy':>8} {'sparsity':>8} {'nonzeros':>9} {'size':>10} {'time':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<5} {r.method:<40} {r.accuracy:>8.2%} {r.sparsity:>8.2%} {r.nonzeros:>9,} "
            f"{r.size_bytes / 1024:>7.1f} KiB {r.seconds:>5.1f}s"
        )
    return "\n".join(lines)


def _plot(rows: list[Row], reports: dict[str, dict[str, dict]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    models = sorted({r.model for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        accs = [next((r.accuracy for r in rows if r.model == m and r.method == k), 0.0) for k in methods]
        axes[0].bar([j + i * width for j in range(len(methods))], accs, width, label=m)
    axes[0].set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(methods))])
    axes[0].set_xticklabels([k.split(" + ")[0].split(",")[0] for k in methods], rotation=30, ha="right", fontsize=8)
    axes[0].set_ylim(0.5, 1.0)
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title("digits: accuracy after pruning")
    axes[0].legend()
    for method in (
        "global magnitude 90% + fine-tune",
        "SNIP 90% at init, then train",
        "SynFlow 90% at init, then train",
    ):
        layers = reports["cnn"][method]["layers"]
        axes[1].plot([layer["name"].removesuffix(".weight") for layer in layers],
                     [1 - layer["sparsity"] for layer in layers], marker="o", label=method.split(",")[0])  # fmt: skip
    axes[1].set_yscale("log")
    axes[1].set_ylabel("density (kept fraction)")
    axes[1].set_title("CNN: per-layer density at 90% overall sparsity")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_demo(out: Path, overwrite: bool = False, quick: bool = False, seed: int = 0) -> list[Row]:
    """Train, prune, fine-tune and compare; write ``results.json``, ``table.txt`` and ``demo.png``."""
    refuse_existing(out, overwrite)  # fail before minutes of work, not after
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 8x8 images: thread hand-offs cost more than they save, and stall on a busy CPU
    try:
        return _run(out, overwrite, quick, seed)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, overwrite: bool, quick: bool, seed: int) -> list[Row]:
    torch.manual_seed(seed)
    data = load_digits(seed=seed)
    steps = 60 if quick else 300
    rows: list[Row] = []
    reports: dict[str, dict[str, dict]] = {}
    for name, factory in (("mlp", digits_mlp), ("cnn", digits_cnn)):
        print(f"{name}: training and pruning ({steps} steps per phase)")
        model_rows, reports[name] = _experiments(name, factory, data, steps, seed)
        rows += model_rows
    text = table(rows)
    print()
    print(text)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "table.txt").write_text(text + "\n")
        payload = {"seed": seed, "steps": steps, "results": [asdict(r) for r in rows], "reports": reports}
        (tmp / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        plotted = _plot(rows, reports, tmp / "demo.png")
    print(f"\nwrote {out}/results.json, table.txt" + (", demo.png" if plotted else " (no matplotlib: no plot)"))
    return rows
