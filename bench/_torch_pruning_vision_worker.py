"""Torch-Pruning 1.6.1 side of ``structural_vision_zoo.py``; runs in ``bench/.envs/torch-pruning``.

Prunes torchvision models the way Torch-Pruning's own ``examples/torchvision_models`` script does
(``MetaPruner``, the final 1000-way classifier ignored, ``round_to = num_heads`` for ViT and
``model.hidden_dim`` set by hand afterwards), with the sweep's criterion and ratio
(``GroupMagnitudeImportance(p=2)``, 30% of every layer, local), then counts parameters and MACs
with the same counter as the secateurs side. Prints one JSON line per model, as it finishes.

    python _torch_pruning_vision_worker.py --size 224 resnet18 vit_b_16 ...
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import traceback
from importlib.metadata import version

import torch
import torch_pruning as tp
from torch import nn

from _vision_zoo import build, import_torchvision, params
from secateurs.evaluation import count_macs


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def prune(model: nn.Module, x: torch.Tensor, ratio: float) -> None:
    vit = import_torchvision().models.VisionTransformer
    ignored = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == 1000)
               or (isinstance(m, nn.Conv2d) and m.out_channels == 1000)]  # fmt: skip
    round_to = model.encoder.layers[0].num_heads if isinstance(model, vit) else None
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=False, ignored_layers=ignored, round_to=round_to,
    )  # fmt: skip
    pruner.step()
    if isinstance(model, vit):  # as Torch-Pruning's torchvision example does
        model.hidden_dim = model.conv_proj.out_channels


def one(name: str, size: int, ratio: float, timeout: int) -> dict:
    result: dict = {"tool": f"torch-pruning {version('torch-pruning')}", "model": name}
    model, x = build(name, size)
    try:
        with torch.no_grad():
            dense_shape = tuple(model(x).shape)
        result["params_dense"], result["macs_dense"] = params(model), count_macs(model, x).total
        signal.alarm(timeout)
        start = time.perf_counter()
        try:
            prune(model, x, ratio)
        finally:
            signal.alarm(0)
        result["seconds"] = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            out = model(x)
        if tuple(out.shape) != dense_shape:
            raise RuntimeError(f"output shape changed {dense_shape} -> {tuple(out.shape)}")
        result["params_pruned"], result["macs_pruned"] = params(model), count_macs(model, x).total
        result["ok"] = True
    except _Timeout:
        result.update(ok=False, error=f"did not finish within {timeout} s")
    except Exception as exc:  # a failure is a result: record it
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400], trace=traceback.format_exc()[-800:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGALRM, _alarm)
    for name in args.models:
        print(json.dumps(one(name, args.size, args.ratio, args.timeout), default=str), flush=True)


if __name__ == "__main__":
    main()
