"""One-call shortcuts for transformers, on top of ``prune(..., mode='remove')`` (they sit above the API
they call, so the structural package never imports the front door).

Like ``prune_llm``, they time nothing unless asked (``latency=True``): timing keeps a dense copy of
the model during the removal.

FLAP (An et al. 2024, arXiv:2312.11983) removes attention heads and MLP neurons ranked by
weighted input fluctuation and compensates with biases; ShortGPT (Men et al. 2024,
arXiv:2403.03853) removes the blocks with the lowest block influence.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..api import prune
from ..blocks import find_blocks
from ..errors import ConfigError
from ..structural.report import StructuralReport


def prune_heads_and_neurons(
    model: nn.Module,
    sparsity: float,
    *,
    calibration: Iterable[Any] | None = None,
    method: str = "flap",
    allocation: str | dict[str, float] | None = None,
    solver: str | None = None,
    example_inputs: Any = None,
    max_batches: int | None = None,
    progress: bool = True,
    **structural: Any,
) -> StructuralReport:
    """Remove attention heads and MLP neurons of a transformer (FLAP by default: fluctuation metric,
    global adaptive ranking, bias compensation).

    ``sparsity`` is the fraction of the heads' and neurons' parameters to remove (global
    allocation) or of each layer's heads and neurons (``allocation='uniform'``).
    ``calibration``: batches of token ids (tensors or dicts). ``solver``: None for the method's own
    (FLAP: bias compensation), ``'none'`` to turn it off. ``structural``: options of
    :class:`~secateurs.granularity.StructuralOptions` (``gqa``, ``round_to`` ...).
    """
    return prune(
        model, method, sparsity, pattern="head+channel", mode="remove", allocation=allocation, solver=solver,
        calibration=calibration, example_inputs=example_inputs, max_batches=max_batches, progress=progress,
        structural={"latency": False, **structural},
    )  # fmt: skip


def remove_layers(
    model: nn.Module,
    n_layers: int,
    *,
    calibration: Iterable[Any] | None = None,
    method: str = "shortgpt",
    blocks: str | None = None,
    example_inputs: Any = None,
    max_batches: int | None = None,
    progress: bool = True,
    **structural: Any,
) -> StructuralReport:
    """Remove ``n_layers`` whole blocks, those with the lowest ShortGPT block influence on ``calibration``;
    ``method='random'`` needs no data. ``blocks='model.layers'`` names the container when it cannot be
    found automatically."""
    total = len(find_blocks(model, blocks)[1])
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 0 < n_layers < total:
        raise ConfigError(f"n_layers must be between 1 and {total - 1} (the model has {total} blocks), got {n_layers}")
    return prune(
        model, method, n_layers / total, pattern="layer", mode="remove", calibration=calibration, blocks=blocks,
        example_inputs=example_inputs, max_batches=max_batches, progress=progress,
        structural={"latency": False, **structural},
    )  # fmt: skip
