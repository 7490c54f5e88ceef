"""Allocation: how much each target loses.

Every allocator answers one question: for each target, how many units does each
of its comparison groups lose at this step? Selection then takes that many of the
lowest-scoring units, so global ranking and per-layer budgets share one code path.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from .criteria.magnitude import lamp_normalize
from .errors import ConfigError, choices
from .patterns import Pattern
from .scope import Target
from .selection import global_prune_counts


@dataclass
class Budget:
    """What an allocator sees for one step."""

    targets: Sequence[Target]
    sparsity: float  # overall sparsity asked for at this step
    final_sparsity: float  # the run's final sparsity (to scale explicit per-layer values)
    unit_scores: dict[str, Tensor]  # (groups, units) per target
    dead: dict[str, Tensor | None]  # (groups, units) bool: units already pruned; None: none are
    pattern: Pattern


class Allocation(ABC):
    name: str = ""
    needs_single_group: bool = False  # True: ranks across targets, so rows/N:M chunks cannot apply

    @abstractmethod
    def prune_counts(self, budget: Budget) -> dict[str, int]:
        """Units each comparison group of each target loses."""

    def _per_target(self, budget: Budget, sparsities: Mapping[str, float]) -> dict[str, int]:
        return {
            t.name: budget.pattern.units_to_prune(budget.unit_scores[t.name].shape[1], sparsities[t.name])
            for t in budget.targets
        }

    def to_spec(self) -> str | dict:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Uniform(Allocation):
    """Every target at the same sparsity."""

    name = "uniform"

    def prune_counts(self, budget: Budget) -> dict[str, int]:
        return self._per_target(budget, {t.name: budget.sparsity for t in budget.targets})


class Global(Allocation):
    """One threshold over all targets' scores (the criterion must be comparable across layers)."""

    name = "global"
    needs_single_group = True

    def _scores(self, budget: Budget) -> dict[str, Tensor]:
        return budget.unit_scores

    def prune_counts(self, budget: Budget) -> dict[str, int]:
        numel = {t.name: budget.pattern.unit_numel(t.canonical_shape) for t in budget.targets}
        return global_prune_counts(self._scores(budget), numel, budget.dead, budget.sparsity)


class LAMPAllocation(Global):
    """Global ranking of LAMP-normalised scores (Lee et al. 2021, arXiv:2010.07611) decides
    each layer's budget; the criterion's own scores then pick the units in each layer."""

    name = "lamp"

    def _scores(self, budget: Budget) -> dict[str, Tensor]:
        return {
            name: lamp_normalize(s if budget.dead[name] is None else s.masked_fill(budget.dead[name], 0.0))
            for name, s in budget.unit_scores.items()
        }


class ERK(Allocation):
    """Erdos-Renyi-Kernel (Evci et al. 2020, arXiv:1911.11134): density proportional to
    ``sum(shape) / prod(shape)``, scaled to the overall budget, layers capped at dense."""

    name = "erk"

    def prune_counts(self, budget: Budget) -> dict[str, int]:
        return self._per_target(budget, erk_sparsities(budget.targets, budget.sparsity))


def erk_sparsities(targets: Sequence[Target], sparsity: float) -> dict[str, float]:
    numel = {t.name: t.numel for t in targets}
    raw = {t.name: sum(t.shape) / math.prod(t.shape) for t in targets}
    kept_total = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in numel if n not in dense]
        budget = kept_total - sum(numel[n] for n in dense)
        denominator = sum(raw[n] * numel[n] for n in free)
        epsilon = budget / denominator if denominator > 0 else 0.0
        newly_dense = {n for n in free if epsilon * raw[n] > 1.0}
        if not newly_dense:
            break
        dense |= newly_dense
    return {n: 0.0 if n in dense else max(0.0, 1.0 - epsilon * raw[n]) for n in numel}


class Explicit(Allocation):
    """Per-target sparsities by module-name glob; targets no glob names get ``default``.
    Under a schedule each value is scaled by (step sparsity / final sparsity)."""

    name = "explicit"

    def __init__(self, sparsities: Mapping[str, float], default: float = 0.0) -> None:
        for key, value in sparsities.items():
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"allocation[{key!r}] = {value!r}: a sparsity must be in [0, 1)")
        self.sparsities = dict(sparsities)
        self.default = default

    def resolve(self, targets: Sequence[Target]) -> dict[str, float]:
        """Per-target sparsity; every glob must name at least one target."""
        result: dict[str, float] = {}
        for key in self.sparsities:
            if not any(fnmatch.fnmatchcase(t.module_name, key) or fnmatch.fnmatchcase(t.name, key) for t in targets):
                raise ConfigError(
                    f"allocation key {key!r} matches no target; targets are: "
                    f"{', '.join(t.module_name for t in targets[:20])}{' ...' if len(targets) > 20 else ''}"
                )
        for t in targets:
            value = self.default
            for key, sparsity in self.sparsities.items():  # last matching glob wins
                if fnmatch.fnmatchcase(t.module_name, key) or fnmatch.fnmatchcase(t.name, key):
                    value = sparsity
            result[t.name] = value
        return result

    def prune_counts(self, budget: Budget) -> dict[str, int]:
        scale = budget.sparsity / budget.final_sparsity if budget.final_sparsity > 0 else 1.0
        return self._per_target(budget, {n: s * scale for n, s in self.resolve(budget.targets).items()})

    def to_spec(self) -> dict:
        return dict(self.sparsities)

    def __repr__(self) -> str:
        return f"Explicit({self.sparsities!r}, default={self.default!r})"


_NAMED: dict[str, type[Allocation]] = {cls.name: cls for cls in (Uniform, Global, LAMPAllocation, ERK)}
ALLOCATION_NAMES = tuple(_NAMED)


def make_allocation(value: str | Mapping[str, float] | Allocation, default: float | None = None) -> Allocation:
    """``'uniform' | 'global' | 'erk' | 'lamp'``, an explicit ``{glob: sparsity}`` dict, or an instance."""
    if isinstance(value, Allocation):
        return value
    if isinstance(value, Mapping):
        return Explicit(value, default=default or 0.0)
    if value not in _NAMED:
        raise ConfigError(f"unknown allocation {value!r}; valid: {choices(_NAMED)} or a {{glob: sparsity}} dict")
    return _NAMED[value]()
