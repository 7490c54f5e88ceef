"""Every bad input gets a typed, actionable error, and the model stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_unchanged, fingerprint
from secateurs import (
    ConfigError,
    DataRequiredError,
    NonFiniteError,
    PatternError,
    RecipeError,
    ScopeError,
    prune,
)
from secateurs.recipes import parse_recipe

# fmt: off
CASES = [
    pytest.param(dict(method="magnitude", sparsity=1.0), ConfigError, r"sparsity must be .*\[0, 1\)", id="sparsity=1"),
    pytest.param(dict(method="magnitude", sparsity=-0.1), ConfigError, r"\[0, 1\)", id="sparsity<0"),
    pytest.param(dict(method="magnitude", sparsity=float("nan")), ConfigError, r"\[0, 1\)", id="sparsity=nan"),
    pytest.param(dict(method="magnitude", pattern="4:4"), PatternError, r"0 < N < M", id="N=M"),
    pytest.param(dict(method="magnitude", pattern="6:4"), PatternError, r"0 < N < M", id="N>M"),
    pytest.param(dict(method="magnitude", pattern="2:8", scope={"skip_first": False}), PatternError,
                 r"0\.weight.*divisible by 8.*3", id="input-not-divisible-by-M"),
    pytest.param(dict(method="magnitude", sparsity=0.5, pattern="block:3x3"), PatternError,
                 r"block 3x3 does not tile 3\.weight", id="block-does-not-tile"),
    pytest.param(dict(method="prunomatic", sparsity=0.5), ConfigError, r"unknown method.*'magnitude'", id="method"),
    pytest.param(dict(method="magnitude", sparsity=0.5, pattern="diagonal"), PatternError,
                 r"unknown pattern.*element", id="pattern"),
    pytest.param(dict(method="magnitude", sparsity=0.5, allocation="fair"), ConfigError,
                 r"unknown allocation.*'global'", id="allocation"),
    pytest.param(dict(method="magnitude", sparsity=0.5, scope={"include": ["decoder.*"]}), ScopeError,
                 r"include pattern 'decoder\.\*' matches no module", id="include-matches-nothing"),
    pytest.param(dict(method="magnitude", sparsity=0.5, scope={"exclude": ["3", "8x"]}), ScopeError,
                 r"exclude pattern '8x' matches no module of Sequential; did you mean '8'", id="exclude-typo"),
    pytest.param(dict(method="magnitude", sparsity=0.5, alocation="global"), ConfigError,
                 r"prune\(\) got unknown keyword\(s\) 'alocation' \(did you mean 'allocation'\?\); valid: .*"
                 r"'calibration'", id="keyword-typo"),
    pytest.param(dict(method="magnitude", sparsity=0.5, scope={"types": ["LSTM"]}), ScopeError,
                 r"unknown module type.*LSTM", id="unsupported-type"),
    pytest.param(dict(method="wanda", sparsity=0.5), DataRequiredError, r"wanda.*calibration=", id="wanda-no-data"),
    pytest.param(dict(method="snip", sparsity=0.5), DataRequiredError, r"snip.*calibration", id="snip-no-data"),
    pytest.param(dict(method="taylor", sparsity=0.5, calibration=[torch.randn(4, 3, 6, 6)]), DataRequiredError,
                 r"no targets.*loss_fn", id="gradient-without-labels"),
    pytest.param(dict(method="synflow", sparsity=0.5), DataRequiredError, r"example_inputs", id="synflow-no-shape"),
    pytest.param(dict(method="magnitude", sparsity=0.5, allocation="global", comparison="row"), ConfigError,
                 r"comparison=row", id="global-with-rows"),
    pytest.param(dict(method="apoz", sparsity=0.5, calibration=[torch.randn(2, 3, 6, 6)]), ConfigError,
                 r"output_channel", id="apoz-on-elements"),
    pytest.param(dict(method="magnitude", sparsity=0.5, mode="shred"), ConfigError, r"mode must be one of", id="mode"),
    pytest.param(dict(method="magnitude", sparsity=0.5, schedule={"kind": "cubic", "start": 0, "end": 10}),
                 ConfigError, r"Pruner", id="schedule-in-prune"),
    pytest.param(dict(method="magnitude", sparsity=0.5, method_options={"norm": 3}), ConfigError, r"norm",
                 id="bad-method-option"),
]
# fmt: on


@pytest.mark.parametrize(("kwargs", "error", "message"), CASES)
def test_bad_input_is_refused_and_the_model_is_untouched(cnn, kwargs, error, message):
    before = fingerprint(cnn)
    with pytest.raises(error, match=message):
        prune(cnn, **kwargs)
    assert_unchanged(cnn, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_parameter(cnn, value):
    with torch.no_grad():
        cnn[3].weight[0, 0, 0, 0] = value
    before = fingerprint(cnn)
    with pytest.raises(NonFiniteError, match=r"weight 3\.weight"):
        prune(cnn, "magnitude", 0.5)
    assert_unchanged(cnn, before)


def test_non_finite_scores_are_refused_naming_criterion_and_parameter(cnn, cnn_batches):
    bad = [(torch.full_like(x, float("nan")), y) for x, y in cnn_batches]
    before = fingerprint(cnn)
    with pytest.raises(NonFiniteError, match=r"wanda scores of 3\.weight"):
        prune(cnn, "wanda", 0.5, calibration=bad)
    assert_unchanged(cnn, before)


def test_a_failure_in_a_later_round_restores_the_masks_of_earlier_rounds(cnn, cnn_batches):
    prune(cnn, "magnitude", 0.3)
    before = fingerprint(cnn)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] > len(cnn_batches):  # second round
            raise RuntimeError("loader died")
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    with pytest.raises(RuntimeError, match="loader died"):
        prune(cnn, "taylor", 0.8, calibration=cnn_batches, loss_fn=loss_fn, iterations=3)
    assert_unchanged(cnn, before)


def test_recipe_with_unknown_keys_lists_the_valid_ones():
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['sparsty'\].*'sparsity'"):
        parse_recipe({"method": "magnitude", "sparsty": 0.5})


def test_unknown_scope_keys_are_refused(cnn):
    before = fingerprint(cnn)
    with pytest.raises(ScopeError, match=r"unknown scope key.*'include'"):
        prune(cnn, "magnitude", 0.5, scope={"inclde": ["*"]})
    assert_unchanged(cnn, before)
