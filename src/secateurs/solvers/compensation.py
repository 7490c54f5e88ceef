"""Bias compensation: a pruned input is replaced by its calibration mean, folded into the bias.

FLAP (An et al. 2024, arXiv:2312.11983, eq. 8) removes input channels of a layer and adds
``W[:, removed] @ mean(X[removed])`` to its bias, so the layer's expected output is unchanged
without retraining. The same holds for any pruned weight: ``b_i += sum_j (1 - keep_ij) W_ij E[x_j]``
(for a convolution, ``E[x_j]`` is the channel's mean over positions; borders where padding
reads zeros are not corrected). In ``mode='remove'`` it serves FLAP by default (the removed
input columns of every consuming layer); in ``mode='reconstruct'`` it compensates any mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..criteria.activation import activation_stats, per_input3
from ..errors import ConfigError
from ..evidence import Evidence, Need
from ..layout import Layout, to_canonical
from ..patterns import Pattern
from ..scope import Target
from .base import Solver, SolveResult, register_solver


@register_solver
class BiasCompensation(Solver):
    """Replace what is pruned by its calibration mean, folded into the bias (FLAP, arXiv:2312.11983)."""

    name = "bias_compensation"
    needs = frozenset({Need.ACTIVATIONS})
    modes = ("reconstruct", "remove")

    def validate(self, targets: Sequence[Target], mode: str) -> None:
        for t in targets:
            if t.layout is Layout.EMBEDDING:
                raise ConfigError(f"{t.module_name!r} is an Embedding: it has no bias to compensate into")
            if mode == "reconstruct" and getattr(t.module, "bias", None) is None:
                raise ConfigError(
                    f"{t.module_name!r} has no bias to fold the compensation into; exclude it from the scope, "
                    "or use solver='sparsegpt' (removal adds the biases it needs, a masked layer cannot)"
                )

    def bias_delta(self, target: Target, evidence: Evidence, keep: Tensor) -> Tensor:
        """``sum_j (1 - keep_ij) W_ij E[x_j]`` per output ``i`` (float64)."""
        w3 = to_canonical(target.parameter.detach().double(), target.layout)
        mean3 = per_input3(target, activation_stats(evidence, target).input_mean.double()).to(w3.device)
        gone3 = ~to_canonical(keep.to(w3.device, torch.bool), target.layout)
        return (w3 * mean3).masked_fill(~gone3, 0.0).sum(dim=(1, 2))

    def solve(
        self,
        targets: Sequence[Target],
        evidence: Evidence,
        masks: Mapping[str, Tensor] | None,
        sparsities: Mapping[str, float] | None = None,
        pattern: Pattern | None = None,
    ) -> dict[str, SolveResult]:
        if masks is None:
            raise ConfigError("bias compensation does not choose masks; it compensates the mask a criterion chose")
        results = {}
        for t in targets:
            keep = masks[t.name].to(t.parameter.device, torch.bool)
            weight = torch.where(keep, t.parameter.detach(), 0.0)
            results[t.name] = SolveResult(keep=keep, weight=weight, bias_delta=self.bias_delta(t, evidence, keep))
        return results
