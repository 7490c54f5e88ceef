"""Every supported layer type prunes with every pattern that fits it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import prune

ALL = {"skip_first": False, "skip_last": False}


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv3d(2, 4, 2)
        self.head = nn.Linear(8 + 4 * 27, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.embed(tokens).transpose(1, 2)).mean(-1)
        y = self.conv3(x[:, :2, None, None, None].expand(-1, 2, 4, 4, 4)).flatten(1)
        return self.head(torch.cat([x, y], 1))


@pytest.mark.parametrize("pattern", ["element", "block:2x2", "output_channel", "input_channel"])
def test_conv1d_conv3d_linear_and_embedding_prune_exactly(pattern):
    torch.manual_seed(0)
    model = Mixed()
    report = prune(model, "magnitude", 0.5, pattern=pattern, scope={**ALL, "embeddings": True})
    names = [layer.name for layer in report.layers]
    assert names == ["embed.weight", "conv1.weight", "conv3.weight", "head.weight"]
    for layer in report.layers:
        assert layer.sparsity == pytest.approx(0.5, abs=0.02), layer.name
        assert layer.pattern_valid in (None, True)
    model(torch.randint(0, 20, (2, 5))).sum().backward()


def test_two_four_on_conv_groups_input_channels_at_each_kernel_position():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 4, 3))
    prune(conv, "magnitude", pattern="2:4", scope=ALL)
    weight = conv[0].weight.detach()  # (out, in, kh, kw)
    groups = weight.permute(0, 2, 3, 1).reshape(-1, 4)  # 4 consecutive input channels at one position
    assert ((groups != 0).sum(dim=1) == 2).all()


def test_embeddings_are_only_pruned_when_asked():
    model = Mixed()
    report = prune(model, "magnitude", 0.5, scope=ALL)
    assert "embed.weight" not in [layer.name for layer in report.layers]
