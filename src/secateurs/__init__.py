"""secateurs: prune any PyTorch model, and prove what it bought you."""

from __future__ import annotations

from . import runners, structural  # noqa: F401  (registration: runners, removal, group criteria, handlers)
from .api import Pruner, StepEvent, prune
from .catalog import MethodInfo, methods
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
from .masking import Gate, attach_gate, bake, load_masks, save_masks, unmask
from .recipes import load_recipe
from .report import Report, build_report
from .schedules import Cubic, Exponential, Linear, LotteryTicket, OneShot
from .scope import ScopeSpec
from .trial import trial

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Criterion",
    "Cubic",
    "DataRequiredError",
    "Exponential",
    "Gate",
    "Linear",
    "LotteryTicket",
    "MethodInfo",
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
    "attach_gate",
    "bake",
    "build_report",
    "load_masks",
    "load_recipe",
    "make_criterion",
    "methods",
    "prune",
    "register",
    "save_masks",
    "trial",
    "unmask",
]
