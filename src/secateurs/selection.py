"""Selection: lowest scores within each comparison group become the mask.

Exact by construction: a group of U units asked to lose k loses exactly k (or all
units already dead, if more). Ties break by index through a stable sort, so the
same scores always give the same mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import NonFiniteError


def check_finite(scores: Tensor, what: str) -> None:
    """Refuse NaN/Inf scores: a ranking over them is meaningless."""
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise NonFiniteError(
            f"{what} has {bad} NaN/Inf value(s); check the weights and calibration data "
            "(e.g. a diverged run or an fp16 overflow) before pruning"
        )


def keep_mask(unit_scores: Tensor, prune_per_group: int, dead: Tensor | None = None) -> Tensor:
    """Boolean keep-mask ``(groups, units)`` that prunes the ``prune_per_group`` lowest units
    of each row. Units already ``dead`` are pruned first and count toward the number."""
    scores = unit_scores.double()
    if dead is not None:
        scores = scores.masked_fill(dead, float("-inf"))
    groups, units = scores.shape
    order = torch.sort(scores, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(units, device=order.device).expand(groups, units))
    k = torch.full((groups, 1), prune_per_group, device=order.device)
    if dead is not None:
        k = torch.maximum(k, dead.sum(dim=1, keepdim=True))
    return rank >= k


def global_prune_counts(
    unit_scores: dict[str, Tensor],
    unit_numel: dict[str, int],
    dead: dict[str, Tensor],
    sparsity: float,
) -> dict[str, int]:
    """Rank all units of all targets together and return how many each target loses.

    Units are weighted by their element count, so ``sparsity`` is a fraction of
    weights, not of units. Applying :func:`keep_mask` per target with these counts
    reproduces the global ranking exactly (same stable order inside each target).
    """
    names = list(unit_scores)
    flat = [unit_scores[n].double().reshape(-1).masked_fill(dead[n].reshape(-1), float("-inf")) for n in names]
    owner = torch.cat([torch.full((f.numel(),), i) for i, f in enumerate(flat)])
    sizes = torch.cat([torch.full((f.numel(),), unit_numel[n], dtype=torch.float64) for n, f in zip(names, flat)])
    order = torch.sort(torch.cat(flat), stable=True).indices
    cumulative = sizes[order].cumsum(0)
    wanted = round(sparsity * float(cumulative[-1]))
    # the prefix whose element count lands nearest the target (ties: the larger prefix)
    first = int(torch.searchsorted(cumulative, torch.tensor(float(wanted), dtype=torch.float64)))
    if first >= len(cumulative):
        cut = len(cumulative)
    else:
        over = float(cumulative[first]) - wanted
        under = wanted - (float(cumulative[first - 1]) if first else 0.0)
        cut = first + 1 if over <= under else first
    n_dead = int(sum(int(d.sum()) for d in dead.values()))
    cut = max(cut, n_dead)
    counts = torch.bincount(owner[order[:cut]], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}
