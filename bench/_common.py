"""Shared by the benchmark scripts: machine description and atomic result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (these machines are noisy: compare ratios, not seconds)."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` atomically (results are regenerated, so replacing is intended)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def ensure_venv(path: Path, pins: tuple[str, ...]) -> Path:
    """A peer tool's own venv at ``path`` (created once, with ``pins``); returns its python."""
    python = path / "bin" / "python"
    if not python.exists():
        print(f"creating {path} ({' '.join(pins)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    return python


def validation_split(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """(training images minus a stratified ``fraction``, that fraction as the 'test' side) - the test set is untouched.

    Both returned sets keep ``data``'s test images out: selection sees only training images.
    """
    from sklearn.model_selection import train_test_split

    from secateurs.demo.data import Digits

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    idx_fit, idx_val = train_test_split(
        range(len(data.y_train)), test_size=fraction, random_state=seed, stratify=data.y_train.numpy()
    )
    idx_fit, idx_val = torch.tensor(sorted(idx_fit)), torch.tensor(sorted(idx_val))
    x, y = data.x_train, data.y_train
    return Digits(x[idx_fit], y[idx_fit], data.x_test, data.y_test), Digits(
        x[idx_val], y[idx_val], x[idx_val], y[idx_val]
    )


def paired_windows(a: list[float] | None, b: list[float] | None, name: str = "first") -> str:
    """``a`` minus ``b``, per held-out window (mean NLL per token of the same windows): the mean difference,
    its standard error over the windows, and on how many windows ``a`` predicts better. A difference of a few
    standard errors is a real one on this text; perplexity means alone do not say that."""
    if not a or not b or len(a) != len(b):
        return "no per-window losses to compare"
    diff = [x - y for x, y in zip(a, b)]
    mean = sum(diff) / len(diff)
    se = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff)) ** 0.5 if len(diff) > 1 else 0.0
    better = sum(d < 0 for d in diff)
    ratio = mean / se if se else 0.0
    return (
        f"mean NLL change {mean:+.5f} nats/token (SE {se:.5f}, {ratio:+.1f} SE); {name} better on "
        f"{better}/{len(diff)} windows"
    )
