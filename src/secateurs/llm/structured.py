"""FLAP and ShortGPT through the LLM front door: the structural module does the removal.

FLAP (An et al. 2024, arXiv:2312.11983) removes attention heads and MLP neurons ranked by
weighted input fluctuation and compensates with biases; ShortGPT (Men et al. 2024,
arXiv:2403.03853) removes the blocks with the lowest block influence. Both live in
:mod:`secateurs.structural` (see ``docs/structural.md``); here they get the same calibration
segments, config and CLI as the layerwise methods.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from .blocks import batched, find_blocks
from .config import LLMPruneConfig


def remove_structures(model: nn.Module, config: LLMPruneConfig, segments: Tensor, progress: bool) -> Any:
    """Run FLAP or ShortGPT on ``segments``; returns the structural module's report."""
    from ..structural import prune_heads_and_neurons, remove_layers

    batches = list(batched(segments, config.batch_size))
    if config.method == "flap":
        return prune_heads_and_neurons(
            model, config.sparsity, calibration=batches, allocation=config.allocation, progress=progress
        )
    total = len(find_blocks(model, config.blocks)[1])
    n_layers = round(config.sparsity * total)
    if not 0 < n_layers < total:
        raise ConfigError(
            f"shortgpt removes round(sparsity x {total} blocks) = {n_layers} blocks; choose a sparsity that "
            f"removes between 1 and {total - 1} (e.g. {1 / total:.3f} removes one)"
        )
    options = {"blocks": config.blocks} if config.blocks else {}
    return remove_layers(model, n_layers, calibration=batches, progress=progress, **options)
