"""Costs that compose: re-measure each target's cost about the current allocation (HALP-style).

A profile's costs are measured with one target pruned and every other one dense, and the knapsack
adds them up. Under channel removal they do not add: a convolution's cost is bilinear in its input
and output widths (and latency has fixed overheads), so cutting two neighbouring groups saves less
than the sum of their single savings. HALP (Shen et al., arXiv:2110.10811) prices a channel with its
neighbours at their *current* widths; :func:`relinearize` does the same for a whole allocation ``A``:
it measures ``cost(A with g -> s)`` for every target ``g`` at dense and at every grid sparsity
``s``, all other targets held at ``A``, and :func:`solve_expansion` solves the knapsack over the
first-order expansion about ``A``::

    cost(A') ~= cost(A) + sum_g [cost(A with g -> s'_g) - cost(A)]

It is exact at ``A`` and for any single change from ``A``, so its error shrinks as the allocation
stops moving between rounds; the knapsack stays exact (only its cost table changes). The damages
are the profile's, unchanged (measured one target at a time, as before).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .budget import Allocated, _to_knapsack, solve_options
from .knapsack import Option
from .profile import Entry, SensitivityProfile


@dataclass(frozen=True)
class Expansion:
    """The measured costs about one allocation, in the budget's own unit (as ``measure`` returns them)."""

    kind: str
    at: dict[str, float]  # the allocation A: entry name -> sparsity (0 for dense)
    total: float  # measured total at A
    costs: dict[str, dict[float, float]]  # entry -> sparsity -> measured total with only that entry changed
    measurements: int  # how many measure() calls building it took


def _checked_total(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"relinearize: measure() returned {value!r} for {where}; it must return the pruned model's total as a "
            "finite positive number"
        )
    return float(value)


def relinearize(
    profile: SensitivityProfile,
    kind: str,
    at: Mapping[str, float],
    measure: Callable[[dict[str, float]], float],
    total: float | None = None,
    entries: Sequence[Entry] | None = None,
) -> Expansion:
    """Measure every entry's cost at dense and at each grid sparsity with all other entries at ``at``.

    This costs one ``measure`` call per entry and per option that differs from its current sparsity:
    ``#entries x (#grid + 1)`` at most (one fewer per entry whose sparsity in ``at`` is 0 or a grid
    point), plus one for the total at ``at`` unless ``total`` (already measured there) is given.
    ``measure(sparsities)`` gets a full per-entry dict and returns the pruned model's total in the
    budget's unit (parameters, MACs or latency / dense).

    Every cost change is taken against the one total at ``at``: with a noisy ``measure`` (latency),
    that total's error enters the prediction once per entry the next solve changes, so measure it
    well (pass a ``total`` averaged over repeats) or expect the prediction to be off by that much.
    Entries left out of ``entries`` are measured dense; a sparsity in ``at`` beyond the grid's last
    point takes that point's damage."""
    if kind not in ("params", "macs", "latency"):
        raise ConfigError(
            f"relinearize: kind must be one of params, macs, latency, got {kind!r} (a sparsity budget's costs, "
            "weights kept per entry, already add up)"
        )
    entries = list(entries if entries is not None else profile.entries)
    names = {e.name for e in entries}
    unknown = sorted(set(at) - names)
    if unknown:
        raise ConfigError(
            f"relinearize: the allocation names {unknown[0]!r}, which is not among the entries relinearised (the "
            "profile's, or those passed as entries=)"
        )
    if kind != "latency" and kind not in profile.dense:
        raise ConfigError(f"relinearize: the profile has no dense {kind} total; analyse with costs including {kind!r}")
    for name, s in at.items():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError(f"relinearize: the sparsity of {name!r} must be in [0, 1), got {s!r}")
    current = {e.name: float(at.get(e.name, 0.0)) for e in entries}
    count = 0
    if total is None:
        total = _checked_total(measure(dict(current)), "the current allocation")
        count += 1
    else:
        total = _checked_total(total, "the current allocation (given)")
    costs: dict[str, dict[float, float]] = {}
    for e in entries:
        costs[e.name] = {}
        for s in (0.0, *profile.grid):
            if math.isclose(s, current[e.name], abs_tol=1e-9):
                costs[e.name][s] = total  # no change from A: exactly the total at A
                continue
            costs[e.name][s] = _checked_total(measure({**current, e.name: s}), f"{e.name!r} at {s:g} about A")
            count += 1
    return Expansion(kind, current, total, costs, count)


def _interpolate(points: Sequence[tuple[float, float]], s: float) -> float:
    """The damage at ``s`` on a (sparsity, damage) curve, linear between its points (as the hand-back)."""
    for (s0, d0), (s1, d1) in itertools.pairwise(points):
        if s0 <= s <= s1:
            return d0 + (d1 - d0) * (s - s0) / (s1 - s0) if s1 > s0 else d1
    return points[-1][1]


def expansion_options(
    profile: SensitivityProfile, expansion: Expansion, entries: Sequence[Entry] | None = None
) -> list[list[tuple[float, Option]]]:
    """The knapsack's options about ``A``: per entry, (sparsity, Option(cost change from A in knapsack
    units, the profile's damage)) for dense, each grid point, and the current sparsity where it is off
    the grid (cost change 0, damage interpolated)."""
    entries = list(entries if entries is not None else profile.entries)
    missing = [e.name for e in entries if e.name not in expansion.costs]
    if missing:
        raise ConfigError(f"the expansion has no costs for the entry {missing[0]!r}; relinearize over the same entries")
    kind = expansion.kind
    base = _to_knapsack(profile, kind, expansion.total, entries)
    out = []
    for e, damages in zip(entries, profile.options("sparsity", entries)):
        curve = [(s, o.damage) for s, o in damages]
        opts = [(s, Option(_to_knapsack(profile, kind, v, entries) - base, _interpolate(curve, s)))
                for s, v in expansion.costs[e.name].items()]  # fmt: skip
        s_now = expansion.at[e.name]
        if not any(math.isclose(s, s_now, abs_tol=1e-9) for s, _ in opts):
            opts.append((s_now, Option(0.0, _interpolate(curve, s_now))))
        out.append(sorted(opts, key=lambda pair: pair[0]))
    return out


def solve_expansion(
    profile: SensitivityProfile, expansion: Expansion, value: float, entries: Sequence[Entry] | None = None
) -> Allocated:
    """The least-damage sparsity per entry whose *expanded* total (about ``expansion.at``) meets ``value``;
    its ``predicted`` is that expanded total (exact at A and for single changes from it)."""
    entries = list(entries if entries is not None else profile.entries)
    table = expansion_options(profile, expansion, entries)
    base = _to_knapsack(profile, expansion.kind, expansion.total, entries)
    return solve_options(profile, expansion.kind, value, entries, table, "about the current allocation", base)
