"""Calibrate activation sparsity: each layer's input magnitude distribution, and TEAL's greedy allocation.

TEAL (Liu et al. 2024, arXiv:2408.14690) zeroes the entries of the hidden state entering each Linear
layer of each block whose magnitude is below a per-layer threshold. The distribution of ``|x|`` is
stored as a quantile table (:data:`GRID` + 1 points), so the threshold for any sparsity ``s`` is read
off it at run time: the target can change on a loaded model without recalibrating.

Allocation (TEAL section 4.2): every block gets the model-wide target, split among its projections
by a greedy search: starting dense, repeatedly raise by one step the block's parameter-weighted
sparsity through the one projection whose extra sparsity adds the least error to the block's
output, and record the path. At run time each projection's sparsity is interpolated along the path.
Calibration runs on dense activations, block by block, with the block runner's input capture
(:mod:`secateurs.blocks`), so peak memory is one block plus the calibration hidden states.

CATS (Lee et al. 2024, arXiv:2404.08763) thresholds the output of the MLP's gate activation instead:
one distribution per block, no allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import BlockInputs, capture_inputs, find_blocks
from ..errors import ConfigError, NonFiniteError
from .layers import ACTIVATIONS

GRID = 1000  # quantile table resolution: sparsity steps of 0.1%
MAX_MOVE = 0.2  # the most one greedy move raises one layer's sparsity
METHODS = ("teal", "cats")
ALLOCATIONS = ("greedy", "uniform")


@dataclass
class Calibration:
    """What calibration found: per layer its block, weight count and ``|x|`` quantiles; per block the
    greedy path (levels of block sparsity and each layer's sparsity along it) when allocated."""

    method: str
    allocation: str
    layers: list[str]
    kinds: list[str]  # 'linear' (TEAL: the layer's input) or 'activation' (CATS: the activation's output)
    features: list[int]  # the thresholded vector's width
    blocks: list[int]
    params: list[int]
    quantiles: Tensor  # [layers, GRID + 1], float32, non-decreasing along a row
    levels: dict[int, Tensor] = field(default_factory=dict)  # block -> [K] block sparsity
    paths: dict[int, Tensor] = field(default_factory=dict)  # block -> [K, layers of the block]

    def block_layers(self, block: int) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b == block]

    def max_sparsity(self) -> float:
        if self.allocation == "greedy" and self.levels:
            return min(float(levels[-1]) for levels in self.levels.values())
        return GRID / (GRID + 1)

    def layer_sparsities(self, target: float) -> list[float]:
        """Each layer's sparsity for a model-wide ``target`` (already checked to be reachable)."""
        if self.allocation == "uniform" or target == 0:
            return [target] * len(self.layers)
        out = [0.0] * len(self.layers)
        for block, levels in self.levels.items():
            path = self.paths[block]
            k = int(torch.searchsorted(levels, torch.tensor(target, dtype=levels.dtype)).clamp(1, len(levels) - 1))
            lo, hi = float(levels[k - 1]), float(levels[k])
            frac = 0.0 if hi == lo else (target - lo) / (hi - lo)
            row = path[k - 1] * (1 - frac) + path[k] * frac
            for j, i in enumerate(self.block_layers(block)):
                out[i] = float(row[j])
        return out

    def threshold(self, layer: int, sparsity: float) -> float | None:
        """The magnitude below which a fraction ``sparsity`` of the layer's calibration entries lie."""
        if sparsity <= 0:
            return None
        position = min(sparsity, 1.0) * GRID
        lo = min(int(position), GRID - 1)
        frac = position - lo
        row = self.quantiles[layer]
        return float(row[lo] * (1 - frac) + row[lo + 1] * frac)


def find_targets(model: nn.Module, method: str, blocks: str | None) -> tuple[list[nn.Module], list[list[str]]]:
    """The blocks, and per block the qualified names of what is thresholded in it."""
    prefix, found = find_blocks(model, blocks)
    names: list[list[str]] = []
    for index, block in enumerate(found):
        base = f"{prefix}.{index}" if prefix else str(index)
        if method == "teal":
            inside = [f"{base}.{n}" for n, m in block.named_modules() if type(m) is nn.Linear]
            what = "nn.Linear layers"
        else:
            inside = [
                f"{base}.{n}"
                for n, m in block.named_modules()
                if n and (isinstance(m, ACTIVATIONS) or n.endswith("act_fn"))
            ]
            what = "gate activation (nn.SiLU/GELU/ReLU or a module named act_fn)"
            if len(inside) > 1:
                raise ConfigError(
                    f"CATS thresholds the MLP's gate activation, but block {base} holds {len(inside)} activation "
                    f"modules ({', '.join(inside)}); use method='teal'"
                )
        if not inside:
            raise ConfigError(f"block {base} ({type(block).__name__}) holds no {what} to sparsify")
        names.append(inside)
    return found, names


