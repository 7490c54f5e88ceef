"""How many units each group loses, then which ones.

The engine's allocators (uniform, global, LAMP, explicit dict) decide the counts on
the groups' unit scores, exactly as they do for weight tensors; this module adds the
structural rules on top:

- ``max_ratio`` and ``keep_at_least`` bound every group (per KV group for query heads). A
  uniform or explicit request beyond the bound is refused with the numbers; a global
  ranking simply skips the protected units (the best-scoring ones of each group);
- ``round_to``: channel and hidden counts that stay are rounded to the nearest multiple
  (never below one multiple, nor below ``keep_at_least``); a group that cannot be rounded
  (smaller than one multiple) is left whole;
- head groups with several KV groups lose the same number of query heads in every KV
  group, ``round(sparsity * heads_per_group)``, so head counts stay divisible.

Selection is the engine's exact, deterministic :func:`~secateurs.selection.keep_mask`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..allocation import Budget
from ..errors import ConfigError
from ..granularity import StructuralOptions
from ..patterns import OutputChannel
from ..selection import check_finite, keep_mask
from .graph import Group


@dataclass(frozen=True)
class _GroupTarget:
    """A group seen by the engine's allocators as if it were one weight tensor."""

    name: str
    canonical_shape: tuple[int, int, int]

    @property
    def module_name(self) -> str:
        return self.name

    @property
    def numel(self) -> int:
        return math.prod(self.canonical_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.canonical_shape


def _bounds(group: Group, opts: StructuralOptions) -> tuple[int, int]:
    """(units per row, most units a row may lose)."""
    per_row = group.units // group.rows
    most = min(per_row - opts.keep_at_least, math.floor(opts.max_ratio * per_row + 1e-9))
    return per_row, max(most, 0)


def _rounded(kept: int, per_row: int, round_to: int, minimum: int) -> int:
    if round_to <= 1 or kept >= per_row:
        return kept
    r = math.floor(kept / round_to + 0.5) * round_to
    r = max(r, math.ceil(minimum / round_to) * round_to, round_to)
    return per_row if r >= per_row else r


def prune_counts(
    groups: list[Group], scores: dict[str, Tensor], allocation, sparsity: float, opts: StructuralOptions
) -> dict[str, int]:
    """Units each row of each group loses."""
    unit_scores, dead, targets, protected = {}, {}, [], {}
    for g in groups:
        per_row, most = _bounds(g, opts)
        s = scores[g.name].double().reshape(g.rows, per_row)
        check_finite(s, f"scores of group {g.name}")
        # the best (per_row - most) units of every row are out of reach
        keep_n = per_row - most
        top = torch.zeros_like(s, dtype=torch.bool)
        if keep_n:
            top.scatter_(1, torch.topk(s, keep_n, dim=1).indices, True)
        protected[g.name] = top
        unit_scores[g.name] = s
        dead[g.name] = torch.zeros_like(s, dtype=torch.bool)
        params = max(round(float(g.unit_params.mean())), 1) if g.units else 1
        targets.append(_GroupTarget(g.name, (g.units, 1, params)))
    # an explicit key naming no group would silently leave nothing protected; a profile must fit the groups
    allocation.check_targets(targets, "group", " (a group is named by the layer that produces its channels)")
    ranked_globally = allocation.needs_single_group
    if ranked_globally:
        unit_scores = {n: s.masked_fill(protected[n], float("inf")) for n, s in unit_scores.items()}
    budget = Budget(targets, sparsity, sparsity, unit_scores, dead, OutputChannel())
    counts = allocation.prune_counts(budget)
    out = {}
    for g in groups:
        per_row, most = _bounds(g, opts)
        k = counts[g.name] // g.rows if ranked_globally else counts[g.name]
        if k > most and not ranked_globally:
            what = "query heads per KV group" if g.rows > 1 else f"{g.kind} units"
            raise ConfigError(
                f"group {g.name!r} has {per_row} {what}; the requested sparsity removes {k}, but at most {most} "
                f"may go (keep_at_least={opts.keep_at_least}, max_ratio={opts.max_ratio}). Lower the sparsity, "
                "raise max_ratio, or exclude the group from the scope"
            )
        k = min(k, most)
        if g.kind != "head":
            minimum = max(opts.keep_at_least, per_row - most)
            k = per_row - _rounded(per_row - k, per_row, opts.round_to, minimum)
        out[g.name] = max(k, 0)
    return out


def select(groups: list[Group], scores: dict[str, Tensor], counts: dict[str, int]) -> dict[str, Tensor]:
    """Unit indices each group loses: the lowest scores, ties to the lower index."""
    removed = {}
    for g in groups:
        k = counts[g.name]
        if k <= 0:
            continue
        s = scores[g.name].double().reshape(g.rows, -1)
        keep = keep_mask(s, k)
        removed[g.name] = (~keep).reshape(-1).nonzero().reshape(-1)
    return removed
