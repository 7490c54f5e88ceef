"""PruneConfig: every argument of a pruning run, as data, validated once.

``prune()``, ``Pruner`` and recipe files all build one of these, so the three
front ends accept exactly the same keys with exactly the same checks, and a run
is reproducible from ``config.to_dict()`` (which the report records).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .allocation import Allocation, Explicit, Uniform, make_allocation
from .criteria import Criterion, make_criterion
from .errors import ConfigError, RecipeError, choices
from .masking import MODES
from .patterns import NM, Pattern, parse_pattern
from .schedules import OneShot, Schedule, make_schedule
from .scope import ScopeSpec

if TYPE_CHECKING:
    from typing_extensions import Self


def check_sparsity(value: Any, pattern: Pattern, required: bool = True) -> float | None:
    """A sparsity in [0, 1), or the one an N:M pattern implies (giving both must agree)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {value!r} (0.9 removes 90% of weights)")
    if isinstance(pattern, NM):
        implied = 1.0 - pattern.density
        if value is not None and abs(value - implied) > 1e-9:
            raise ConfigError(
                f"pattern {pattern.spec()} implies sparsity {implied:g}, but sparsity={value} was given; drop one"
            )
        return implied
    if value is None and required:
        raise ConfigError("sparsity is required (a number in [0, 1)), unless pattern is N:M")
    return None if value is None else float(value)


class RecipeConfig:
    """What every run configuration shares: strict construction from plain data (recipes),
    and a stable name. Subclasses are dataclasses with ``to_dict()`` returning a valid recipe."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short stable hash naming this configuration (OpenLTH-style)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> Self:
        """Strict: unknown keys are an error naming them and listing the valid ones."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a mapping of keys to values, got {type(data).__name__}")
        unknown = set(data) - set(cls.keys())
        if unknown:
            raise RecipeError(f"{source} has unknown key(s) {sorted(unknown)}; valid keys: {choices(cls.keys())}")
        try:
            return cls(**data)
        except RecipeError:
            raise
        except ConfigError as exc:
            raise RecipeError(f"{source}: {exc}") from exc


