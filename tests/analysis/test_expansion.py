"""Costs that compose: the knapsack over the first-order expansion about the current allocation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secateurs
from secateurs.analysis import fit_budget, relinearize, sensitivity, solve_expansion
from secateurs.analysis.expansion import expansion_options
from secateurs.analysis.knapsack import brute_force
from secateurs.analysis.profile import Cell, Entry, SensitivityProfile
from secateurs.errors import ConfigError
from secateurs.evaluation import count_macs


def _bilinear(sparsities: dict[str, float]) -> float:
    """Two neighbouring groups: a fixed 100 plus a layer bilinear in both widths (400 when dense)."""
    return 100.0 + 400.0 * (1 - sparsities.get("a", 0.0)) * (1 - sparsities.get("b", 0.0))


def _two_groups() -> SensitivityProfile:
    entries = [Entry("a", "group", {"a": [8]}, 8), Entry("b", "group", {"b": [8]}, 8)]
    damage = {"a": 1.0, "b": 0.25}
    cells = [Cell(n, 0.5, 1.0 + d, macs=int(_bilinear({n: 0.5}))) for n, d in damage.items()]
    return SensitivityProfile("Net", "loss", False, 1.0, [0.5], entries, cells, {"macs": 500})


def test_the_expansion_of_a_two_group_case_matches_the_hand_computed_one_and_the_brute_force_optimum():
    profile = _two_groups()
    calls = []

    def measure(s):
        calls.append(dict(s))
        return _bilinear(s)

    expansion = relinearize(profile, "macs", {"a": 0.5}, measure)
    # about A = (a 0.5, b dense): the total there, then each group's other option with the other at A
    assert expansion.total == 300.0
    assert expansion.costs == {"a": {0.0: 500.0, 0.5: 300.0}, "b": {0.0: 300.0, 0.5: 200.0}}
    assert expansion.measurements == len(calls) == 3  # A itself, a dense, b at 0.5 (no change is not measured)
    table = expansion_options(profile, expansion)
    assert [[(s, o.cost, o.damage) for s, o in opts] for opts in table] == [
        [(0.0, 200.0, 0.0), (0.5, 0.0, 1.0)],
        [(0.0, 0.0, 0.0), (0.5, -100.0, 0.25)],
    ]
    # cost(A') = cost(A) + sum of single changes: exact at A and for one change (dense context said 100 for both)
    for budget, want in ((250.0, {"a": 0.5, "b": 0.5}), (450.0, {"a": 0.0, "b": 0.5})):
        allocated = solve_expansion(profile, expansion, budget)
        best = brute_force([[o for _, o in opts] for opts in table], budget - 300.0)
        assert allocated.grid_choice == want == {n: table[k][j][0] for k, (n, j) in enumerate(zip("ab", best.choices))}
        assert allocated.predicted <= budget + 1e-9
    both = solve_expansion(profile, expansion, 200.0)  # no slack to hand back: the grid choice itself
    assert both.predicted == pytest.approx(300.0 + 0.0 - 100.0) == _bilinear({"a": 0.5, "b": 0.5})


def test_an_off_grid_current_sparsity_is_an_option_of_no_cost_change_with_interpolated_damage():
    profile = _two_groups()
    expansion = relinearize(profile, "macs", {"a": 0.25, "b": 0.5}, _bilinear)
    a, b = expansion_options(profile, expansion)
    assert [s for s, _ in a] == [0.0, 0.25, 0.5] and a[1][1].cost == 0.0
    assert a[1][1].damage == pytest.approx(0.5)  # half way to 0.5's damage of 1.0
    assert [s for s, _ in b] == [0.0, 0.5] and b[1][1].cost == 0.0
    assert expansion.measurements == 1 + 2 + 1  # A; a at 0 and 0.5; b at 0


@pytest.mark.parametrize(
    ("args", "message"),
    [(("sparsity", {}), "kind must be one of params"), (("macs", {"c": 0.5}), "'c'"),
     (("macs", {"a": 1.0}), r"'a' must be in \[0, 1\)"), (("macs", {"a": True}), "'a'")],
)  # fmt: skip
def test_relinearize_refuses_a_bad_kind_or_allocation(args, message):
    with pytest.raises(ConfigError, match=message):
        relinearize(_two_groups(), *args, _bilinear)


def test_relinearize_refuses_a_bad_measurement_naming_the_entry():
    with pytest.raises(ConfigError, match=r"'b' at 0.5 about A"):
        relinearize(_two_groups(), "macs", {}, lambda s: float("nan") if s.get("b") else 500.0)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_fit_budget_refuses_a_bad_relinearize(value):
    with pytest.raises(ConfigError, match="relinearize"):
        fit_budget(_two_groups(), {"macs": 300}, _bilinear, relinearize=value)


def test_fit_budget_refuses_relinearising_a_sparsity_budget_and_a_profile_without_the_dense_total():
    with pytest.raises(ConfigError, match="a sparsity budget adds up"):
        fit_budget(_two_groups(), {"sparsity": 0.5}, _bilinear, relinearize=1)
    with pytest.raises(ConfigError, match="no dense params total"):
        relinearize(_two_groups(), "params", {}, _bilinear)


def test_a_relinearised_round_past_the_reachable_range_stops_with_its_measured_rounds_and_says_so():
    # the dense-context sum says 150 is reachable (500 - 200 - 200); the expansion about that first solve
    # knows it is not (both at 0.5 measure 200), so the measured first round is what comes back
    sparsities, history = fit_budget(_two_groups(), {"macs": 150}, _bilinear, rounds=3, relinearize=1)
    assert len(history) == 1 and history[0]["chosen"]
    assert "relinearised costs (after 3 measurements)" in history[0]["stopped"]
    assert _bilinear(sparsities) == history[0]["achieved"] > 150


# -- a tiny CNN whose MACs are bilinear in neighbouring widths ----------------------------------------
@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    profile = sensitivity(model, batches, targets="groups", sparsities=(0.25, 0.5, 0.75), costs=("macs",),
                          progress=False)  # fmt: skip
    example = batches[0][0][:1]  # the profile's MACs are per example

    def measure(sparsities: dict[str, float]) -> float:
        pruned = copy.deepcopy(model)
        allocation = {name: s for name, s in sparsities.items() if s > 0}
        if allocation:
            secateurs.prune(pruned, "magnitude", mode="remove", allocation=allocation, example_inputs=example,
                            structural={"latency": False}, progress=False)  # fmt: skip
        return float(count_macs(pruned, example).total)

    return profile, measure


def test_the_relinearised_fit_predicts_what_it_measures_and_meets_a_budget_the_plain_fit_misses(chain):
    profile, measure = chain
    dense = profile.dense["macs"]
    assert measure({}) == dense
    budget = {"macs": 0.35 * dense}
    _, plain = fit_budget(profile, budget, measure, rounds=2, tolerance=0.03)
    chosen, relin = fit_budget(profile, budget, measure, rounds=2, tolerance=0.03, relinearize=1)
    # the dense-context sum is far off (cutting neighbours saves less than the single cuts added up) ...
    first = relin[0]
    assert first["solved"] == "profile" and abs(first["predicted"] - first["achieved"]) > 0.15 * first["achieved"]
    # ... the expansion about the first allocation is close: the fit lands where the plain one does not
    last = relin[-1]
    assert last["solved"] == "relinearized" and last.get("chosen")
    assert abs(last["predicted"] - last["achieved"]) < 0.03 * last["achieved"]
    assert 0 < last["measurements"] <= len(profile.entries) * (len(profile.grid) + 1)  # the docstring's bound
    assert abs(last["achieved"] - budget["macs"]) <= 0.03 * budget["macs"]
    assert all(abs(h["achieved"] - budget["macs"]) > 0.03 * budget["macs"] for h in plain)
    assert measure(chosen) == last["achieved"]  # what it returns is what was measured
