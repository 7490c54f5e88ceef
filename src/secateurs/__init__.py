"""secateurs: prune any PyTorch model, and prove what it bought you.

The public names below are imported on first use (PEP 562), not when the package is: the
command line imports ``secateurs`` to print ``--help``, and importing torch for that takes
seconds. ``from secateurs import prune`` and ``secateurs.structural.save_structured`` work as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .api import Pruner, StepEvent, prune
    from .catalog import MethodInfo, methods
    from .config import PruneConfig
    from .criteria import Criterion, make_criterion, register
    from .errors import (
        CheckpointError,
        ConfigError,
        DataRequiredError,
        LayerCollapseError,
        NonFiniteError,
        PatternError,
        RecipeError,
        ScopeError,
        SecateursError,
        SecateursWarning,
        StateError,
        StructureError,
    )
    from .masking import Gate, attach_gate, bake, load_masks, save_masks, unmask
    from .recipes import load_recipe
    from .report import Report, build_report
    from .schedules import Cubic, Exponential, Linear, LotteryTicket, OneShot
    from .scope import ScopeSpec
    from .trials import trial

__version__ = "0.1.0"

_MODULES: dict[str, tuple[str, ...]] = {
    "api": ("Pruner", "StepEvent", "prune"),
    "catalog": ("MethodInfo", "methods"),
    "config": ("PruneConfig",),
    "criteria": ("Criterion", "make_criterion", "register"),
    "errors": (
        "CheckpointError", "ConfigError", "DataRequiredError", "LayerCollapseError", "NonFiniteError",
        "PatternError", "RecipeError", "ScopeError", "SecateursError", "SecateursWarning", "StateError",
        "StructureError",
    ),
    "masking": ("Gate", "attach_gate", "bake", "load_masks", "save_masks", "unmask"),
    "recipes": ("load_recipe",),
    "report": ("Report", "build_report"),
    "schedules": ("Cubic", "Exponential", "Linear", "LotteryTicket", "OneShot"),
    "scope": ("ScopeSpec",),
    "trials": ("trial",),
}  # fmt: skip
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [  # the same names, spelled out for tools that read __all__ statically
    "CheckpointError",
    "ConfigError",
    "Criterion",
    "Cubic",
    "DataRequiredError",
    "Exponential",
    "Gate",
    "LayerCollapseError",
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
    "SecateursWarning",
    "StateError",
    "StepEvent",
    "StructureError",
    "attach_gate",
    "bake",
    "build_report",
    "load_masks",
    "load_recipe",
    "methods",
    "make_criterion",
    "prune",
    "register",
    "save_masks",
    "trial",
    "unmask",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use; submodules (``secateurs.structural``) too."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


from . import _auto  # noqa: E402  (imports no torch; see _auto's docstring)

_auto.install()


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
