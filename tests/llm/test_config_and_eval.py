"""LLMPruneConfig and recipes (strict, 1:1 with prune_llm), OWL maths, perplexity protocol."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from secateurs import ConfigError, RecipeError, load_recipe
from secateurs.allocation import outlier_ratio, owl_sparsities
from secateurs.llm import LLMPruneConfig, perplexity, prune_llm

from .conftest import assert_same_bits, state_bits, tiny


def test_config_round_trips_through_to_dict():
    config = LLMPruneConfig(method="sparsegpt", pattern="2:4", solver_options={"dampening": 0.05}, scope=["*.mlp.*"])
    again = LLMPruneConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.fingerprint() == config.fingerprint()
    assert config.sparsity is None and config.sparsity_ == 0.5  # stored as given; the resolved view beside it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "obs", "sparsity": 0.5}, "unknown method 'obs'"),
        ({"sparsity": 1.0}, r"in \[0, 1\)"),
        ({}, "sparsity is required"),
        ({"pattern": "2:4", "sparsity": 0.6}, "implies sparsity 0.5"),
        ({"method": "sparsegpt", "pattern": "channel", "sparsity": 0.5}, "chooses 'element', 'n:m' masks"),
        ({"pattern": "2:4", "allocation": "owl"}, "N:M fixes the sparsity of every group"),
        ({"sparsity": 0.7, "allocation": "owl", "allocation_options": {"lam": 0.35}}, r"lambda=0.35 .* \[0, 0.3\)"),
        ({"method": "magnitude", "sparsity": 0.5, "allocation": "global"}, "prunes one block at a time"),
        ({"sparsity": 0.5, "method": "wanda", "method_options": {"dampening": 0.1}}, "valid: none"),
        ({"sparsity": 0.5, "method": "sparsegpt", "solver_options": {"damp": 0.1}}, "'dampening'"),
        ({"sparsity": 0.5, "iterations": 3}, "prunes each block once"),
        ({"sparsity": 0.5, "nsamples": 0}, "nsamples must be a positive integer"),
    ],
)
def test_bad_arguments_are_refused_with_the_valid_choices(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLMPruneConfig(**kwargs)


def test_a_recipe_file_maps_one_to_one_to_prune_llm(tmp_path, segments):
    path = tmp_path / "r.yaml"
    path.write_text("method: sparsegpt\nsparsity: 0.5\nnsamples: 4\nsolver_options: {blocksize: 16}\n")
    recipe = load_recipe(path, LLMPruneConfig)
    a, b = tiny("llama"), tiny("llama")
    prune_llm(a, **recipe, calibration=segments, progress=False)
    prune_llm(b, "sparsegpt", 0.5, nsamples=4, solver_options={"blocksize": 16}, calibration=segments, progress=False)
    assert_same_bits(state_bits(a), state_bits(b))


def test_unknown_recipe_keys_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: wanda\nsparsity: 0.5\ncalib_samples: 12\n")
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['calib_samples'\]; valid keys: .*'nsamples'"):
        load_recipe(path, LLMPruneConfig)


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 13.0])]
    # mean = 20 / 8 = 2.5; only 13 exceeds 5 x 2.5
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 8)


def test_owl_sparsities_average_to_the_target_and_span_two_lambda():
    sparsities = owl_sparsities([0.01, 0.05, 0.03, 0.02], sparsity=0.7, lam=0.08)
    assert sum(sparsities) / 4 == pytest.approx(0.7)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert sparsities.index(min(sparsities)) == 1  # most outliers, least pruned
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]


def test_perplexity_is_exp_of_the_mean_nll_over_non_overlapping_windows():
    model = tiny("llama")
    stream = torch.randint(0, 96, (16 * 10 + 7,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, stream, seqlen=16, batch_size=3, progress=False)
    windows = stream[:160].reshape(10, 16)
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 96), windows[:, 1:].reshape(-1))
    assert result.windows == 10 and result.tokens == 167
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    # each window's own mean NLL, in order (batches of 3 do not mix windows up)
    own = F.cross_entropy(logits[:, :-1].reshape(-1, 96), windows[:, 1:].reshape(-1), reduction="none")
    assert result.window_nll == pytest.approx(own.reshape(10, 15).mean(1).tolist(), rel=1e-5)


def test_perplexity_refuses_masked_lms():
    with pytest.raises(ConfigError, match="causal language model"):
        perplexity(tiny("bert"), torch.arange(64), seqlen=16)


def test_perplexity_refuses_text_shorter_than_one_window():
    from secateurs.calibration import CalibrationError

    with pytest.raises(CalibrationError, match="10 tokens, fewer than one window of seqlen=16"):
        perplexity(tiny("llama"), torch.arange(10), seqlen=16)


def test_perplexity_refuses_windows_longer_than_the_context():
    with pytest.raises(ConfigError, match="longer than the model's context of 64"):
        perplexity(tiny("llama"), torch.arange(1000), seqlen=128)


def test_zero_shot_without_lm_eval_says_how_to_install(monkeypatch):
    import builtins

    from secateurs.llm.zeroshot import zero_shot

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ConfigError, match=r"pip install 'lm-eval\[hf\]'"):
        zero_shot(tiny("llama"), None, ["arc_easy"])
