"""Sensitivity analysis and budget-driven allocation.

``sensitivity(model, ...)`` prunes one target at a time over a grid of sparsities inside a
:func:`secateurs.trial` (so the model comes back bit-exact) and returns a :class:`SensitivityProfile`;
``allocation='sensitivity'`` turns a profile and a budget (sparsity, parameters, MACs or measured
latency) into per-layer sparsities by an exact knapsack; ``saliency`` estimates per-weight
sensitivity (Fisher/OBD, Taylor, OBS) and checks it against measured loss changes.

The names load on first use (PEP 562), as the root package's do: the profile format and the
knapsack sit below the allocation registry, which imports them, while the analysis itself runs
prunes and so sits above the front doors; importing the package must not pull the latter into the
former.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .budget import Allocated, solve_budget
    from .cells import fit_budget, sensitivity
    from .expansion import Expansion, relinearize, solve_expansion
    from .knapsack import BudgetError, Option, solve
    from .measured import measure_profile
    from .profile import Cell, Entry, ProfileMismatchError, SensitivityProfile
    from .saliencies import SaliencyCheck, saliency, saliency_check, spearman
    from .search import SearchResult, spdy_search

_MODULES: dict[str, tuple[str, ...]] = {
    "budget": ("Allocated", "solve_budget"),
    "knapsack": ("BudgetError", "Option", "solve"),
    "profile": ("Cell", "Entry", "ProfileMismatchError", "SensitivityProfile"),
    "expansion": ("Expansion", "relinearize", "solve_expansion"),
    "saliencies": ("SaliencyCheck", "saliency", "saliency_check", "spearman"),
    "cells": ("fit_budget", "sensitivity"),
    "measured": ("measure_profile",),
    "search": ("SearchResult", "spdy_search"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = [
    "Allocated",
    "BudgetError",
    "Cell",
    "Entry",
    "Expansion",
    "Option",
    "ProfileMismatchError",
    "SaliencyCheck",
    "SearchResult",
    "SensitivityProfile",
    "fit_budget",
    "measure_profile",
    "relinearize",
    "saliency",
    "saliency_check",
    "sensitivity",
    "solve",
    "solve_budget",
    "solve_expansion",
    "spdy_search",
    "spearman",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
