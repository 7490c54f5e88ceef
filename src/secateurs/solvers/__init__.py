"""Solvers: the ``reconstruct`` application mode, which updates the surviving weights."""

from __future__ import annotations

from .sparsegpt import CholeskyError, HessianAccumulator, InverseFactor, inverse_factor, sparsegpt

__all__ = ["CholeskyError", "HessianAccumulator", "InverseFactor", "inverse_factor", "sparsegpt"]
