"""Typed errors. Every message names the offender and says how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SecateursError(Exception):
    """Base class: catch this to handle every error secateurs raises on purpose."""


class ConfigError(SecateursError, ValueError):
    """A pruning argument or recipe value is invalid (checked before the model is touched)."""


class ScopeError(SecateursError, ValueError):
    """The scope selects nothing, or selects something that cannot be pruned."""


class PatternError(SecateursError, ValueError):
    """A sparsity pattern does not fit a weight's shape (N:M, block tiling, ...)."""


class DataRequiredError(SecateursError, ValueError):
    """A criterion needs calibration data, a loss or example inputs that were not given."""


class NonFiniteError(SecateursError, ValueError):
    """A weight or score holds NaN or Inf, so a ranking would be meaningless."""


class RecipeError(ConfigError):
    """A recipe file is malformed or holds unknown keys."""


class StateError(SecateursError, RuntimeError):
    """An object is used in the wrong order, e.g. loading masks whose shapes do not match."""


class CheckpointError(StateError):
    """A weights, masks or checkpoint file is unreadable, corrupted or truncated, or does not fit the model."""


class StructureError(SecateursError, RuntimeError):
    """Structural removal cannot follow an op or module, or the pruned model fails its forward check."""


class LayerCollapseError(SecateursError, RuntimeError):
    """Pruning would leave a layer with no weight, or no path from input to output (Tanaka et al. 2020,
    arXiv:2006.05467: the network then computes a constant). Raised before the model changes."""


class SecateursWarning(UserWarning):
    """Something worked but is probably not what was meant (e.g. finalizing before the schedule ends)."""


def choices(values: Iterable[str]) -> str:
    """Format the allowed values for an error message."""
    return ", ".join(sorted(repr(v) for v in values))


def refuse_unknown(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """A ``ConfigError`` naming each unknown keyword (with the closest valid one) and listing the valid ones;
    a typo should not surface as Python's bare ``TypeError``."""
    valid = list(valid)
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{where} got unknown keyword(s) {', '.join(hints)}; valid: {choices(valid)}")
