"""Exact multiple-choice knapsack: one option per layer, least total damage within a budget.

This is the dynamic programme of SPDY (Frantar & Alistarh 2022, arXiv:2201.13096) and OBC's
per-layer database (arXiv:2208.11580), and HALP's latency knapsack (arXiv:2110.10811): each layer
offers a few options (a sparsity or width), each with a cost (weights kept, MACs, measured latency)
and a damage (its measured metric increase), and the layers' damages and costs add up.

It is solved exactly by a Pareto-frontier dynamic programme over the layers: after layer ``k`` the
frontier holds every reachable ``(total cost, total damage)`` that no other reachable pair beats on
both (dominated partial solutions can never become optimal, because what follows adds the same
costs and damages to both). Unlike a DP over a discretised cost axis it is exact for any real
costs (measured latencies included), and the frontier stays small in practice (it is at most the
number of distinct reachable costs). Partial solutions that cannot fit the budget whatever the
remaining layers pick are dropped at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError


class BudgetError(ConfigError):
    """No combination of the options meets the budget; the message says the reachable range."""


@dataclass(frozen=True)
class Option:
    """One choice for one layer: what it costs and how much damage it does."""

    cost: float
    damage: float


@dataclass(frozen=True)
class Solution:
    choices: tuple[int, ...]  # the option picked per layer
    cost: float
    damage: float


#: the frontier is refused beyond this many partial solutions rather than exhausting memory
MAX_FRONTIER = 2_000_000


def reachable(options: Sequence[Sequence[Option]]) -> tuple[float, float]:
    """The least and the greatest total cost any combination reaches."""
    return (
        math.fsum(min(o.cost for o in opts) for opts in options),
        math.fsum(max(o.cost for o in opts) for opts in options),
    )


def check_options(options: Sequence[Sequence[Option]]) -> None:
    if not options:
        raise ConfigError("the knapsack needs at least one layer with options")
    for i, opts in enumerate(options):
        if not opts:
            raise ConfigError(f"layer {i} offers no option")
        for o in opts:
            if not (math.isfinite(o.cost) and math.isfinite(o.damage)):
                raise ConfigError(f"layer {i} has an option with a non-finite cost or damage: {o}")


def solve(options: Sequence[Sequence[Option]], budget: float, what: str = "cost") -> Solution:
    """The options (one per layer) of least total damage whose total cost is at most ``budget``.

    Ties in damage go to the lower cost, then to the lexicographically first choices (deterministic).
    Raises :class:`BudgetError` with the reachable range when no combination fits."""
    check_options(options)
    low, high = reachable(options)
    tolerance = 1e-9 * max(abs(budget), 1.0)  # float sums of measured costs
    if low > budget + tolerance:
        raise BudgetError(
            f"no combination meets the {what} budget {budget:.6g}: the options reach {low:.6g} at the least "
            f"and {high:.6g} at the most; raise the budget or add options (a higher sparsity) to the grid"
        )
    # the least cost the layers after k can add, so partial solutions that cannot fit are dropped early
    tail = [0.0] * (len(options) + 1)
    for k in range(len(options) - 1, -1, -1):
        tail[k] = tail[k + 1] + min(o.cost for o in options[k])
    frontier: list[tuple[float, float, int]] = [(0.0, 0.0, -1)]  # (cost, damage, back index)
    history: list[list[tuple[int, int]]] = []  # per layer: (parent index, option) of each frontier entry
    for k, opts in enumerate(options):
        limit = budget + tolerance - tail[k + 1]
        merged = [
            (cost + o.cost, damage + o.damage, parent, j)
            for parent, (cost, damage, _) in enumerate(frontier)
            for j, o in enumerate(opts)
            if cost + o.cost <= limit
        ]
        merged.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
        kept: list[tuple[float, float, int, int]] = []
        for entry in merged:
            if not kept or entry[1] < kept[-1][1]:
                kept.append(entry)  # strictly less damage than every cheaper entry: on the frontier
        if len(kept) > MAX_FRONTIER:
            raise ConfigError(f"the knapsack frontier grew past {MAX_FRONTIER} entries; use a coarser grid")
        frontier = [(c, d, i) for i, (c, d, _, _) in enumerate(kept)]
        history.append([(p, j) for _, _, p, j in kept])
    best = min(range(len(frontier)), key=lambda i: (frontier[i][1], frontier[i][0], i))
    cost, damage, _ = frontier[best]
    choices: list[int] = []
    index = best
    for k in range(len(options) - 1, -1, -1):
        parent, j = history[k][index]
        choices.append(j)
        index = parent
    return Solution(tuple(reversed(choices)), cost, damage)


def brute_force(options: Sequence[Sequence[Option]], budget: float) -> Solution | None:
    """Every combination, for checking :func:`solve` on small cases (exponential: tests only)."""
    import itertools

    best: Solution | None = None
    for combo in itertools.product(*(range(len(o)) for o in options)):
        cost = math.fsum(options[k][j].cost for k, j in enumerate(combo))
        damage = math.fsum(options[k][j].damage for k, j in enumerate(combo))
        if cost <= budget + 1e-9 * max(abs(budget), 1.0) and (best is None or damage < best.damage - 1e-12):
            best = Solution(combo, cost, damage)
    return best
