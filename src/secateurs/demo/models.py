"""Demo models. Importable factories, so the CLI can name them: ``secateurs.demo.models:digits_cnn``.

Their layers have names (``fc1``, ``conv2``, ``classifier``) rather than ``nn.Sequential``'s bare
indices, so reports, plots and scopes (``exclude: ["classifier"]``) read like the model.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def digits_mlp(hidden: tuple[int, ...] = (300, 100), classes: int = 10, inputs: int = 64) -> nn.Sequential:
    """LeNet-300-100 (the lottery-ticket paper's MLP) on 8x8 digits: ``fc1``, ``fc2``, ``classifier``."""
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = inputs
    for i, h in enumerate(hidden, 1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append(("classifier", nn.Linear(width, classes)))
    return nn.Sequential(OrderedDict(layers))


def digits_cnn(classes: int = 10) -> nn.Sequential:
    """A small VGG-style CNN for 1x8x8 images: ``conv1``-``conv3`` with BatchNorm, ``fc``, ``classifier``."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 3, padding=1)), ("bn1", nn.BatchNorm2d(32)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("bn2", nn.BatchNorm2d(64)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(64, 64, 3, padding=1)), ("bn3", nn.BatchNorm2d(64)), ("relu3", nn.ReLU()),
        ("pool3", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(64 * 2 * 2, 128)), ("relu4", nn.ReLU()),
        ("classifier", nn.Linear(128, classes)),
    ]))  # fmt: skip
