"""Small models and helpers shared by the structural tests."""

from __future__ import annotations

import torch
from torch import nn

from secateurs.structural import DependencyGraph


def zero_units(model: nn.Module, graph: DependencyGraph, removed: dict[str, list[int]]) -> None:
    """Make the chosen units contribute exactly nothing: zero every parameter that produces them
    (rows of producing layers, norm scales and shifts, running means), so removing them must not
    change the output."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, units in removed.items():
            for view in graph[name].ports:
                port = view.port
                if port.role not in ("out", "pass", "free") or port.param in ("running_var",):
                    continue
                tensor = getattr(modules[port.module], port.param)
                hit = torch.isin(view.index, torch.tensor(units))
                if port.dim is None:
                    tensor.view(-1)[hit] = 0.0
                else:
                    tensor.index_fill_(port.dim, hit.nonzero().reshape(-1), 0.0)


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet_like(width: int = 8, classes: int = 5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width), ResidualBlock(width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes),
    )  # fmt: skip


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))
