"""The solver contract: after a mask is chosen, update what survives so the layer's output stays close.

A solver is the ``reconstruct`` application mode's engine (SparseGPT's OBS update) and the
``remove`` mode's optional compensation (FLAP's bias compensation). It declares what evidence
it needs, which modes it serves, and whether it can choose the mask itself while it updates the
weights (adaptive selection). Solvers share one Hessian accumulator and one dampening policy
(:mod:`secateurs.hessian`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from ..evidence import Evidence, Need
from ..patterns import Pattern
from ..registry import Registry
from ..scope import Target

SOLVERS: Registry[type[Solver]] = Registry("solver")


@dataclass
class SolveResult:
    """What a solver did to one weight (stored shapes)."""

    keep: Tensor  # bool: the entries that survive
    weight: Tensor | None = None  # the new weight (pruned entries +0.0); None: the weight is only masked
    bias_delta: Tensor | None = None  # added to the layer's bias, one value per output
    #: a tied weight: the delta of each other holder's bias, by module name (each holder sees its own inputs)
    tied_bias_deltas: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. dampening used, retries, estimated loss


class Solver:
    """Base class: override :meth:`solve` (and :meth:`validate` to refuse targets up front)."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[Need]] = frozenset()
    #: application modes this solver serves
    modes: ClassVar[tuple[str, ...]] = ("reconstruct",)
    #: can choose the mask itself, given a sparsity (or N:M pattern) per target
    adaptive: ClassVar[bool] = False
    #: pattern names it can reconstruct (None: any mask)
    patterns: ClassVar[tuple[str, ...] | None] = None

    def validate(self, targets: Sequence[Target], mode: str) -> None:
        """Refuse targets this solver cannot handle, before anything runs."""

    def solve(
        self,
        targets: Sequence[Target],
        evidence: Evidence,
        masks: Mapping[str, Tensor] | None,
        sparsities: Mapping[str, float] | None = None,
        pattern: Pattern | None = None,
    ) -> dict[str, SolveResult]:
        """Reconstruct every target. ``masks`` (stored-shape bool, True = keep) fix the masks; None asks
        an adaptive solver to choose them at ``sparsities`` (or the N:M ``pattern``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


SOLVERS.base = Solver


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make a solver available by its ``name`` (``solver='name'``)."""
    return SOLVERS.register(cls)


def make_solver(value: str | Solver, options: Mapping[str, Any] | None = None) -> Solver:
    """A solver instance from its registered name (plus constructor options) or an instance."""
    return SOLVERS.build(value, options, "solver_options")
