"""Allocation and selection of units: exact counts, bounds, rounding, determinism."""

from __future__ import annotations

import pytest
import torch
from structural_nets import resnet_like
from torch import nn

import secateurs
from secateurs import ConfigError
from secateurs.allocation import Global, Uniform
from secateurs.granularity import StructuralOptions
from secateurs.structural import DependencyGraph, plan_of
from secateurs.structural.allocate import prune_counts, select

X = torch.randn(1, 3, 8, 8)


def _groups(width=16):
    model = resnet_like(width).eval()
    graph = DependencyGraph(model, X)
    return model, [g for g in graph.groups if g.units]


def test_uniform_allocation_removes_round_sparsity_times_units_from_every_group():
    _, groups = _groups()
    scores = {g.name: torch.arange(g.units, dtype=torch.float64) for g in groups}
    counts = prune_counts(groups, scores, Uniform(), 0.3, StructuralOptions())
    assert counts == {g.name: round(0.3 * g.units) for g in groups}
    removed = select(groups, scores, counts)
    assert all(removed[g.name].tolist() == list(range(counts[g.name])) for g in groups)  # lowest scores go


def test_global_ranking_takes_the_lowest_units_across_groups_but_never_the_protected_ones():
    _, groups = _groups()
    low, high = groups[0].name, groups[1].name
    scores = {g.name: torch.full((g.units,), 5.0, dtype=torch.float64) for g in groups}
    scores[low] = torch.linspace(0, 0.1, groups[0].units, dtype=torch.float64)  # everything here is least important
    counts = prune_counts(groups, scores, Global(), 0.8, StructuralOptions(keep_at_least=2))
    assert counts[low] == groups[0].units - 2  # the global ranking wants all of it; two must stay
    assert counts[high] > 0  # so the budget is taken further up the ranking
    assert all(counts[g.name] <= g.units - 2 for g in groups)


def test_ties_break_by_index_so_selection_is_deterministic():
    _, groups = _groups()
    scores = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    counts = prune_counts(groups, scores, Uniform(), 0.5, StructuralOptions())
    assert all(select(groups, scores, counts)[g.name].tolist() == list(range(g.units // 2)) for g in groups)


def test_the_same_seed_gives_the_same_plan():
    plans = []
    for _ in range(2):
        model = resnet_like(16).eval()
        secateurs.prune(model, "random", 0.4, mode="remove", example_inputs=X, seed=3, progress=False,
                        structural={"latency": False})  # fmt: skip
        plans.append(plan_of(model).to_dict())
    assert plans[0] == plans[1]


def test_explicit_allocation_uses_group_names():
    model, groups = _groups()
    name = groups[1].name
    report = secateurs.prune(model, "magnitude", allocation={name: 0.5}, mode="remove", example_inputs=X,
                             progress=False, structural={"latency": False})  # fmt: skip
    changed = {g.name: (g.units_before, g.units_after) for g in report.groups if g.units_after != g.units_before}
    assert changed == {name: (16, 8)}


def test_an_explicit_allocation_key_that_names_no_group_is_refused_with_the_group_names():
    """Removal cannot be undone: a misspelt key, or a consumer's name, must not leave a group unprotected."""
    model, groups = _groups()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=rf"'{groups[1].name}x' matches no group.*named by the layer that produces"):
        secateurs.prune(model, "magnitude", 0.5, allocation={f"{groups[1].name}x": 0.0}, mode="remove",
                        example_inputs=X, progress=False, structural={"latency": False})  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_scope_limits_removal_to_included_producers_and_untouched_excluded_modules():
    model = resnet_like(16).eval()
    report = secateurs.prune(model, "magnitude", 0.5, mode="remove", example_inputs=X, progress=False,
                             scope={"include": ["3.*"], "exclude": ["4.*"]}, structural={"latency": False})  # fmt: skip
    changed = [g.name for g in report.groups if g.units_after != g.units_before]
    assert changed == ["3.conv1"]
    assert model[4].conv1.weight.shape == (16, 16, 3, 3)


def test_report_measures_params_macs_and_latency_before_and_after():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(4, 64)
    report = secateurs.prune(model, "magnitude", 0.75, mode="remove", example_inputs=x, progress=False)
    assert report.after.params < report.before.params
    assert report.macs_reduction > 3.0
    assert report.before.latency_s > 0 and report.after.latency_s > 0
    assert "MACs" in report.table() and "latency" in report.table()
    assert report.to_dict()["config"]["mode"] == "remove"
