"""prune_llm on every architecture family: exact sparsity, valid N:M, rollback, OWL."""

from __future__ import annotations

import pytest
import torch

from secateurs import ConfigError, DataRequiredError, PatternError
from secateurs.llm import prune_llm
from secateurs.patterns import NM

from .conftest import assert_same_bits, state_bits, tiny

METHODS = ("magnitude", "sparsegpt", "wanda")  # the layerwise methods of the papers


def _targets(report):
    return report.layers


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_meets_the_sparsity_exactly_on_every_layer(any_model, method, segments):
    _, model = any_model
    report = prune_llm(model, method, 0.5, calibration=segments, progress=False)
    assert len(_targets(report)) >= 8  # every Linear/Conv1D of both blocks
    for layer in _targets(report):
        assert layer.nonzeros == layer.params - round(0.5 * layer.params), layer.name
    with torch.no_grad():
        assert torch.isfinite(model(segments[:2]).logits).all()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_each_method_gives_valid_n_m(any_model, method, pattern, segments):
    _, model = any_model
    report = prune_llm(model, method, pattern=pattern, calibration=segments, progress=False)
    nm = NM(*map(int, pattern.split(":")))
    for layer in _targets(report):
        assert layer.pattern_valid, layer.name
        assert layer.sparsity == pytest.approx(1 - nm.density)


def test_only_layers_inside_the_blocks_are_pruned(llama, segments):
    embed = llama.model.embed_tokens.weight.clone()
    prune_llm(llama, "wanda", 0.5, calibration=segments, progress=False)
    assert torch.equal(llama.model.embed_tokens.weight, embed)
    assert (llama.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5


def test_scope_selects_layers_inside_the_blocks(llama, segments):
    report = prune_llm(llama, "wanda", 0.5, calibration=segments, scope=["*.mlp.*"], progress=False)
    assert {layer.name.split(".")[-2] for layer in _targets(report)} == {"gate_proj", "up_proj", "down_proj"}
    assert (llama.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_sparsegpt_changes_surviving_weights_but_wanda_does_not(segments):
    dense = tiny("llama")
    for method, expect_changed in (("wanda", False), ("sparsegpt", True)):
        model = tiny("llama")
        prune_llm(model, method, 0.5, calibration=segments, progress=False)
        w, w0 = model.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight
        kept = w != 0
        assert (not torch.equal(w[kept], w0[kept])) == expect_changed, method


def test_same_seed_same_result_and_pruned_blocks_feed_the_next(segments):
    a, b = tiny("llama"), tiny("llama")
    prune_llm(a, "sparsegpt", 0.5, calibration=segments, progress=False)
    prune_llm(b, "sparsegpt", 0.5, calibration=segments, progress=False)
    assert_same_bits(state_bits(a), state_bits(b))


def test_a_failure_midway_leaves_the_model_bit_identical(llama, segments, monkeypatch):
    before = state_bits(llama)
    from secateurs.runners import blocks as runner

    calls = {"n": 0}
    original = runner.propagate

    def failing(block, index, inputs):
        calls["n"] += 1
        original(block, index, inputs)
        raise RuntimeError("simulated failure after block 0 was pruned")

    monkeypatch.setattr(runner, "propagate", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        prune_llm(llama, "sparsegpt", 0.5, calibration=segments, progress=False)
    assert calls["n"] == 1
    assert_same_bits(state_bits(llama), before)


def test_refusals_happen_before_any_weight_changes(llama, segments):
    before = state_bits(llama)
    with pytest.raises(PatternError, match="divisible by 24"):
        prune_llm(llama, "wanda", pattern="4:24", calibration=segments, progress=False)
    with pytest.raises(ConfigError, match="needs calibration"):
        prune_llm(llama, "sparsegpt", 0.5, progress=False)
    with pytest.raises(ConfigError, match="unknown keyword"):
        prune_llm(llama, "wanda", 0.5, calibration=segments, nsample=4)
    assert_same_bits(state_bits(llama), before)


def test_magnitude_needs_no_calibration(llama):
    report = prune_llm(llama, "magnitude", 0.7, progress=False)
    assert report.sparsity == pytest.approx(0.7, abs=1e-4)
    assert report.details.calibration == {}


def test_owl_prunes_the_block_with_more_outliers_less(segments):
    model = tiny("llama", seed=3)
    with torch.no_grad():  # a handful of huge weights: outliers, as in real LLMs
        model.model.layers[1].mlp.down_proj.weight[:4, :4] *= 30
    report = prune_llm(
        model,
        "wanda",
        0.5,
        allocation="owl",
        allocation_options={"lam": 0.1, "m": 3},
        calibration=segments,
        progress=False,
    )
    ratio0, ratio1 = report.outlier_ratios
    assert ratio1 > ratio0
    assert report.block_sparsities == pytest.approx([0.6, 0.4])  # 0.5 -+ lambda, mean 0.5
    for block, sparsity in zip(model.model.layers, report.block_sparsities):
        weight = block.self_attn.q_proj.weight  # Wanda compares within rows: exact per row
        assert ((weight != 0).sum(1) == weight.shape[1] - round(sparsity * weight.shape[1])).all()


def test_owl_needs_calibration_even_for_magnitude(llama):
    with pytest.raises(ConfigError, match="allocation 'owl' needs calibration"):
        prune_llm(llama, "magnitude", 0.5, allocation="owl", progress=False)


def test_data_from_a_model_without_blocks_is_refused(segments):
    model = torch.nn.Sequential(torch.nn.Embedding(96, 8), torch.nn.Linear(8, 96))
    with pytest.raises(ConfigError, match="blocks="):
        prune_llm(model, "wanda", 0.5, calibration=segments, progress=False)


def test_text_calibration_without_a_tokenizer_is_refused(llama, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("some text\n" * 50)
    with pytest.raises((ConfigError, DataRequiredError), match="tokenizer"):
        prune_llm(llama, "wanda", 0.5, calibration=str(path), progress=False)
