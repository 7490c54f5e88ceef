"""Criteria: how much each weight matters. One file per family; find a method by its name.

Group criteria for ``mode='remove'`` (BatchNorm scale, FPGM, FLAP, ShortGPT) live with the
structural code they read, in :mod:`secateurs.structural.criteria`, and register in the same
registry.
"""

from __future__ import annotations

from typing import Any

from . import activation, gradient, magnitude, movement, second_order, synflow  # noqa: F401  (registration)
from .activation import Activation, APoZ, Wanda
from .base import CRITERIA, MODES, Criterion, register, registry
from .gradient import SNIP, Gradient, GraSP, Taylor
from .magnitude import LAMP, Magnitude, Random, lamp_normalize
from .movement import Movement
from .second_order import ALPS, OBD, SparseGPT
from .synflow import SynFlow


def make_criterion(method: str | Criterion, options: dict[str, Any] | None = None) -> Criterion:
    """A criterion instance from its registered name (plus constructor options)."""
    return CRITERIA.build(method, options, "method_options")


__all__ = [
    "ALPS",
    "APoZ",
    "Activation",
    "CRITERIA",
    "Criterion",
    "Gradient",
    "GraSP",
    "LAMP",
    "MODES",
    "Magnitude",
    "Movement",
    "OBD",
    "Random",
    "SNIP",
    "SparseGPT",
    "SynFlow",
    "Taylor",
    "Wanda",
    "lamp_normalize",
    "make_criterion",
    "register",
    "registry",
]
