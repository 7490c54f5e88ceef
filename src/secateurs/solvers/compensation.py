"""Bias compensation: a pruned input is replaced by its calibration mean, folded into the bias.

FLAP (An et al. 2024, arXiv:2312.11983, eq. 8) removes input channels of a layer and adds
``W[:, removed] @ mean(X[removed])`` to its bias, so the layer's expected output is unchanged
without retraining. The same holds for any pruned weight: ``b_i += sum_j (1 - keep_ij) W_ij E[x_j]``
(for a convolution, ``E[x_j]`` is the channel's mean over positions; borders where padding
reads zeros are not corrected). In ``mode='remove'`` it serves FLAP by default (the removed
input columns of every consuming layer); in ``mode='reconstruct'`` it compensates any mask.
A weight shared by several modules sees different inputs in each, so each holder gets its own
correction (``SolveResult.tied_bias_deltas``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..criteria.activation import activation_stats, per_input3
from ..errors import ConfigError
from ..evidence import Evidence, Need, check_tied_groups
from ..layout import Layout, layout_of, to_canonical
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
            check_tied_groups(t, "its input channels")
            for holder, module, _ in t.users:  # a tied weight: every holder is corrected by its own inputs
                what = repr(holder) if module is t.module else f"{holder!r} (which shares {t.name})"
                layout = layout_of(module)
                if layout is Layout.EMBEDDING:
                    raise ConfigError(f"{what} is an Embedding: it has no bias to compensate into")
                if layout is not t.layout:
                    raise ConfigError(
                        f"{what} is a {type(module).__name__}, whose inputs are not gathered with those of "
                        f"{t.module_name!r}; bias compensation cannot correct it: exclude {t.module_name!r} from "
                        "the scope"
                    )
                if mode == "reconstruct" and getattr(module, "bias", None) is None:
                    raise ConfigError(
                        f"{what} has no bias to fold the compensation into; exclude it from the scope, "
                        "or use solver='sparsegpt' (removal adds the biases it needs, a masked layer cannot)"
                    )

    def bias_delta(self, target: Target, evidence: Evidence, keep: Tensor, holder: str | None = None) -> Tensor:
        """``sum_j (1 - keep_ij) W_ij E[x_j]`` per output ``i`` (float64), with the mean of the inputs ``holder``
        saw (a module holding the weight; the target's own by default)."""
        w3 = to_canonical(target.parameter.detach().double(), target.layout)
        mean = activation_stats(evidence, target).holder_input_mean(holder or target.module_name)
        mean3 = per_input3(target, mean.double()).to(w3.device)
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
            tied = {holder: self.bias_delta(t, evidence, keep, holder) for holder, _, _ in t.tied}
            # the survivors are unchanged (weight None: only masked); only the biases move
            results[t.name] = SolveResult(keep, None, self.bias_delta(t, evidence, keep), tied_bias_deltas=tied)
        return results
