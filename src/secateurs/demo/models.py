"""Demo models. Importable factories, so the CLI can name them: ``secateurs.demo.models:digits_cnn``."""

from __future__ import annotations

from torch import nn


def digits_mlp(hidden: tuple[int, ...] = (300, 100), classes: int = 10, inputs: int = 64) -> nn.Sequential:
    """LeNet-300-100 (the lottery-ticket paper's MLP) on 8x8 digits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def digits_cnn(classes: int = 10) -> nn.Sequential:
    """A small VGG-style CNN for 1x8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, classes),
    )  # fmt: skip
