"""Shared fixtures: small models built in code, and a fingerprint to prove a model is unchanged."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# two workers on two cores: one thread each, or they fight
torch.set_num_threads(int(os.environ.get("SECATEURS_TEST_THREADS", "1")))

if importlib.util.find_spec("torchvision") is not None:  # a CUDA wheel on a CPU torch: see import_torchvision
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from _vision_zoo import import_torchvision

    import_torchvision()


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 5),
    )  # fmt: skip


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


@pytest.fixture
def cnn() -> nn.Sequential:
    return small_cnn()


@pytest.fixture
def mlp() -> nn.Sequential:
    return small_mlp()


@pytest.fixture
def cnn_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]


@pytest.fixture
def mlp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]


def fingerprint(model: nn.Module) -> tuple:
    """Everything that must be bit-identical after a refused prune."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = tuple(type(m).__name__ for m in model.modules())
    return state, classes, model.training


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, classes, training = before
    now = model.state_dict()
    assert list(now) == list(state), "state_dict keys changed"
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")
    assert tuple(type(m).__name__ for m in model.modules()) == classes, "module classes changed"
    assert model.training == training
