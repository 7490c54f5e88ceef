"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2023, arXiv:2310.05175).

LLM layers differ in how many "outlier" weights they hold -- entries whose Wanda score
``|W_ij| * ||X_j||`` exceeds M times the layer's mean score. OWL prunes layers with more
outliers less: with ``D_l`` the outlier ratio of block l (all its linear layers together),

    density_l = 2 * lambda * (D_l - min D) / (max D - min D) + (1 - S) - mean(...)

so densities span ``[1 - S - lambda, 1 - S + lambda]`` around the target and average to it.
The ratios come from the dense model (the reference code measures every block before
pruning any). The paper's defaults for LLaMA are M = 5 and lambda = 0.08.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """Fraction of entries whose score exceeds ``m`` times the mean over all of ``scores``."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios; their mean is ``sparsity``."""
    check_lambda(lam, sparsity)
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return [sparsity] * len(r)
    density = (r - r.min()) / spread * (2 * lam)
    density = density - density.mean() + (1.0 - sparsity)
    return [float(1.0 - d) for d in density]


def check_lambda(lam: float, sparsity: float) -> None:
    """Every block's sparsity must stay in [0, 1): lambda < min(S, 1 - S)."""
    bound = min(sparsity, 1.0 - sparsity)
    if lam < 0 or (lam > 0 and lam >= bound):
        raise ConfigError(
            f"OWL lambda={lam} must be in [0, {bound:g}) at sparsity {sparsity:g} (lambda < min(S, 1 - S)), "
            "so every block's sparsity stays in [0, 1)"
        )
