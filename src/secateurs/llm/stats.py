"""Statistics of one block's layer inputs, gathered with forward hooks over the calibration data.

Two kinds: per-channel sums of squares (Wanda's ``||X_j||_2``) and the SparseGPT Hessian
``2 X X^T``. Layers fed the very same tensor (q/k/v projections, gate/up projections) share one
accumulator: the Hessian of a Llama block is computed 4 times instead of 7.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor, nn

from ..scope import Target
from ..solvers.sparsegpt import HessianAccumulator
from .blocks import BlockInputs


class Needs(str, Enum):
    NOTHING = "nothing"
    NORMS = "norms"  # sum of x_j^2 per input channel
    HESSIAN = "hessian"  # 2 X X^T / n


@dataclass
class InputSums:
    """Sum of squares per input channel and the number of positions that went into it."""

    sq_sum: Tensor
    positions: int = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq_sum += x.square().sum(0).double()
        self.positions += x.shape[0]


@dataclass
class BlockStats:
    """Per-target accumulators (targets sharing an input share the object)."""

    norms: dict[str, InputSums] = field(default_factory=dict)
    hessians: dict[str, HessianAccumulator] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # target -> target whose input it shares


def _input_key(x: Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)


def gather(block: nn.Module, block_index: int, targets: list[Target], inputs: BlockInputs, needs: Needs) -> BlockStats:
    """One forward pass of ``block`` over every calibration batch, with hooks on ``targets``."""
    stats = BlockStats()
    live: dict[tuple, tuple[Tensor, str]] = {}  # tensors seen in this batch, kept alive so keys stay unique
    # (identity cannot tell: every hook call's ``detach()`` is a new tensor object over the same data)
    first_batch = True

    def hook_for(target: Target):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach()
            name = target.name
            if first_batch:
                key = _input_key(x)
                if key in live:  # ``live`` keeps each seen tensor alive, so an address is never reused
                    stats.owner[name] = live[key][1]
                    _share(stats, name, live[key][1])
                    return
                live[key] = (x, name)
                stats.owner[name] = name
                _create(stats, name, x, needs)
            elif stats.owner[name] != name:
                return
            if needs is Needs.NORMS:
                stats.norms[name].add(x)
            elif needs is Needs.HESSIAN:
                stats.hessians[name].add(x)

        return hook

    handles = [t.module.register_forward_hook(hook_for(t)) for t in targets]
    try:
        with torch.no_grad():
            for b, hidden in enumerate(inputs.hidden):
                inputs.call(block_index, b).invoke(block, hidden)
                first_batch = False
                live.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def _create(stats: BlockStats, name: str, x: Tensor, needs: Needs) -> None:
    columns = x.shape[-1]
    if needs is Needs.NORMS:
        stats.norms[name] = InputSums(torch.zeros(columns, dtype=torch.float64, device=x.device))
    elif needs is Needs.HESSIAN:
        stats.hessians[name] = HessianAccumulator(columns, device=x.device)


def _share(stats: BlockStats, name: str, owner: str) -> None:
    if owner in stats.norms:
        stats.norms[name] = stats.norms[owner]
    if owner in stats.hessians:
        stats.hessians[name] = stats.hessians[owner]
