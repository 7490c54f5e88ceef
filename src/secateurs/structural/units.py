"""From per-index values on ports to one score per unit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..evidence import Evidence
from .graph import Group, PortView
from .surgery import own_tensor


def rows_along(tensor: Tensor, dim: int | None) -> Tensor:
    """``tensor`` as ``(positions along dim, rest)``; a free parameter (dim None) per element."""
    t = tensor.detach()
    if dim is None:
        return t.reshape(-1, 1)
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)


class UnitAccumulator:
    """Combine per-index values of many ports into units: ``sum``, ``l2``, ``mean`` or ``max``."""

    def __init__(self, units: int, how: str = "sum") -> None:
        self.how = how
        self.total = torch.zeros(units, dtype=torch.float64)
        self.count = torch.zeros(units, dtype=torch.float64)
        self.peak = torch.full((units,), float("-inf"), dtype=torch.float64)

    def add(self, index: Tensor, rows: Tensor) -> None:
        """``rows``: ``(positions, elements)`` scores of one port; ``index``: unit of each position."""
        hit = index >= 0
        if not bool(hit.any()):
            return
        units, rows = index[hit], rows[hit.to(rows.device)].double().cpu()
        per_row = rows.square().sum(1) if self.how == "l2" else rows.sum(1)
        self.total.index_add_(0, units, per_row)
        self.count.index_add_(0, units, torch.full_like(per_row, rows.shape[1]))
        self.peak.scatter_reduce_(0, units, rows.amax(1), reduce="amax")

    def result(self) -> Tensor:
        if self.how == "l2":
            return self.total.sqrt()
        if self.how == "mean":
            return self.total / self.count.clamp_min(1)
        if self.how == "max":
            return torch.where(torch.isinf(self.peak), torch.zeros_like(self.peak), self.peak)
        return self.total


@dataclass
class GroupEvidence:
    """What a group criterion may read: the model, the groups, and the core evidence (calibration
    batches, gathered activations / gradients for :attr:`Evidence.targets`, the seeded generator)."""

    model: nn.Module
    groups: list[Group]
    evidence: Evidence
    modules: dict[str, nn.Module] = field(default_factory=dict)
    #: the run's target sparsity, for criteria that search under the budget (Bernoulli masks)
    sparsity: float | None = None
    #: the run's own choice from scores: ``scores -> {group: removed unit indices}`` (allocation, bounds,
    #: rounding, GQA rows), so a search can measure exactly the model that ``mode='remove'`` would build
    decide: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    #: the run's removal solver (``None``: none), whose model a search's measurements stand for
    solver: str | None = None

    def __post_init__(self) -> None:
        if not self.modules:
            self.modules = dict(self.model.named_modules())

    def tensor(self, view: PortView) -> Tensor | None:
        port = view.port
        if port.param.startswith("#"):
            return None
        module = self.modules[port.module]
        return own_tensor(module, port.param)

    def module(self, view: PortView) -> Any:
        return self.modules[view.port.module]
