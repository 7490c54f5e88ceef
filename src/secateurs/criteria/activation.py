"""Activation criteria: mean |activation|, APoZ and Wanda."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import DataRequiredError
from ..evidence import ActivationStats, Evidence, Need
from ..scope import Target
from .base import Criterion, register, weight3


def activation_stats(evidence: Evidence, target: Target) -> ActivationStats:
    stats = evidence.activations.get(target.name)
    if stats is None:
        raise DataRequiredError(f"no activations reached {target.module_name!r}; is it used in forward()?")
    return stats


def per_input3(target: Target, values: Tensor) -> Tensor:
    """A per-input-channel vector arranged as ``(O, 1, I)`` so it broadcasts over the canonical weight.
    Grouped convolutions see only their group's input channels."""
    out, _, inp = target.canonical_shape
    groups = target.module.groups if isinstance(target.module, nn.modules.conv._ConvNd) else 1
    per_group = values.reshape(groups, inp)
    return per_group.repeat_interleave(out // groups, dim=0).unsqueeze(1)


def input_norm3(evidence: Evidence, target: Target) -> Tensor:
    """||X_j||_2 as ``(O, 1, I)``."""
    return per_input3(target, activation_stats(evidence, target).input_norm)


@register
class Activation(Criterion):
    """Mean |output| of each neuron or filter over the calibration data."""

    name = "activation"
    needs = frozenset({Need.OUTPUTS})
    patterns = ("output_channel",)
    reduction = "mean"
    scores_embeddings = False

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        per_channel = activation_stats(evidence, target).output_mean_abs
        return per_channel.reshape(-1, 1, 1).expand(target.canonical_shape)


@register
class APoZ(Criterion):
    """Average Percentage of Zeros after ReLU (Hu et al. 2016, arXiv:1607.03250):
    neurons that are mostly zero are pruned first. Assumes a ReLU follows the layer
    (a pre-activation <= 0 counts as zero)."""

    name = "apoz"
    needs = frozenset({Need.OUTPUTS})
    patterns = ("output_channel",)
    reduction = "mean"
    scores_embeddings = False

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        per_channel = 1.0 - activation_stats(evidence, target).apoz
        return per_channel.reshape(-1, 1, 1).expand(target.canonical_shape)


@register
class Wanda(Criterion):
    """|W_ij| * ||X_j||_2, compared within each output row (Sun et al. 2023,
    arXiv:2306.11695). For convolutions the norm is per input channel."""

    name = "wanda"
    needs = frozenset({Need.ACTIVATIONS})
    default_comparison = "row"
    scores_embeddings = False

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        return weight3(target).double().abs() * input_norm3(evidence, target).to(target.weight.device)
