"""Removal on a schedule: the structural side of :class:`secateurs.Pruner`.

A schedule speaks of fractions of the *original* model; every removal only sees what is left.
Each step therefore removes ``1 - (1 - target) / (1 - done)`` of the remaining units, which
composes to the target (up to one unit per group per step of rounding).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..allocation import Explicit
from ..config import PruneConfig
from ..errors import ConfigError
from ..pipeline import Data
from .graph import DependencyGraph
from .pipeline import candidate_groups, example_inputs_for, remove_structures
from .removal import refuse_reparametrized
from .report import StructuralReport


class ScheduledRemoval:
    """Validates everything that does not need scores up front, then removes step by step."""

    def __init__(self, model: nn.Module, config: PruneConfig, data: Data) -> None:
        opts = config.structural_
        if config.schedule_.rewind_step is not None:
            raise ConfigError(
                "lottery-ticket rewinding restores weights of the original shapes, which removal changes; "
                "find the ticket with masks (mode='mask'), then secateurs.bake(model) and prune(..., mode='remove')"
            )
        if opts.max_ratio < 1.0:
            raise ConfigError(
                "structural.max_ratio caps a single removal, not the schedule's total; use keep_at_least "
                f"(an absolute floor, which holds across steps) instead of max_ratio={opts.max_ratio}"
            )
        if isinstance(config.allocation_, Explicit):
            raise ConfigError(
                "explicit per-group ratios are final ratios; with a schedule, give one sparsity and "
                "allocation='uniform' or 'global' (or call prune(..., mode='remove') per phase)"
            )
        inputs = example_inputs_for(model, data)
        refuse_reparametrized(model)
        if config.pattern_.kinds != ("layer",):
            candidate_groups(DependencyGraph(model, inputs, gqa=opts.gqa), config.pattern_.kinds, config.scope_)
        self.model, self.config, self.data = model, config, data
        self.removed = 0.0
        self.reports: list[StructuralReport] = []

    def remove_to(self, sparsity: float) -> StructuralReport | None:
        """Remove what is left to reach ``sparsity`` of the original units; None if already there."""
        if sparsity <= self.removed:
            return None
        step = 1.0 - (1.0 - sparsity) / (1.0 - self.removed)
        report = remove_structures(self.model, dataclasses.replace(self.config, sparsity=step), self.data)
        self.removed = sparsity
        self.reports.append(report)
        return report