@dataclass(frozen=True)
class PruneConfig(RecipeConfig):
    """Arguments of a pruning run. See the README's method table for ``method`` names.

    Args:
        method: criterion name (``'magnitude'``, ``'wanda'``, ``'synflow'`` ...) or instance.
        sparsity: final fraction of weights to remove, in [0, 1). Implied by an N:M pattern.
        pattern: ``'element'``, ``'2:4'``, ``'block:4x4'``, ``'output_channel'``, ``'input_channel'``.
        allocation: ``'uniform' | 'global' | 'erk' | 'lamp'`` or ``{module_glob: sparsity}``;
            None takes the method's default (e.g. global for SNIP).
        comparison: ``'layer'`` or ``'row'`` (rank within output rows, as Wanda); None: method default.
        scope: :class:`ScopeSpec`, a dict of its fields, or a list of include globs.
        mode: ``'mask'`` (reversible parametrization), ``'bake'`` (zeros in the weights) or
            ``'remove'`` (structural: tensors shrink; ``pattern`` is then ``'channel'``, ``'head'``,
            ``'hidden'``, ``'layer'`` or a ``+`` combination, see ``docs/structural.md``).
        schedule: for :class:`Pruner`: ``{'kind': 'cubic', 'start': 0, 'end': 1000, 'every': 100}`` ...
        iterations: pruning rounds inside one ``prune()`` call, on an exponential schedule
            (SynFlow's 100); None: method default.
        method_options: keyword arguments of the criterion (e.g. ``{'norm': 2}``).
        max_batches: use at most this many calibration batches.
        seed: seeds every random choice (random criterion).
        structural: options of ``mode='remove'`` (``round_to``, ``max_ratio``, ``keep_at_least``,
            ``gqa`` ...), see :class:`secateurs.structural.StructuralOptions`.
    """

    method: str | Criterion = "magnitude"
    sparsity: float | None = None
    pattern: str | Mapping | Pattern | None = None  # None: 'element' (mask/bake), 'channel' (remove)
    allocation: str | Mapping[str, float] | Allocation | None = None
    comparison: str | None = None
    scope: ScopeSpec | Mapping | list | str | None = None
    mode: str = "mask"
    schedule: Schedule | Mapping | str | None = None
    iterations: int | None = None
    method_options: Mapping[str, Any] | None = None
    max_batches: int | None = None
    seed: int = 0
    structural: Mapping[str, Any] | None = None
    # resolved views, filled by __post_init__
    criterion_: Criterion = field(init=False, repr=False, compare=False)
    pattern_: Pattern = field(init=False, repr=False, compare=False)
    allocation_: Allocation = field(init=False, repr=False, compare=False)
    scope_: ScopeSpec = field(init=False, repr=False, compare=False)
    schedule_: Schedule = field(init=False, repr=False, compare=False)
    structural_: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        criterion = make_criterion(self.method, dict(self.method_options) if self.method_options else None)
        removing = self.mode == "remove"
        if criterion.structural_only and not removing:
            raise ConfigError(f"method {criterion.name!r} scores whole structures; use mode='remove'")
        if removing:
            from .structural.options import StructuralOptions, parse_granularity

            pattern = parse_granularity(self.pattern)
            object.__setattr__(self, "structural_", StructuralOptions.from_value(self.structural))
        else:
            pattern = parse_pattern(self.pattern)
            object.__setattr__(self, "structural_", None)
            if self.structural is not None:
                raise ConfigError("structural options apply only with mode='remove'")
        sparsity = self._check_sparsity(pattern)
        allocation = make_allocation(self.allocation or criterion.default_allocation, default=sparsity)
        comparison = self.comparison or criterion.default_comparison
        if self.mode not in (*MODES, "remove"):
            raise ConfigError(f"unknown mode {self.mode!r}; valid: {choices((*MODES, 'remove'))}")
        if allocation.needs_single_group and (comparison == "row" or isinstance(pattern, NM)):
            raise ConfigError(
                f"allocation {allocation.name!r} ranks whole layers against each other, but "
                f"{'N:M' if isinstance(pattern, NM) else 'comparison=row'} compares within small "
                "groups; use allocation='uniform' (or 'erk' / a dict)"
            )
        if isinstance(pattern, NM) and type(allocation) is not Uniform:
            raise ConfigError(
                f"N:M fixes the sparsity of every group; allocation must be 'uniform', not {allocation!r}"
            )
        if criterion.patterns is not None and pattern.name not in criterion.patterns and not removing:
            raise ConfigError(
                f"method {criterion.name!r} scores whole {criterion.patterns[0]}s; use pattern="
                f"{criterion.patterns[0]!r} (got {pattern.spec()!r})"
            )
        if self.iterations is not None and (not isinstance(self.iterations, int) or self.iterations < 1):
            raise ConfigError(f"iterations must be a positive integer, got {self.iterations!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise ConfigError(f"max_batches must be a positive integer, got {self.max_batches!r}")
        set_ = object.__setattr__
        set_(self, "sparsity", sparsity)
        set_(self, "comparison", comparison)
        set_(self, "criterion_", criterion)
        set_(self, "pattern_", pattern)
        set_(self, "allocation_", allocation)
        set_(self, "scope_", ScopeSpec.from_value(self.scope))
        set_(self, "schedule_", make_schedule(self.schedule))
        if removing:
            from .structural.options import check_remove

            check_remove(self)

    def _check_sparsity(self, pattern: Pattern) -> float | None:
        return check_sparsity(self.sparsity, pattern, required=not isinstance(self.allocation, Mapping))

    @property
    def final_sparsity(self) -> float:
        """The overall sparsity the schedule aims at."""
        if self.sparsity is not None:
            return self.sparsity
        explicit = self.allocation_
        return max(explicit.sparsities.values(), default=0.0) if isinstance(explicit, Explicit) else 0.0

    @property
    def rounds(self) -> int:
        """Pruning rounds inside one call."""
        return self.iterations or self.criterion_.default_iterations

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a valid recipe) that rebuilds this config."""
        method = self.method if isinstance(self.method, str) else self.criterion_.name
        options = dict(self.method_options or {})
        if not isinstance(self.method, str):
            options = {k: v for k, v in vars(self.criterion_).items() if not k.startswith("_")}
        return {
            "method": method,
            "sparsity": self.sparsity,
            "pattern": self.pattern_.spec(),
            "allocation": self.allocation_.to_spec(),
            "comparison": self.comparison,
            "scope": self.scope_.to_dict(),
            "mode": self.mode,
            "schedule": None
            if isinstance(self.schedule_, OneShot) and self.schedule is None
            else self.schedule_.to_spec(),
            "iterations": self.rounds,
            "method_options": options or None,
            "max_batches": self.max_batches,
            "seed": self.seed,
            "structural": None if self.structural_ is None else self.structural_.to_dict(),
        }
