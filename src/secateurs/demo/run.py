"""The demo's experiments: one dense baseline and five ways to prune, per model."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import Pruner, prune
from ..config import PruneConfig
from ..io import atomic_dir, refuse_existing
from ..report import Report, build_report
from ..schedules import LotteryTicket
from ..scope import ScopeSpec, resolve
from ..threads import limited_threads
from ..training import accuracy, train
from .data import Digits
from .models import digits_cnn, digits_mlp
from .plot import plot
from .trained import digits, trained


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
    train_seconds: float  # training and fine-tuning
    prune_seconds: float  # scoring, selection and masking


def measure(model: nn.Module, config: dict[str, Any] | None, example: torch.Tensor) -> Report:
    """The model as it is now (after fine-tuning), over the layers ``config`` pruned, recording that
    config: the report of what ran, not of a re-measuring prune call. ``None``: the dense model."""
    if config is None:
        return build_report(model, resolve(model, ScopeSpec()), example_inputs=example)
    ran = PruneConfig(**config)
    return build_report(model, resolve(model, ran.scope_), ran.pattern_, example, config)


class _TimedPruner:
    """Counts the seconds spent in ``pruner.step()`` (scoring and masking) inside a training loop."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner, self.seconds = pruner, 0.0

    def step(self):
        start = time.perf_counter()
        try:
            return self.pruner.step()
        finally:
            self.seconds += time.perf_counter() - start


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

    def record(method: str, model: nn.Module, report: Report, train_s: float, prune_s: float) -> None:
        rows.append(Row(name, method, accuracy(model, test), report.sparsity, report.nonzeros, report.params,
                        report.bytes_compressed, report.bytes_dense, train_s, prune_s))  # fmt: skip
        reports[method] = report.to_dict()
        print(f"  {name:<4} {method:<40} acc {rows[-1].accuracy:6.2%}  sparsity {report.sparsity:6.2%}")

    started = time.perf_counter()
    dense = trained(factory, steps, seed)
    record("dense", dense, measure(dense, None, example), time.perf_counter() - started, 0.0)

    for method, options in (
        ("global magnitude 90% + fine-tune", dict(method="magnitude", sparsity=0.9, allocation="global")),
        ("2:4 magnitude + fine-tune", dict(method="magnitude", pattern="2:4")),
    ):
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        config = prune(model, **options, example_inputs=example).config
        pruned = time.perf_counter()
        train(model, batches, steps // 2, optimizer=lambda p: torch.optim.Adam(p, lr=3e-4))
        record(method, model, measure(model, config, example), time.perf_counter() - pruned, pruned - started)

    for method, options in (
        ("SNIP 90% at init, then train", dict(method="snip", sparsity=0.9, calibration=calibration)),
        ("SynFlow 90% at init, then train", dict(method="synflow", sparsity=0.9, example_inputs=example)),
    ):
        model = copy.deepcopy(init)
        started = time.perf_counter()
        config = prune(model, **options, progress=False).config
        pruned = time.perf_counter()
        train(model, batches, steps)
        record(method, model, measure(model, config, example), time.perf_counter() - pruned, pruned - started)

    model = copy.deepcopy(init)
    rounds = 3
    pruner = _TimedPruner(Pruner(model, "magnitude", 0.9, allocation="global", schedule=LotteryTicket(rounds, steps)))
    started = time.perf_counter()
    train(model, batches, (rounds + 1) * steps, pruner=pruner)
    total = time.perf_counter() - started
    report = measure(model, pruner.pruner.config.to_dict(), example)
    record(f"lottery ticket ({rounds} IMP rounds, rewind)", model, report, total - pruner.seconds, pruner.seconds)
    return rows, reports


def table(rows: list[Row], test_images: int) -> str:
    head = (f"{'model':<5} {'method':<40} {'accuracy':>8} {'sparsity':>8} {'nonzeros':>9} {'size':>10} "
            f"{'train':>6} {'prune':>6}")  # fmt: skip
    lines = [
        f"accuracy: on {test_images} held-out images (one image = {100 / test_images:.2f} points)",
        "sparsity: of the pruned layers (all but the classifier, and the CNN's first conv);",
        "nonzeros, size: the whole model (biases, BatchNorm, classifier included); size: compressed estimate",
        "train: seconds training or fine-tuning; prune: seconds scoring and masking",
        "",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r.model:<5} {r.method:<40} {r.accuracy:>8.2%} {r.sparsity:>8.2%} {r.nonzeros:>9,} "
            f"{r.size_bytes / 1024:>6.1f} KiB {r.train_seconds:>5.1f}s {r.prune_seconds:>5.1f}s"
        )
    return "\n".join(lines)


def run_demo(out: Path, overwrite: bool = False, quick: bool = False, seed: int = 0) -> list[Row]:
    """Train, prune, fine-tune and compare; write ``results.json``, ``table.txt`` and ``demo.png``."""
    refuse_existing(out, overwrite)  # fail before minutes of work, not after
    with limited_threads(1):  # 8x8 images: thread hand-offs cost more than they save, and stall on a busy CPU
        return _run(out, overwrite, quick, seed)


def _run(out: Path, overwrite: bool, quick: bool, seed: int) -> list[Row]:
    data = digits(seed)
    steps = 60 if quick else 300
    rows: list[Row] = []
    reports: dict[str, dict[str, dict]] = {}
    for name, factory in (("mlp", digits_mlp), ("cnn", digits_cnn)):
        print(f"{name}: training and pruning ({steps} steps per phase)")
        model_rows, reports[name] = _experiments(name, factory, data, steps, seed)
        rows += model_rows
    text = table(rows, len(data.y_test))
    print()
    print(text)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "table.txt").write_text(text + "\n")
        payload = {"seed": seed, "steps": steps, "test_images": len(data.y_test),
                   "results": [asdict(r) for r in rows], "reports": reports}  # fmt: skip
        (tmp / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        plotted = plot(rows, reports, tmp / "demo.png")
    print(f"\nwrote {out}/results.json, table.txt" + (", demo.png" if plotted else " (no matplotlib: no plot)"))
    return rows
