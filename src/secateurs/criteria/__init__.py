"""Criteria: how much each weight matters. One file per family; find a method by its name."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, choices
from . import activation, gradient, magnitude, second_order, structural, synflow  # noqa: F401  (registration)
from .activation import Activation, APoZ, Wanda
from .base import Criterion, register, registry
from .gradient import SNIP, Gradient, GraSP, Taylor
from .magnitude import LAMP, Magnitude, Random, lamp_normalize
from .second_order import OBD
from .structural import FLAP, FPGM, BlockInfluence, BNScale, GroupCriterion, as_group_criterion
from .synflow import SynFlow


def make_criterion(method: str | Criterion, options: dict[str, Any] | None = None) -> Criterion:
    """A criterion instance from its registered name (plus constructor options)."""
    if isinstance(method, Criterion):
        if options:
            raise ConfigError("method_options only apply when method is given by name")
        return method
    table = registry()
    if method not in table:
        raise ConfigError(f"unknown method {method!r}; valid: {choices(table)}")
    try:
        return table[method](**(options or {}))
    except TypeError as exc:
        raise ConfigError(f"bad method_options for {method!r}: {exc}") from exc


__all__ = [
    "APoZ",
    "Activation",
    "BNScale",
    "BlockInfluence",
    "FLAP",
    "FPGM",
    "GroupCriterion",
    "as_group_criterion",
    "Criterion",
    "Gradient",
    "GraSP",
    "LAMP",
    "Magnitude",
    "OBD",
    "Random",
    "SNIP",
    "SynFlow",
    "Taylor",
    "Wanda",
    "lamp_normalize",
    "make_criterion",
    "register",
    "registry",
]
