"""Whole blocks: find the repeated blocks, score them, drop them.

Removing block i of a residual stack is the same as replacing it by the identity;
we delete it from its container (``ModuleList`` / ``Sequential``), so the saved
model is a plain, shallower model (``num_hidden_layers`` updated for transformers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import model_device, run_model, to_device
from ..blocks import find_blocks
from ..errors import ConfigError, DataRequiredError, StructureError
from ..evidence import preserved
from ..progress import progress
from .step import Step

__all__ = ["block_influence", "find_blocks", "how_many", "layer_step"]


def _hidden(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return None


def block_influence(
    model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[Any], show_progress: bool = False,
    sum_over_ranks: Callable[[Sequence[Tensor]], None] | None = None,
) -> Tensor:  # fmt: skip
    """ShortGPT (Men et al. 2024, arXiv:2403.03853): ``BI_i = 1 - mean_t cos(x_i,t, x_{i+1},t)``
    over every calibration token, from hooks on each block's input and output hidden states.
    ``sum_over_ranks``: a distributed run adds every rank's sums and token counts before the mean, so each
    rank's share weighs by the tokens it saw."""
    sums, counts = _influence_sums(model, blocks, batches, show_progress)
    if sum_over_ranks is not None:
        sum_over_ranks([sums, counts])
    if bool((counts == 0).any()):
        missing = [i for i in range(len(blocks)) if counts[i] == 0]
        raise StructureError(f"blocks {missing} never received a hidden state of their output's shape")
    return sums / counts


def _influence_sums(
    model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[Any], show_progress: bool
) -> tuple[Tensor, Tensor]:
    """Per block: the sum of ``1 - cos`` over the tokens of ``batches`` and their number (float64)."""
    if not batches:
        raise DataRequiredError("block influence needs calibration batches (calibration=...)")
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)
    seen: dict[int, Tensor] = {}

    def pre(i: int):
        def hook(module, args, kwargs):
            x = _hidden(args) if args else _hidden(kwargs.get("hidden_states"))
            if x is not None:
                seen[i] = x.detach()

        return hook

    def post(i: int):
        def hook(module, args, kwargs, output):
            x, y = seen.pop(i, None), _hidden(output)
            if x is None or y is None or x.shape != y.shape:
                return
            cos = F.cosine_similarity(x.double().flatten(0, -2), y.double().flatten(0, -2), dim=-1)
            sums[i] += float((1.0 - cos).sum())
            counts[i] += cos.numel()

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i), with_kwargs=True))
    device = model_device(model)
    try:
        with preserved(model, []), torch.no_grad():
            model.eval()
            for batch in progress(batches, "block influence", show_progress):
                run_model(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
    return sums, counts


def layer_step(container: str, removed: Sequence[int]) -> Step:
    return Step(dropped={container: sorted(int(i) for i in removed)}, kind="layers")


def how_many(total: int, sparsity: float, keep_at_least: int) -> int:
    """Blocks to remove: round(sparsity x total), at least one, leaving ``keep_at_least``."""
    n = round(sparsity * total)
    if sparsity > 0 and n == 0:
        raise ConfigError(
            f"the model has {total} blocks; sparsity {sparsity} removes round({sparsity} x {total}) = 0 of them; "
            f"choose a sparsity of at least {1 / (2 * total):.3f} (e.g. {1 / total:.3f} removes one)"
        )
    if n > total - keep_at_least:
        raise ConfigError(
            f"the model has {total} blocks; sparsity {sparsity} removes {n}, but at least {keep_at_least} must stay "
            "(keep_at_least); lower the sparsity"
        )
    return n
