"""Allocators split the budget: uniform, global, ERK, LAMP and explicit."""

from __future__ import annotations

import math

import pytest

from secateurs import ConfigError, prune
from secateurs.allocation import erk_sparsities
from secateurs.scope import ScopeSpec, resolve

ALL = {"skip_first": False, "skip_last": False}


def test_uniform_gives_every_layer_the_same_exact_sparsity(cnn):
    report = prune(cnn, "magnitude", 0.7, scope=ALL)
    for layer in report.layers:
        assert layer.params - layer.nonzeros == round(0.7 * layer.params)


def test_global_meets_the_overall_budget_exactly_with_one_threshold(cnn):
    report = prune(cnn, "magnitude", 0.8, allocation="global", scope=ALL)
    assert report.target_params - report.target_nonzeros == round(0.8 * report.target_params)
    kept = [t.weight.detach().abs()[t.weight != 0].min() for t in resolve(cnn, ScopeSpec(**ALL))]
    pruned = [t.parameter.detach().abs()[t.weight == 0].max() for t in resolve(cnn, ScopeSpec(**ALL))]
    assert min(kept) >= max(pruned)


def test_erk_density_follows_sum_over_product_of_dimensions(cnn):
    targets = resolve(cnn, ScopeSpec(**ALL))
    sparsities = erk_sparsities(targets, 0.9)
    kept = sum((1 - sparsities[t.name]) * t.numel for t in targets)
    assert kept == pytest.approx(0.1 * sum(t.numel for t in targets))
    free = [t for t in targets if sparsities[t.name] > 0]
    ratios = [(1 - sparsities[t.name]) / (sum(t.shape) / math.prod(t.shape)) for t in free]
    assert max(ratios) == pytest.approx(min(ratios))


def test_erk_caps_small_layers_at_dense(cnn):
    targets = resolve(cnn, ScopeSpec(**ALL))
    sparsities = erk_sparsities(targets, 0.5)
    assert sparsities["0.weight"] == 0.0  # the 3-channel stem is tiny
    report = prune(cnn, "magnitude", 0.5, allocation="erk", scope=ALL)
    assert report.sparsity == pytest.approx(0.5, abs=2e-3)


def test_lamp_allocation_matches_the_lamp_criterion_under_global_ranking(cnn):
    from conftest import small_cnn

    a, b = small_cnn(), small_cnn()
    prune(a, "magnitude", 0.9, allocation="lamp", scope=ALL)
    prune(b, "lamp", 0.9, scope=ALL)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if name.endswith("mask"):
            assert (x == y).all(), name


def test_lamp_never_empties_a_layer(cnn):
    report = prune(cnn, "lamp", 0.995, scope=ALL)
    assert not report.collapsed_layers


def test_explicit_per_name_globs_with_a_default(cnn):
    report = prune(cnn, "magnitude", 0.2, allocation={"3": 0.9, "[58]": 0.5})
    by_name = {layer.name: layer.sparsity for layer in report.layers}
    assert by_name == pytest.approx({"3.weight": 0.9, "5.weight": 0.5, "8.weight": 0.5}, abs=1e-3)
    report = prune(cnn, "magnitude", allocation={"3": 0.95})
    assert {layer.name: round(layer.sparsity, 2) for layer in report.layers}["3.weight"] == 0.95


def test_explicit_glob_that_names_nothing_is_an_error(cnn):
    with pytest.raises(ConfigError, match=r"allocation key 'decoder' matches no target"):
        prune(cnn, "magnitude", 0.5, allocation={"decoder": 0.5})
