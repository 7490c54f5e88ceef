"""Removal on a schedule: Pruner(mode='remove') inside a training loop."""

from __future__ import annotations

import pytest
import torch
from structural_nets import resnet_like
from torch import nn

import secateurs
from conftest import assert_unchanged, fingerprint
from secateurs import ConfigError, Pruner, StructureError

X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))
QUIET = {"latency": False}


def _conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_a_linear_schedule_removes_in_steps_and_lands_on_the_one_shot_widths():
    model = resnet_like(width=16).train()
    pruner = Pruner(model, "magnitude", 0.5, mode="remove", example_inputs=X[:1], structural=QUIET,
                    schedule={"kind": "linear", "start": 0, "end": 8, "every": 2})  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    widths, events = [], []
    for _ in range(10):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        optimizer.step()
        event = pruner.step()
        if event.pruned:
            events.append(event)
            widths.append(_conv_widths(model)[0])
        if event.reshaped:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    assert [e.sparsity for e in events] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])
    assert [e.reshaped for e in events] == [False, True, True, True, True]  # sparsity 0 removes nothing
    assert widths == [16, 14, 12, 10, 8]  # the stem group, 16 channels: 1/8 of the original per step
    assert torch.isfinite(loss)
    one_shot = resnet_like(width=16).eval()
    secateurs.prune(one_shot, "magnitude", 0.5, mode="remove", example_inputs=X[:1], structural=QUIET, progress=False)
    assert _conv_widths(model) == _conv_widths(one_shot)
    assert pruner.report().groups and pruner.state_dict()["current_sparsity"] == 0.5


def test_already_reached_targets_remove_nothing_and_state_resumes():
    model = resnet_like(width=16).eval()
    pruner = Pruner(model, "magnitude", 0.5, mode="remove", example_inputs=X[:1], structural=QUIET)
    pruner.prune_to(0.25)
    widths = _conv_widths(model)
    pruner.prune_to(0.25)
    assert _conv_widths(model) == widths
    state = pruner.state_dict()
    resumed = Pruner(model, "magnitude", 0.5, mode="remove", example_inputs=X[:1], structural=QUIET)
    resumed.load_state_dict(state)
    resumed.prune_to(0.5)
    assert _conv_widths(model)[0] == 8  # half of the original 16, not half of the 12 left


def test_scheduled_removal_refuses_what_cannot_compose_before_touching_the_model():
    model = resnet_like(width=16).eval()
    before = fingerprint(model)
    common = {"mode": "remove", "example_inputs": X[:1], "structural": QUIET}
    with pytest.raises(ConfigError, match="rewinding restores weights of the original shapes"):
        Pruner(model, "magnitude", 0.5, schedule={"kind": "lottery", "rounds": 2, "steps_per_round": 5}, **common)
    with pytest.raises(ConfigError, match="max_ratio caps a single removal"):
        Pruner(model, "magnitude", 0.5, **{**common, "structural": {**QUIET, "max_ratio": 0.5}})
    with pytest.raises(ConfigError, match="explicit per-group ratios"):
        Pruner(model, "magnitude", None, allocation={"0": 0.5}, **common)
    secateurs.prune(model, "magnitude", 0.5, pattern="channel")
    with pytest.raises(StructureError, match=r"secateurs\.bake"):
        Pruner(model, "magnitude", 0.5, **common)
    secateurs.unmask(model)
    assert_unchanged(model, before)


def test_the_built_in_loop_rebuilds_its_optimizer_after_each_removal():
    from secateurs.training import train

    model = resnet_like(width=16).train()
    pruner = Pruner(model, "magnitude", 0.5, mode="remove", example_inputs=X[:1], structural=QUIET,
                    schedule={"kind": "linear", "start": 2, "end": 6, "every": 2})  # fmt: skip

    after_removal: dict[str, torch.Tensor] = {}

    class Watch:  # the pruner, plus a snapshot of the weights right after each removal
        def step(self):
            event = pruner.step()
            if event.reshaped:
                after_removal.update({k: v.clone() for k, v in model.state_dict().items()})
            return event

    losses = train(model, [(X, Y)], 12, pruner=Watch())
    assert _conv_widths(model)[0] == 8 and all(torch.isfinite(torch.tensor(losses)))
    # every conv trained on after the last removal: the optimizer holds the new tensors, not the old ones
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert not torch.equal(module.weight, after_removal[f"{name}.weight"]), name
