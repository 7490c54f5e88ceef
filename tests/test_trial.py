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


def test_trial_puts_back_the_gradients_values_on_the_same_objects():
    model = small_cnn()
    x, y = calibration()[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[-1].weight.grad = None  # this one has no gradient before the trial
    grads = {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}
    with secateurs.trial(model):
        nn.functional.cross_entropy(model(x), y).backward()  # accumulates into the same .grad tensors, in place
    for name, p in model.named_parameters():
        grad, values = grads[name]
        if grad is None:
            assert p.grad is None, name  # created inside the trial: gone
        else:
            assert p.grad is grad and torch.equal(p.grad.view(torch.uint8), values.view(torch.uint8)), name


@pytest.mark.parametrize("convert", [nn.Module.half, nn.Module.double, lambda m: m.to(torch.bfloat16)],
                         ids=["half", "double", "to_bfloat16"])  # fmt: skip
def test_trial_restores_dtype_and_exact_values_after_a_conversion(convert):
    model = small_cnn()
    x, y = calibration()[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = _snapshot(model)
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with secateurs.trial(model):
        convert(model)  # through .data: the Parameter objects stay, their storage is converted (lossy for half)
        assert next(model.parameters()).dtype != torch.float32
    _assert_same(model, before)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == before["parameters"]
    for p, (grad, values) in zip(model.parameters(), grads):
        assert p.grad is grad and p.grad.dtype == torch.float32 and torch.equal(p.grad, values)


def test_trial_keeps_nested_configs_shared_and_restores_their_fields():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlavaConfig()
    text = config.text_config

    class LanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = text  # as in transformers' composite models: the outer config's sub-config
            self.fc = nn.Linear(4, 4)

    class Composite(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.language_model = LanguageModel()

    model = Composite()
    fields = {id(c): dict(vars(c)) for c in (config, text, config.vision_config)}
    vision = config.vision_config
    with secateurs.trial(model):
        text.hidden_size = 8  # what removal does: write a pruned size into the sub-config
        text.layer_types = ["full_attention"]
        config.text_config = transformers.LlamaConfig()
        vision.num_hidden_layers = 1
    assert model.config is config and model.language_model.config is text
    assert config.text_config is text and config.vision_config is vision
    for c in (config, text, vision):
        assert vars(c).keys() == fields[id(c)].keys()
        assert all(vars(c)[k] is v for k, v in fields[id(c)].items())  # the same field objects, not copies


class _Halve(nn.Module):
    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b * 0.5


@pytest.mark.parametrize(
    "body",
    [
        lambda m: secateurs.bake(m),
        lambda m: secateurs.unmask(m),
        lambda m: secateurs.prune(m, "magnitude", 0.7, mode="bake", progress=False),
        lambda m: torch.nn.utils.parametrize.register_parametrization(m[3], "bias", _Halve()),
    ],
    ids=["bake", "unmask", "re-prune-bake", "new-parametrization"],
)
def test_trial_restores_an_already_masked_model(body):
    """torch edits a masked module's parametrized class in place (removing the last parametrization of a
    tensor deletes the class's property); the trial must give the class its properties back."""
    model = small_cnn()
    secateurs.prune(model, "magnitude", 0.5, progress=False)
    before = _snapshot(model)
    x = torch.randn(4, 3, 8, 8)
    masked = model(x)
    with secateurs.trial(model):
        body(model)
    _assert_same(model, before)
    torch.testing.assert_close(model(x), masked, rtol=0, atol=0)
    assert [t.module_name for t in secateurs.masking.masked_targets(model)] == ["3", "5", "9"]
    secateurs.bake(model)  # still a working masked model: it bakes and runs
    assert model(x).shape == masked.shape


def test_trial_removes_hooks_and_non_persistent_buffers_added_inside():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    dense = model(x)
    with secateurs.trial(model):
        model[0].register_forward_hook(lambda module, args, out: out * 0)
        model[0].register_forward_pre_hook(lambda module, args: None)
        model[0].register_buffer("scratch", torch.ones(1), persistent=False)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert "scratch" not in model[0]._non_persistent_buffers_set and not hasattr(model[0], "scratch")
    torch.testing.assert_close(model(x), dense, rtol=0, atol=0)


def test_trial_puts_back_containers_that_refuse_changes_by_reference():
    """fx's immutable collections and transformers' ModelOutput refuse clear()/update(): a trial must not
    try, and must still restore the weights."""
    from torch.fx.immutable_collections import immutable_list

    model = small_cnn()
    model.shape_info = immutable_list([1, 2, 3])
    before = _snapshot(model)
    with secateurs.trial(model):
        secateurs.prune(model, "magnitude", 0.5, mode="bake", progress=False)
    _assert_same(model, before)
    assert model.shape_info == [1, 2, 3]
