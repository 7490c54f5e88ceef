"""secateurs.training.train: the learning-rate factor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import ConfigError
from secateurs.training import train


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    return [(x, (x.sum(1) > 0).long())]


def test_lr_factor_zero_leaves_the_weights_as_they_were():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    train(model, data(), 3, lambda p: torch.optim.SGD(p, lr=0.5), lr_factor=lambda step: 0.0)
    torch.testing.assert_close(model.weight.detach(), before)


def test_lr_factor_scales_each_step_like_a_smaller_learning_rate():
    torch.manual_seed(0)
    decayed, plain = nn.Linear(3, 2), nn.Linear(3, 2)
    plain.load_state_dict(decayed.state_dict())
    train(decayed, data(), 1, lambda p: torch.optim.SGD(p, lr=0.5), lr_factor=lambda step: 0.2)
    train(plain, data(), 1, lambda p: torch.optim.SGD(p, lr=0.1))
    torch.testing.assert_close(decayed.weight.detach(), plain.weight.detach())


def test_a_negative_lr_factor_is_refused_naming_the_step():
    with pytest.raises(ConfigError, match=r"lr_factor\(1\)"):
        train(nn.Linear(3, 2), data(), 3, lr_factor=lambda step: 1.0 - 2 * step)
