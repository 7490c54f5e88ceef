"""Typed errors. Every message names the offender and says how to fix it."""

from __future__ import annotations

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


def choices(values: Iterable[str]) -> str:
    """Format the allowed values for an error message."""
    return ", ".join(sorted(repr(v) for v in values))
