"""Magnitude pruning, secateurs vs torch.nn.utils.prune, on the same models.

Checks that both produce identical masks (per-layer L1 and global L1 unstructured)
and records the wall time of each, measured interleaved in one run so machine
noise hits both alike. Writes bench/results/vs_torch_prune.json and prints a table.

    .venv/bin/python bench/vs_torch_prune.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import secateurs
from _common import machine, write_results
from secateurs.scope import ScopeSpec, resolve

EVERY_LAYER = {"skip_first": False, "skip_last": False}


def vgg16(classes: int = 100) -> nn.Sequential:
    """VGG-16 layout for 32x32 inputs (14.7M weights in conv + linear layers)."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, classes))


def mlp() -> nn.Sequential:
    """A wide MLP (12.6M weights): big matrices stress selection, not the per-layer overhead."""
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 2048), nn.ReLU(), nn.Linear(2048, 1000))


def torch_per_layer(model: nn.Module, sparsity: float) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            torch_prune.l1_unstructured(module, "weight", amount=sparsity)


def torch_global(model: nn.Module, sparsity: float) -> None:
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)


def ours_per_layer(model: nn.Module, sparsity: float) -> None:
    secateurs.prune(model, "magnitude", sparsity, scope=EVERY_LAYER, progress=False)


def ours_global(model: nn.Module, sparsity: float) -> None:
    # torch.nn.utils.prune accepts a collapsed layer, so the comparison does too
    secateurs.prune(
        model, "magnitude", sparsity, allocation="global", scope=EVERY_LAYER, progress=False, allow_collapse=True
    )


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks from either library: torch's ``weight_mask`` buffer or our effective weight."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask"):
            out[name] = module.weight_mask.bool()
    if out:
        return out
    return {t.module_name: t.weight.detach() != 0 for t in resolve(model, ScopeSpec(**EVERY_LAYER))}


def disagreement(model: nn.Module, a: dict, b: dict, mode: str) -> tuple[int, bool]:
    """How many mask entries differ, and whether every difference is a tie: weights of equal
    magnitude at the threshold, where torch's topk picks arbitrarily and we pick the lower index."""
    if a.keys() != b.keys():
        return -1, False
    tied_values = []
    count = 0
    for name in a:
        differ = a[name] != b[name]
        if differ.any():
            count += int(differ.sum())
            values = model.get_submodule(name).weight.detach().abs()[differ].unique()
            tied_values.append(values)
            if mode != "global" and values.numel() != 1:
                return count, False
    if mode == "global" and tied_values:
        return count, torch.cat(tied_values).unique().numel() == 1
    return count, True


def timed(fn: Callable[[nn.Module, float], None], model: nn.Module, sparsity: float) -> tuple[float, nn.Module]:
    fresh = copy.deepcopy(model)
    start = time.perf_counter()
    fn(fresh, sparsity)
    return time.perf_counter() - start, fresh


def compare(name: str, model: nn.Module, mode: str, sparsity: float, repeats: int) -> dict:
    ours, theirs = (ours_global, torch_global) if mode == "global" else (ours_per_layer, torch_per_layer)
    ours_times, torch_times = [], []
    differing, only_ties = 0, True
    for _ in range(repeats):  # interleaved: the same noise hits both
        t_ours, pruned_ours = timed(ours, model, sparsity)
        t_torch, pruned_torch = timed(theirs, model, sparsity)
        ours_times.append(t_ours)
        torch_times.append(t_torch)
        n, ties = disagreement(model, masks_of(pruned_ours), masks_of(pruned_torch), mode)
        differing, only_ties = max(differing, n), only_ties and ties
    row = {
        "model": name,
        "mode": mode,
        "sparsity": sparsity,
        "weights": sum(m.numel() for m in masks_of(pruned_ours).values()),
        "masks_identical": differing == 0,
        "differing_entries": differing,
        "differences_only_between_equal_magnitudes": only_ties,
        "secateurs_s": statistics.median(ours_times),
        "torch_prune_s": statistics.median(torch_times),
    }
    row["time_ratio_secateurs_over_torch"] = row["secateurs_s"] / row["torch_prune_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat, one sparsity")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"vgg16": vgg16(), "mlp-12.6M": mlp()}
    sparsities = (0.9,) if args.quick else (0.5, 0.9)
    repeats = 1 if args.quick else args.repeats
    rows = []
    print(f"{'model':<10} {'mode':<9} {'sparsity':>8} {'weights':>11} {'identical':>14} "
          f"{'secateurs':>10} {'torch':>10} {'ratio':>6}")  # fmt: skip
    for name, model in models.items():
        for mode in ("per-layer", "global"):
            for sparsity in sparsities:
                row = compare(name, model, mode, sparsity, repeats)
                rows.append(row)
                same = "yes" if row["masks_identical"] else f"{row['differing_entries']} ties" if row[
                    "differences_only_between_equal_magnitudes"] else "NO"  # fmt: skip
                print(
                    f"{name:<10} {mode:<9} {sparsity:>8.0%} {row['weights']:>11,} {same:>14} "
                    f"{row['secateurs_s'] * 1e3:>8.1f}ms {row['torch_prune_s'] * 1e3:>8.1f}ms "
                    f"{row['time_ratio_secateurs_over_torch']:>6.2f}"
                )
    write_results("vs_torch_prune", {"machine": machine(), "repeats": repeats, "rows": rows})


if __name__ == "__main__":
    main()
