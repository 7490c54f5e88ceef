"""secateurs: prune any PyTorch model, and prove what it bought you."""

from __future__ import annotations

from .api import Pruner, StepEvent, prune
from .config import PruneConfig
from .criteria import Criterion, make_criterion, register
from .errors import (
    CheckpointError,
    ConfigError,
    DataRequiredError,
    NonFiniteError,
    PatternError,
    RecipeError,
    ScopeError,
    SecateursError,
    StateError,
    StructureError,
)
from .masking import bake, load_masks, save_masks, unmask
from .recipes import load_recipe
from .report import Report, build_report
from .schedules import Cubic, Exponential, Linear, LotteryTicket, OneShot
from .scope import ScopeSpec

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Criterion",
    "Cubic",
    "DataRequiredError",
    "Exponential",
    "Linear",
    "LotteryTicket",
    "NonFiniteError",
    "OneShot",
    "PatternError",
    "PruneConfig",
    "Pruner",
    "RecipeError",
    "Report",
    "ScopeError",
    "ScopeSpec",
    "SecateursError",
    "StateError",
    "StructureError",
    "StepEvent",
    "bake",
    "build_report",
    "load_masks",
    "load_recipe",
    "make_criterion",
    "prune",
    "register",
    "save_masks",
    "unmask",
]
