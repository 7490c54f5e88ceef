"""``secateurs.trial(model)``: prune, measure, and get the very same model back, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secateurs
from secateurs.testing import calibration, small_cnn


def _snapshot(model: nn.Module) -> dict:
    """Everything a restore must bring back: classes, tensor objects and their bits, module tree, configs."""
    return {
        "classes": [type(m) for m in model.modules()],
        "names": [n for n, _ in model.named_modules()],
        "tensors": [(n, id(t), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()],
        "parameters": [id(p) for p in model.parameters()],
        "config": copy.deepcopy(model.config.to_dict()) if hasattr(model, "config") else None,
        "flags": [p.requires_grad for p in model.parameters()],
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["names"] == before["names"]
    assert after["parameters"] == before["parameters"]  # the same Parameter objects: an optimizer stays valid
    assert after["config"] == before["config"]
    assert after["flags"] == before["flags"]
    assert [(n, i) for n, i, _ in after["tensors"]] == [(n, i) for n, i, _ in before["tensors"]]
    for (name, _, a), (_, _, b) in zip(after["tensors"], before["tensors"]):
        bits = (a.view(torch.uint8), b.view(torch.uint8)) if a.is_floating_point() else (a, b)
        assert a.shape == b.shape and torch.equal(*bits), name


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="magnitude", mode="mask"),
        dict(method="wanda", mode="bake"),
        dict(method="sparsegpt"),  # reconstruct: the surviving weights change too
        dict(method="magnitude", mode="remove", pattern="channel", structural={"latency": False}),
        dict(method="synflow", mode="mask", iterations=3),
    ],
    ids=["mask", "bake", "reconstruct", "remove", "rounds"],
)
def test_trial_restores_the_model_bit_exact_after_every_mode(kwargs):
    model = small_cnn()
    before = _snapshot(model)
    x = torch.randn(4, 3, 8, 8)
    dense = model(x)
    with secateurs.trial(model):
        secateurs.prune(model, sparsity=0.5, calibration=calibration(), progress=False, **kwargs)
        assert not torch.equal(model(x), dense)  # the pruning really happened inside
    _assert_same(model, before)
    torch.testing.assert_close(model(x), dense, rtol=0, atol=0)


def test_trial_restores_after_training_in_train_mode_and_an_exception():
    model = small_cnn().train()
    before = _snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="measured"), secateurs.trial(model):
        secateurs.prune(model, "magnitude", 0.5, progress=False)
        for x, y in calibration():
            nn.functional.cross_entropy(model(x), y).backward()  # BatchNorm running statistics move too
            optimizer.step()
        raise RuntimeError("measured, then failed")
    _assert_same(model, before)
    assert model.training


def test_trial_restores_a_transformer_after_removal_and_the_block_runner():
    transformers = pytest.importorskip("transformers")
    from secateurs.llm import prune_llm
    from secateurs.testing import tiny_llama

    model = tiny_llama()
    before = _snapshot(model)
    segments = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(segments).logits
    for method, kwargs in [("sparsegpt", {}), ("wanda", {"allocation": "owl", "allocation_options": {"lam": 0.1}}),
                           ("flap", {}), ("shortgpt", {})]:  # fmt: skip
        with secateurs.trial(model):
            prune_llm(model, method, 0.5, calibration=segments, progress=False, **kwargs)
        _assert_same(model, before)
        with torch.no_grad():
            assert torch.equal(model(segments).logits, dense), method
    assert isinstance(model.config, transformers.LlamaConfig) and model.config.num_hidden_layers == 2