class _Recorder:
    """Forward hooks storing a subsample of ``|x|`` of each thresholded vector, refusing NaN/Inf."""

    def __init__(self, modules: dict[str, nn.Module], kinds: dict[str, str], per_batch: int, seed: int) -> None:
        self.values: dict[str, list[Tensor]] = {name: [] for name in modules}
        self.per_batch = per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.handles = [
            module.register_forward_hook(self._hook(name, kinds[name] == "linear")) for name, module in modules.items()
        ]

    def _hook(self, name: str, on_input: bool):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = (args[0] if on_input else output).detach()
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(
                    f"the calibration activations {'entering' if on_input else 'leaving'} {name} hold NaN or Inf; "
                    "activation sparsity needs finite activations (check the calibration inputs and the model's "
                    "weights, or calibrate in float32)"
                )
            flat = x.abs().float().reshape(-1).cpu()
            if flat.numel() > self.per_batch:
                flat = flat[torch.randint(0, flat.numel(), (self.per_batch,), generator=self.generator)]
            self.values[name].append(flat)

        return hook

    def quantiles(self, name: str) -> Tensor:
        ordered = torch.cat(self.values[name]).sort().values
        positions = torch.linspace(0, 1, GRID + 1, dtype=torch.float64) * (ordered.numel() - 1)
        lo = positions.floor().long()
        hi = positions.ceil().long()
        frac = (positions - lo).float()
        table = ordered[lo] * (1 - frac) + ordered[hi] * frac
        return table.cummax(0).values  # interpolation rounding must not make the table decrease by an ulp

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run_block(block: nn.Module, inputs: BlockInputs, index: int, batches: Sequence[int]) -> list[Tensor]:
    return [inputs.call(index, b).invoke(block, inputs.hidden[b]) for b in batches]


def _block_error(
    block: nn.Module, inputs: BlockInputs, index: int, batches: Sequence[int], dense: list[Tensor]
) -> float:
    out = _run_block(block, inputs, index, batches)
    return sum(float((o - d).double().pow(2).sum()) for o, d in zip(out, dense))


def calibrate(
    model: nn.Module,
    batches: Sequence[Any],
    found: list[nn.Module],
    names: list[list[str]],
    modules: dict[str, nn.Module],
    method: str,
    allocation: str,
    greedy_batches: int,
    step: float,
    max_sparsity: float,
    max_samples: int,
    seed: int,
) -> Calibration:
    """Calibrate the installed (still dense) ``modules`` of the blocks ``found`` (their names per block:
    :func:`find_targets`) block by block on ``batches``."""
    kinds = {n: ("linear" if method == "teal" else "activation") for group in names for n in group}
    layers = [n for group in names for n in group]
    block_of = [b for b, group in enumerate(names) for _ in group]
    params = [_weight_count(model, n, method) for n in layers]
    features = [_features(modules[n], method) for n in layers]
    per_batch = max(1, max_samples // max(1, len(batches)))
    with torch.no_grad():
        inputs = capture_inputs(model, found, batches)
        quantiles: dict[str, Tensor] = {}
        calibration = Calibration(method, allocation, layers, [kinds[n] for n in layers], features, block_of, params,
                                  torch.empty(0))  # fmt: skip
        for index, block in enumerate(found):
            recorder = _Recorder({n: modules[n] for n in names[index]}, kinds, per_batch, seed + index)
            try:
                dense = _run_block(block, inputs, index, range(len(batches)))
            finally:
                recorder.remove()
            for name in names[index]:
                quantiles[name] = recorder.quantiles(name)
            if method == "teal" and allocation == "greedy":
                calibration.quantiles = torch.stack([quantiles.get(n, torch.zeros(GRID + 1)) for n in layers])
                subset = range(min(greedy_batches, len(batches)))
                levels, path = _greedy(calibration, index, block, inputs, subset, [dense[b] for b in subset],
                                       [modules[n] for n in names[index]], step, max_sparsity)  # fmt: skip
                calibration.levels[index], calibration.paths[index] = levels, path
            inputs.hidden = dense  # TEAL calibrates every block on the dense model's activations
    calibration.quantiles = torch.stack([quantiles[n] for n in layers])
    return calibration


def _greedy(
    calibration: Calibration,
    index: int,
    block: nn.Module,
    inputs: BlockInputs,
    subset: Sequence[int],
    dense: list[Tensor],
    modules: list[nn.Module],
    step: float,
    max_sparsity: float,
) -> tuple[Tensor, Tensor]:
    """TEAL's block-wise greedy path: raise the block's weighted sparsity about ``step`` at a time through
    the projection that adds the least block-output error per unit of block sparsity gained. One move
    raises a layer's own sparsity by ``step`` of the block's weights, at most ``MAX_MOVE``, so a small
    projection (k/v with grouped-query attention) moves in steps it can take, not straight to ~100%."""
    rows = calibration.block_layers(index)
    weights = [float(calibration.params[i]) for i in rows]
    total = sum(weights)
    cap = GRID / (GRID + 1)
    current = [0.0] * len(rows)
    levels, path = [0.0], [list(current)]
    error_now = 0.0
    try:
        while levels[-1] < max_sparsity - 1e-9:
            best: tuple[float, int, float, float] | None = None
            for j in range(len(rows)):
                if current[j] >= cap:
                    continue
                trial = min(cap, current[j] + min(MAX_MOVE, step * total / weights[j]))
                _apply(calibration, rows, modules, [trial if k == j else s for k, s in enumerate(current)])
                error = _block_error(block, inputs, index, subset, dense)
                cost = (error - error_now) / ((trial - current[j]) * weights[j] / total)
                if best is None or cost < best[0]:
                    best = (cost, j, trial, error)
            if best is None:
                break
            current[best[1]], error_now = best[2], best[3]
            levels.append(sum(s * w for s, w in zip(current, weights)) / total)
            path.append(list(current))
    finally:
        _apply(calibration, rows, modules, [0.0] * len(rows))
    return torch.tensor(levels, dtype=torch.float64), torch.tensor(path, dtype=torch.float64)


def _apply(calibration: Calibration, rows: list[int], modules: list[nn.Module], sparsities: list[float]) -> None:
    for i, module, s in zip(rows, modules, sparsities):
        module.threshold = calibration.threshold(i, s)


def _weight_count(model: nn.Module, name: str, method: str) -> int:
    module = model.get_submodule(name)
    return int(module.weight.numel()) if method == "teal" else 1


def _features(module: nn.Module, method: str) -> int:
    return int(module.in_features) if method == "teal" else 0
