"""SynFlow avoids layer collapse at extreme compression where single-shot criteria collapse
(Tanaka et al. 2020, arXiv:2006.05467, section 4 and figure 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import prune

EVERY_LAYER = {"skip_first": False, "skip_last": False}  # as in the paper: all layers pruned
SPARSITY = 0.999  # density 1e-3


def vgg_like() -> nn.Sequential:
    torch.manual_seed(0)

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), *block(128, 128), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_synflow_reaches_density_1e_3_without_collapsing_any_layer(data):
    model = vgg_like()
    report = prune(model, "synflow", SPARSITY, scope=EVERY_LAYER, example_inputs=data[0][:1], progress=False)
    assert 1 - report.sparsity <= 1e-3
    assert report.collapsed_layers == []
    assert all(layer.nonzeros > 0 for layer in report.layers)
    assert report.connected is True


@pytest.mark.parametrize("method", ["magnitude", "snip"])
def test_single_shot_criteria_collapse_a_layer_at_the_same_density(data, method):
    model = vgg_like()
    report = prune(model, method, SPARSITY, allocation="global", scope=EVERY_LAYER, calibration=[data], progress=False,
                   allow_collapse=True)  # fmt: skip
    assert 1 - report.sparsity <= 1e-3
    assert report.collapsed_layers, "expected layer collapse"
    assert report.connected is False
