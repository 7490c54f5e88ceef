"""Data-free criteria: magnitude, random, and LAMP."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..evidence import Evidence
from ..scope import Target
from .base import Criterion, register, weight3


@register
class Magnitude(Criterion):
    """|w|. ``norm=1`` sums magnitudes over a block or channel, ``norm=2`` takes their L2 norm
    (Han et al. 2015, arXiv:1506.02626; Li et al. 2017, arXiv:1608.08710 for filters)."""

    name = "magnitude"

    def __init__(self, norm: int = 1) -> None:
        if norm not in (1, 2):
            raise ConfigError(f"magnitude norm must be 1 or 2, got {norm!r}")
        self.norm = norm

    @property
    def reduction(self) -> str:  # type: ignore[override]
        return "sum" if self.norm == 1 else "l2"

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        return weight3(target).abs()


@register
class Random(Criterion):
    """Uniform random scores from the run's seeded generator: the baseline every method must beat."""

    name = "random"
    granularities = ("channel", "head", "hidden", "layer")

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        w = weight3(target)
        return torch.rand(w.shape, generator=evidence.generator, dtype=torch.float64).to(w.device)


def lamp_normalize(scores: Tensor) -> Tensor:
    """LAMP (Lee et al. 2021, arXiv:2010.07611, eq. 2): with units sorted by ascending
    score, ``s_u^2 / sum_{v >= u} s_v^2``. Scale-free, so layers compare globally;
    the largest unit of every layer scores 1, so no layer is emptied."""
    flat = scores.reshape(-1).double().square()
    order = torch.sort(flat, stable=True).indices
    ordered = flat[order]
    tail = ordered.flip(0).cumsum(0).flip(0)
    normalized = torch.where(tail > 0, ordered / tail.clamp_min(1e-300), torch.zeros_like(ordered))
    out = torch.empty_like(flat)
    out[order] = normalized
    return out.reshape(scores.shape)


@register
class LAMP(Criterion):
    """Layer-adaptive magnitude scores, meant for one global threshold."""

    name = "lamp"
    default_allocation = "global"

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        return lamp_normalize(weight3(target))
