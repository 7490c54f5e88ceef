"""FBS channel gating: winner-take-all, the one-sample path computes only kept channels, training, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.dynamic import FBSConv, add_fbs, load_fbs
from secateurs.errors import CheckpointError, ConfigError, StateError


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    ).eval()  # fmt: skip


def _randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, FBSConv):
            layer.saliency.weight.data = torch.randn(layer.saliency.weight.shape, generator=g)
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5, generator=g)
            layer.running_var.uniform_(0.5, 2.0, generator=g)


def test_each_gate_keeps_exactly_the_top_k_channels_per_input():
    model = _cnn()
    fbs = add_fbs(model, density=0.5)
    assert list(fbs.layers) == ["3", "7"] and isinstance(model[4], nn.Identity)
    _randomize(model)
    seen = {}
    model[3].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    model(torch.randn(5, 1, 8, 8))
    alive = (seen["out"].abs().amax((2, 3)) > 0).sum(1)
    assert alive.tolist() == [8] * 5  # 8 of 16 channels kept, per sample
    chosen = [set((seen["out"][i].abs().amax((1, 2)) > 0).nonzero().flatten().tolist()) for i in range(5)]
    assert len({frozenset(c) for c in chosen}) > 1  # which ones depends on the input


def test_the_one_sample_path_equals_the_batched_path_and_computes_fewer_macs():
    model = _cnn()
    fbs = add_fbs(model, density=0.5)
    _randomize(model)
    x = torch.randn(4, 1, 8, 8)
    with torch.enable_grad():
        batched = model(x).detach()
    fbs.reset_counts()
    with torch.no_grad():
        single = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-5)
    macs = fbs.macs(4)
    # layer 3 computes 8 of 16 outputs from 8 inputs; layer 7 reads only the 8 alive channels
    assert macs.dense == 4 * (8 * 16 * 9 * 64 + 16 * 16 * 9 * 16) / 4
    assert macs.computed <= 8 * 8 * 9 * 64 + 8 * 8 * 9 * 16  # half the outputs, from at most half the inputs
    assert macs.reduction > 2


def test_density_one_is_the_dense_model_with_unit_saliency():
    model = _cnn()
    dense = copy.deepcopy(model)
    add_fbs(model, density=1.0)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x))
        torch.testing.assert_close(model(x[:1]), dense(x[:1]))


def test_training_with_the_lasso_learns_the_predictors():
    model = _cnn().train()
    fbs = add_fbs(model, density=0.5)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    before = fbs.layers["3"].saliency.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(model(x), y) + fbs.penalty(1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(fbs.layers["3"].saliency.weight, before)


def test_bad_densities_and_models_without_convs_are_refused():
    for bad in (0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="density"):
            add_fbs(_cnn(), density=bad)
    with pytest.raises(ConfigError, match="Conv2d"):
        add_fbs(nn.Sequential(nn.Linear(3, 3)))
    fbs = add_fbs(_cnn(), 0.5)
    with pytest.raises(StateError):
        fbs.penalty()
    with pytest.raises(StateError):
        fbs.macs(1)


def test_a_gated_model_saves_and_loads_without_pickle_and_a_wrong_model_is_refused_unchanged(tmp_path):
    model = _cnn()
    fbs = add_fbs(model, density=0.5)
    _randomize(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
    path = fbs.save(tmp_path / "fbs.safetensors")
    fresh = _cnn()
    loaded = load_fbs(fresh, path)
    assert list(loaded.layers) == ["3", "7"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want)
        torch.testing.assert_close(fresh(x[:1]), want[:1])
    other = _cnn()
    other[7] = nn.Conv2d(16, 8, 3, padding=1)  # another width
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_fbs(other, path)
    assert not any(isinstance(m, FBSConv) for m in other.modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
