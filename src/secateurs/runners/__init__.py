"""The two runners of the one pipeline, carried out (their traits are declared in :mod:`secateurs.runner`,
below the configuration that checks them)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import PruneConfig
from ..errors import ConfigError
from ..pipeline import Data
from ..schedules import OneShot
from .blocks import run_blocks
from .model import Pruning, run_model


def run(model: nn.Module, config: PruneConfig, data: Data) -> Any:
    """Carry out ``config`` on ``model`` once, with the runner it resolved: the one-shot front doors
    (``prune()``, ``prune_llm()``, ``secateurs prune``) all come here; ``Pruner`` steps do not."""
    refuse_training_options(config)
    return config.runner_.run(model, config, data)


def refuse_training_options(config: PruneConfig) -> None:
    """A schedule and a regularizer act between training steps; a one-shot prune has none, so either
    would be accepted and silently ignored."""
    if not isinstance(config.schedule_, OneShot) or config.schedule_.at != 0:
        raise ConfigError(
            "a one-shot prune (prune(), prune_llm(), secateurs prune) runs without training, so a training schedule "
            "cannot apply; use secateurs.Pruner(model, ..., schedule=...) in your training loop, or iterations=N "
            "for exponential rounds without training"
        )
    if config.criterion_.from_training:
        raise ConfigError(
            f"method {config.criterion_.name!r} ranks weights by scores accumulated during training, and a one-shot "
            f"prune has no training; use secateurs.Pruner(model, {config.criterion_.name!r}, sparsity, "
            f"regularizer={config.criterion_.name!r}, schedule=...) and call pruner.regularize() between backward() "
            "and optimizer.step()"
        )
    if config.regularizer_ is not None:
        raise ConfigError(
            f"regularizer {config.regularizer_.name!r} is a training-time penalty, and a one-shot prune has no "
            "training; use secateurs.Pruner(model, ..., regularizer=...) and call pruner.regularize() between "
            "backward() and optimizer.step()"
        )


__all__ = ["Pruning", "run", "run_blocks", "run_model"]
