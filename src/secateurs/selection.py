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
    # a finite sum proves every element finite (inf and nan propagate); only an overflowing
    # sum needs the element-wise check, which allocates a mask as large as the tensor
    if bool(torch.isfinite(scores.sum())) or bool(torch.isfinite(scores).all()):
        return
    bad = int((~torch.isfinite(scores)).sum())
    raise NonFiniteError(
        f"{what} has {bad} NaN/Inf value(s); check the weights and calibration data "
        "(e.g. a diverged run or an fp16 overflow) before pruning"
    )


def _with_dead(scores: Tensor, dead: Tensor | None) -> Tensor:
    return scores if dead is None else scores.masked_fill(dead, float("-inf"))


def keep_mask(unit_scores: Tensor, prune_per_group: int, dead: Tensor | None = None) -> Tensor:
    """Boolean keep-mask ``(groups, units)`` that prunes the ``prune_per_group`` lowest units
    of each row. Units already ``dead`` are pruned first and count toward the number.

    Ties at the threshold go to the lower index, exactly as a stable sort would order
    them, but found with one ``kthvalue`` selection (linear time) instead of a sort.
    """
    scores = _with_dead(unit_scores, dead)
    groups, units = scores.shape
    k = torch.full((groups, 1), prune_per_group, device=scores.device)
    if dead is not None:
        k = torch.maximum(k, torch.count_nonzero(dead, dim=1).unsqueeze(1))
    k = k.clamp(max=units)
    if units == 0 or int(k.max()) == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if bool((k == k[0]).all()):
        threshold = torch.kthvalue(scores, max(int(k[0]), 1), dim=1, keepdim=True).values
    else:  # rows with different counts (dead units): one sort
        ordered = torch.sort(scores, dim=1).values
        threshold = ordered.gather(1, (k - 1).clamp(min=0))
    keep = scores > threshold
    # usual case: exactly k scores are <= the k-th smallest (no surplus ties at the threshold)
    if groups == 1:
        exact = units - int(torch.count_nonzero(keep)) == int(k[0])
    else:
        exact = bool((units - torch.count_nonzero(keep, dim=1).unsqueeze(1) == k).all())
    if exact:
        return keep
    below = scores < threshold
    at = scores == threshold
    room = (k - torch.count_nonzero(below, dim=1).unsqueeze(1)).clamp(min=0)
    return ~(below | (at & (at.cumsum(dim=1) <= room)))


def global_prune_counts(
    unit_scores: dict[str, Tensor],
    unit_numel: dict[str, int],
    dead: dict[str, Tensor | None],
    sparsity: float,
) -> dict[str, int]:
    """Rank all units of all targets together and return how many each target loses.

    Units are weighted by their element count, so ``sparsity`` is a fraction of
    weights, not of units. Applying :func:`keep_mask` per target with these counts
    reproduces the global ranking exactly (ties go to the earlier target, then the
    lower index, as in a stable sort of the concatenated scores).
    """
    names = list(unit_scores)
    flat = torch.cat([_with_dead(unit_scores[n], dead[n]).reshape(-1) for n in names])
    owner = torch.cat([torch.full((unit_scores[n].numel(),), i) for i, n in enumerate(names)]).to(flat.device)
    sizes = {unit_numel[n] for n in names}
    n_dead = sum(int(torch.count_nonzero(d)) for d in dead.values() if d is not None)
    if len(sizes) == 1:  # equal units: a fraction of units is a fraction of weights; no sort needed
        cut = min(max(round(sparsity * flat.numel()), n_dead), flat.numel())
        if cut == 0:
            return dict.fromkeys(names, 0)
        threshold = torch.kthvalue(flat, cut).values
        below = flat < threshold
        at = flat == threshold
        pruned = below | (at & (at.cumsum(0) <= cut - int(below.sum())))
        counts = torch.bincount(owner[pruned], minlength=len(names))
        return {n: int(c) for n, c in zip(names, counts)}

    weights = torch.cat([torch.full((unit_scores[n].numel(),), unit_numel[n], dtype=torch.float64) for n in names])
    order = torch.sort(flat, stable=True).indices
    cumulative = weights[order.cpu()].cumsum(0)
    wanted = round(sparsity * float(cumulative[-1]))
    # the prefix whose element count lands nearest the target (ties: the larger prefix)
    first = int(torch.searchsorted(cumulative, torch.tensor(float(wanted), dtype=torch.float64)))
    if first >= len(cumulative):
        cut = len(cumulative)
    else:
        over = float(cumulative[first]) - wanted
        under = wanted - (float(cumulative[first - 1]) if first else 0.0)
        cut = first + 1 if over <= under else first
    cut = max(cut, n_dead)
    counts = torch.bincount(owner[order[:cut]], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}
