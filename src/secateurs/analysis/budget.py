"""From a sensitivity profile and a budget to a sparsity per target: the exact knapsack, then the remainder.

:func:`solve_budget` picks, for every profiled target, the grid sparsity (or dense) that minimises
the summed measured damage while the summed cost stays within the budget (exact, see
:mod:`.knapsack`). The grid is coarse, so the cheapest optimal combination usually leaves a little
budget unspent; that remainder is handed back along the measured curves, linearly between the
chosen grid point and the next lower one, to the targets whose damage falls most per unit of cost,
so a sparsity budget is met exactly (to the rounding of each comparison group) instead of
overshooting by up to a grid step.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .knapsack import BudgetError, Option, solve
from .profile import BUDGETS, Entry, SensitivityProfile


@dataclass(frozen=True)
class Allocated:
    sparsities: dict[str, float]  # entry name -> sparsity
    kind: str
    budget: float  # in the budget's own unit (a sparsity, parameters, MACs, a latency ratio)
    predicted: float  # the predicted total in that unit
    damage: float  # predicted summed damage
    grid_choice: dict[str, float]  # the knapsack's options (grid points, or a relinearised current sparsity)


def parse_budget(budget: Mapping[str, Any] | None, sparsity: float | None) -> tuple[str, float]:
    """``None`` (the run's sparsity) or one of ``{'sparsity': s}``, ``{'params': n}``, ``{'macs': n}``,
    ``{'latency': ratio of dense}``."""
    if budget is None:
        if sparsity is None:
            raise ConfigError("allocation 'sensitivity' needs a sparsity, or allocation_options.budget")
        return "sparsity", float(sparsity)
    if not isinstance(budget, Mapping) or len(budget) != 1:
        raise ConfigError(
            f"allocation_options.budget must be one of {{kind: value}} with kind in {BUDGETS}, got {budget!r}"
        )
    ((kind, value),) = budget.items()
    if kind not in BUDGETS:
        raise ConfigError(f"allocation_options.budget kind must be one of {', '.join(BUDGETS)}, got {kind!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"allocation_options.budget[{kind!r}] must be a positive number, got {value!r}")
    if kind == "sparsity" and not 0 < value < 1:
        raise ConfigError(f"allocation_options.budget['sparsity'] must be in (0, 1), got {value!r}")
    return kind, float(value)


def _total(profile: SensitivityProfile, kind: str, entries: Sequence[Entry]) -> float:
    return (
        math.fsum(e.numel for e in entries)
        if kind == "sparsity"
        else (1.0 if kind == "latency" else float(profile.dense[kind]))
    )


def _to_knapsack(profile: SensitivityProfile, kind: str, value: float, entries: Sequence[Entry]) -> float:
    if kind == "sparsity":
        return (1.0 - value) * _total(profile, kind, entries)
    return value - _total(profile, kind, entries)


def _from_knapsack(profile: SensitivityProfile, kind: str, cost: float, entries: Sequence[Entry]) -> float:
    if kind == "sparsity":
        return 1.0 - cost / _total(profile, kind, entries)
    return cost + _total(profile, kind, entries)


def solve_budget(
    profile: SensitivityProfile, kind: str, value: float, entries: Sequence[Entry] | None = None
) -> Allocated:
    """The least-damage sparsity per entry (all the profile's by default) within the budget."""
    entries = list(entries if entries is not None else profile.entries)
    table = profile.options(kind, entries)
    return solve_options(profile, kind, value, entries, table, "of the profile's options")


def solve_options(
    profile: SensitivityProfile,
    kind: str,
    value: float,
    entries: Sequence[Entry],
    table: list[list[tuple[float, Option]]],
    where: str,
    offset: float = 0.0,
) -> Allocated:
    """The exact knapsack over ``table`` (per entry, (sparsity, Option) with costs in knapsack units
    relative to ``offset``), then the remainder handed back; ``predicted`` in the budget's unit. An
    unreachable budget is refused with the range ``table`` reaches, ``where`` saying whose options."""
    capacity = _to_knapsack(profile, kind, value, entries) - offset
    try:
        solution = solve([[o for _, o in opts] for opts in table], capacity, kind)
    except BudgetError as e:  # say the range in the budget's own unit
        ends = [offset + math.fsum(f(o.cost for _, o in opts) for opts in table) for f in (min, max)]
        lo, hi = sorted(_from_knapsack(profile, kind, c, entries) for c in ends)
        raise BudgetError(
            f"no combination {where} meets the {kind} budget {value:.6g}: reachable {kind} is {lo:.6g} to {hi:.6g} "
            f"(grid up to {max(profile.grid):g}); change the budget or analyse a wider grid"
        ) from e
    chosen = {e.name: table[k][j][0] for k, (e, j) in enumerate(zip(entries, solution.choices))}
    sparsities, cost, damage = _hand_back(table, entries, solution.choices, capacity - solution.cost)
    predicted = _from_knapsack(profile, kind, offset + solution.cost + cost, entries)
    return Allocated(sparsities, kind, value, predicted, solution.damage + damage, chosen)


def _hand_back(
    table: list[list[tuple[float, Option]]], entries: Sequence[Entry], choices: Sequence[int], slack: float
) -> tuple[dict[str, float], float, float]:
    """Spend the unspent budget moving chosen targets down their measured curves toward dense, one grid
    segment at a time (linearly inside a segment), the segment that lowers damage most per unit of cost
    first. Returns the sparsities, the cost added and the damage change."""
    position = list(choices)
    sparsities = {e.name: table[k][j][0] for k, (e, j) in enumerate(zip(entries, choices))}
    added = changed = 0.0

    def segment(k: int) -> tuple[float, float, float] | None:
        j = position[k]
        if j == 0:
            return None
        (_, low), (_, high) = table[k][j - 1], table[k][j]
        extra, saved = low.cost - high.cost, high.damage - low.damage
        if saved < 0:
            return None  # going back would do more damage: the knapsack's choice stands
        return (saved / extra if extra > 0 else math.inf), extra, saved

    heap = [(-seg[0], k) for k in range(len(entries)) if (seg := segment(k)) is not None]
    heapq.heapify(heap)
    while heap and slack > 0:
        _, k = heapq.heappop(heap)
        _, extra, saved = segment(k)  # type: ignore[misc]
        j = position[k]
        s_low, s_high = table[k][j - 1][0], table[k][j][0]
        fraction = 1.0 if extra <= 0 else min(1.0, slack / extra)
        sparsities[entries[k].name] = s_high - fraction * (s_high - s_low)
        slack -= fraction * extra
        added += fraction * extra
        changed -= fraction * saved
        if fraction == 1.0:
            position[k] = j - 1
            nxt = segment(k)
            if nxt is not None:
                heapq.heappush(heap, (-nxt[0], k))
    return sparsities, added, changed
