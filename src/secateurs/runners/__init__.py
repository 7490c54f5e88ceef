"""The two runners of the one pipeline, carried out (their traits are declared in :mod:`secateurs.runner`,
below the configuration that checks them)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import PruneConfig
from ..pipeline import Data
from .blocks import run_blocks
from .model import Pruning, run_model


def run(model: nn.Module, config: PruneConfig, data: Data) -> Any:
    """Carry out ``config`` on ``model`` with the runner it resolved."""
    return config.runner_.run(model, config, data)


__all__ = ["Pruning", "run", "run_blocks", "run_model"]
