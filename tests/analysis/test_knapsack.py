"""The exact knapsack behind allocation='sensitivity': optimal (checked by brute force) and within budget."""

from __future__ import annotations

import random

import pytest

from secateurs.analysis.budget import solve_budget
from secateurs.analysis.knapsack import BudgetError, Option, brute_force, solve
from secateurs.analysis.profile import Cell, Entry, SensitivityProfile


def _random_case(rng: random.Random, integer: bool):
    layers = rng.randint(1, 5)
    options = []
    for _ in range(layers):
        count = rng.randint(1, 4)
        cost = (lambda: rng.randint(0, 9)) if integer else (lambda: rng.uniform(0, 9))
        options.append([Option(cost(), rng.random()) for _ in range(count)])
    return options, rng.uniform(0, 20)


@pytest.mark.parametrize("integer", [True, False])
def test_the_dynamic_programme_finds_the_brute_force_optimum_within_budget(integer):
    rng = random.Random(7 if integer else 8)
    solved = 0
    for _ in range(400):
        options, budget = _random_case(rng, integer)
        best = brute_force(options, budget)
        if best is None:
            with pytest.raises(BudgetError):
                solve(options, budget)
            continue
        found = solve(options, budget)
        assert found.cost <= budget + 1e-9
        assert found.damage == pytest.approx(best.damage, abs=1e-12)
        assert sum(options[k][j].cost for k, j in enumerate(found.choices)) == pytest.approx(found.cost)
        solved += 1
    assert solved > 200  # the cases were mostly feasible: the check compared real optima


def test_a_budget_below_every_combination_is_refused_with_the_reachable_range():
    options = [[Option(4, 0.0), Option(2, 1.0)], [Option(3, 0.0), Option(1, 5.0)]]
    with pytest.raises(BudgetError, match=r"reach 3 at the least and 7 at the most"):
        solve(options, 2.5)


def _profile(costs=None) -> SensitivityProfile:
    entries = [Entry("a", "layer", {"a.weight": [10, 10]}, 100), Entry("b", "layer", {"b.weight": [10, 30]}, 300)]
    damage = {"a": {0.5: 0.1, 0.9: 2.0}, "b": {0.5: 0.05, 0.9: 0.3}}
    cells = [
        Cell(e, s, 1.0 + d, params=1000 - int(s * {"a": 100, "b": 300}[e]))
        for e, row in damage.items()
        for s, d in row.items()
    ]
    return SensitivityProfile("Net", "loss", False, 1.0, [0.5, 0.9], entries, cells, {"params": 1000})


def test_a_sparsity_budget_is_met_exactly_by_handing_back_the_remainder_along_the_curves():
    profile = _profile()
    allocated = solve_budget(profile, "sparsity", 0.6)
    pruned = sum(allocated.sparsities[e.name] * e.numel for e in profile.entries)
    assert pruned == pytest.approx(0.6 * 400)
    assert allocated.predicted == pytest.approx(0.6)
    assert allocated.sparsities["b"] > allocated.sparsities["a"]  # b is the robust one


def test_a_params_budget_is_never_exceeded_and_an_unreachable_one_names_the_range():
    profile = _profile()
    allocated = solve_budget(profile, "params", 800)
    assert allocated.predicted <= 800 + 1e-9
    with pytest.raises(BudgetError, match=r"reachable params is 640 to 1000"):
        solve_budget(profile, "params", 500)


def test_fit_budget_corrects_the_budget_by_what_was_measured():
    from secateurs.analysis import fit_budget

    profile = _profile()
    # the real model keeps 5% more parameters than the additive profile predicts (shared weights)
    real = {}

    def measure(sparsities):
        kept = 1000 - sum(sparsities[e.name] * e.numel for e in profile.entries)
        real["last"] = kept * 1.05
        return real["last"]

    _, history = fit_budget(profile, {"params": 800}, measure, rounds=4, tolerance=0.005)
    assert abs(history[-1]["achieved"] - 800) <= 0.005 * 800 < abs(history[0]["achieved"] - 800)
    assert history[1]["asked"] < history[0]["asked"]


def test_fit_budget_returns_the_measured_round_closest_to_the_budget_when_rounds_run_out():
    from secateurs.analysis import fit_budget

    profile = _profile()
    seen = []

    def measure(sparsities):  # a cost that no correction brings within tolerance: rounds run out
        kept = 1000 - sum(sparsities[e.name] * e.numel for e in profile.entries)
        seen.append((dict(sparsities), kept * 1.05 + 10 * len(seen)))
        return seen[-1][1]

    chosen, history = fit_budget(profile, {"params": 800}, measure, rounds=3, tolerance=1e-5)
    assert len(history) == len(seen) == 3
    best = min(range(3), key=lambda i: abs(seen[i][1] - 800))
    assert chosen == seen[best][0]  # a solution that was measured, never the next unmeasured correction
    assert [bool(h.get("chosen")) for h in history] == [i == best for i in range(3)]


@pytest.mark.parametrize(
    ("kwargs", "returns", "message"),
    [({"rounds": 0}, 800.0, "rounds"), ({"tolerance": -1.0}, 800.0, "tolerance"),
     ({}, float("nan"), "round 0"), ({}, 0.0, "round 0")],
)  # fmt: skip
def test_fit_budget_refuses_bad_rounds_tolerance_and_measurements(kwargs, returns, message):
    from secateurs.analysis import fit_budget
    from secateurs.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        fit_budget(_profile(), {"params": 800}, lambda s: returns, **kwargs)
