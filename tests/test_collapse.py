"""Layer collapse is an error unless asked for, and refusing it leaves the model bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, fingerprint
from secateurs import LayerCollapseError, Pruner, prune
from secateurs.demo.models import digits_mlp
from secateurs.masking import masked_targets

GLOBAL_90 = dict(method="magnitude", sparsity=0.9, allocation="global")


def untrained_mlp() -> nn.Module:
    """The README's old first example: an untrained LeNet-300-100, whose second layer's initial weights
    are all smaller than the first's (Kaiming bounds 1/sqrt(300) < 1/sqrt(64)), so a global threshold
    at 90% removes it whole."""
    torch.manual_seed(0)
    return digits_mlp()


@pytest.mark.parametrize("mode", ["mask", "bake"])
def test_a_collapsing_prune_is_refused_and_the_model_is_unchanged(mode):
    model = untrained_mlp()
    before = fingerprint(model)
    with pytest.raises(LayerCollapseError, match=r"every weight of 'fc2\.weight'.*allow_collapse=True"):
        prune(model, **GLOBAL_90, mode=mode)
    assert_unchanged(model, before)
    assert masked_targets(model) == []


def test_allow_collapse_prunes_and_reports_the_collapse():
    model = untrained_mlp()
    report = prune(model, **GLOBAL_90, allow_collapse=True, example_inputs=torch.zeros(1, 1, 8, 8))
    assert report.collapsed_layers == ["fc2.weight"] and report.connected is False
    assert "LAYER COLLAPSE" in report.table()


def test_a_cut_path_without_an_empty_layer_is_refused_too():
    # layer 0 keeps only rows 0-1, layer 2 only columns 2-3: both alive, no path from input to output
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[9.0] * 4, [9.0] * 4, [0.1] * 4, [0.1] * 4]))
        model[2].weight.copy_(torch.tensor([[0.1, 0.1, 9.0, 9.0]] * 2))
    before = fingerprint(model)
    scope = {"skip_last": False}
    with pytest.raises(LayerCollapseError, match="no path of surviving weights"):
        prune(model, "magnitude", 0.5, allocation="global", scope=scope, example_inputs=torch.ones(1, 4))
    assert_unchanged(model, before)


def test_the_same_global_prune_of_a_trained_model_collapses_nothing():
    from secateurs.demo import held_out_accuracy, trained_mlp

    model = trained_mlp()
    report = prune(model, **GLOBAL_90, example_inputs=torch.zeros(1, 1, 8, 8))
    assert report.collapsed_layers == [] and report.connected is True
    assert held_out_accuracy(model) > 0.8  # 90% of the hidden weights gone, most of the accuracy left


def test_a_pruner_step_that_would_collapse_is_refused_and_keeps_the_previous_masks():
    model = untrained_mlp()
    pruner = Pruner(model, **GLOBAL_90, schedule={"kind": "linear", "start": 0, "end": 2, "every": 1})
    pruner.step()  # step 0: 0%
    pruner.step()  # step 1: 45%, every layer keeps weights
    state = fingerprint(model)
    with pytest.raises(LayerCollapseError):
        pruner.step()  # step 2: 90% would empty layer 3
    assert_unchanged(model, state)
    assert pruner.current_sparsity == pytest.approx(0.45)


def test_the_cli_refuses_a_collapse_unless_allowed(tmp_path, capsys):
    from secateurs.cli import main

    args = ["prune", "secateurs.demo.models:digits_mlp", "--method", "magnitude", "--sparsity", "0.9",
            "--allocation", "global"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "--allow-collapse" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--allow-collapse", "--out", str(tmp_path / "allowed")]) == 0
    assert "LAYER COLLAPSE" in capsys.readouterr().out


@pytest.mark.parametrize("rollback", [True, False])
def test_the_block_runner_refuses_a_collapse_too(rollback):
    """Per-row 99% of a 32-wide row rounds to all 32: every layer of the tiny Llama would be emptied."""
    pytest.importorskip("transformers")
    from secateurs.llm import prune_llm
    from secateurs.testing import tiny_llama

    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(LayerCollapseError, match=r"every weight of 'model\.layers\.0") as caught:
        prune_llm(model, "magnitude", 0.99, comparison="row", progress=False, rollback=rollback)
    if rollback:
        assert_unchanged(model, before)
        assert "the model is unchanged" in str(caught.value)
    else:  # said plainly: nothing kept the original weights
        assert "rollback=False, so the model keeps the pruned weights" in str(caught.value)
    model = tiny_llama()
    report = prune_llm(model, "magnitude", 0.99, comparison="row", progress=False, allow_collapse=True)
    assert report.collapsed_layers
