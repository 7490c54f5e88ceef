"""PruneConfig: every argument of a pruning run, as data, validated once.

``prune()``, ``Pruner``, ``prune_llm()`` (through :class:`~secateurs.llm.LLMPruneConfig`), recipe
files and the CLI all build one, so every front end accepts exactly the same keys with exactly
the same checks. The fields keep what the user gave; the resolved pipeline (criterion, pattern,
allocation, mode, solver, runner ...) lives beside them in fields ending in ``_``, and
:meth:`PruneConfig.to_dict` writes the resolved run as a recipe (the report records it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

# what the configuration resolves names against must be registered before it resolves one: the
# group criteria (bn_scale, fpgm, flap, shortgpt) and layer handlers live with the structural code
# they read, below this module (the removal pipeline that uses a configuration sits above it)
from . import structural  # noqa: F401  (registration)
from .allocation import Allocation, Explicit, Uniform, make_allocation
from .application import APPLICATIONS, Application
from .criteria import Criterion, make_criterion
from .errors import ConfigError, PatternError, choices
from .evidence import Need
from .granularity import Granularity, StructuralOptions, parse_granularity
from .patterns import COMPARISONS, NM, Pattern, parse_pattern
from .runner import RUNNERS, Runner
from .schedules import OneShot, Schedule, make_schedule
from .scope import ScopeSpec, Target, check_glob, target_matches
from .solvers.base import SOLVERS, Solver, make_solver
from .spec import (
    Spec,
    anything,
    either,
    fraction,
    instance,
    integer,
    is_number,
    mapping,
    one_of,
    option,
    resolved,
    spec_from,
    string,
)
from .training.regularizers import Regularizer, make_regularizer

NO_SOLVER = "none"
OVERRIDE_KEYS = ("sparsity", "pattern", "method", "method_options", "comparison")


def check_sparsity(value: Any, pattern: Pattern | Granularity, required: bool = True) -> float | None:
    """A sparsity in [0, 1), or the one an N:M pattern implies (giving both must agree)."""
    if value is not None and (not is_number(value) or not 0.0 <= value < 1.0):
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


@dataclass(frozen=True)
class Override:
    """A config group: targets matching ``glob`` are pruned with their own sparsity / pattern / method."""

    glob: str
    sparsity: float | None  # None: the run's
    pattern: Pattern
    criterion: Criterion
    comparison: str
    allocation: Allocation


@dataclass(frozen=True)
class Plan:
    """Targets pruned the same way in one run: the base configuration, or one override."""

    targets: list[Target]
    criterion: Criterion
    pattern: Pattern
    comparison: str
    allocation: Allocation
    sparsity: float  # this group's final sparsity


def _mode_names(name: str, value: Any) -> None:
    one_of(APPLICATIONS.names(), optional=True)(name, value)


@dataclass(frozen=True)
class PruneConfig(Spec):
    """Arguments of a pruning run. See the README's method tables and ``secateurs methods``.

    Args:
        method: a registered criterion name (``'magnitude'``, ``'wanda'``, ``'sparsegpt'``, ``'flap'`` ...)
            or a :class:`~secateurs.Criterion` instance.
        sparsity: final fraction of weights to remove, in [0, 1). Implied by an N:M pattern.
        pattern: ``'element'``, ``'2:4'``, ``'block:4x4'``, ``'output_channel'``, ``'input_channel'``; with
            ``mode='remove'`` a granularity: ``'channel'``, ``'head'``, ``'hidden'``, ``'layer'`` or a
            ``+`` combination (see ``docs/structural.md``).
        allocation: ``'uniform' | 'global' | 'erk' | 'lamp' | 'owl'`` (or another registered one), an
            explicit ``{module_glob: sparsity}`` dict, or an instance; None takes the method's default.
        allocation_options: options of a named allocation, e.g. OWL's ``{'m': 5, 'lam': 0.08}``.
        comparison: ``'layer'`` or ``'row'`` (rank within output rows, as Wanda); None: method default.
        scope: :class:`ScopeSpec`, a dict of its fields, or a list of include globs.
        mode: ``'mask'`` (reversible parametrization), ``'bake'`` (zeros in the weights),
            ``'reconstruct'`` (a solver updates the surviving weights) or ``'remove'`` (structural:
            tensors shrink). None: the method's default (SparseGPT reconstructs, FLAP removes), else
            ``'mask'``.
        solver: the ``reconstruct`` solver (``'sparsegpt'``, ``'bias_compensation'``) or the ``remove``
            mode's compensation (FLAP's ``'bias_compensation'``); ``'none'`` for no compensation.
            None: the method's default, else the mode's.
        solver_options: options of the solver (SparseGPT: ``blocksize``, ``dampening``, ``max_retries``).
        runner: ``'model'`` (hooks over the calibration batches on the whole model; the default) or
            ``'blocks'`` (one repeated block at a time with recomputed inputs: the layerwise LLM runner).
        blocks: qualified name of the container of repeated blocks (``'model.layers'``) for the block
            runner, ``pattern='layer'`` and OWL's layers; None: found automatically. ``''`` names the model
            itself: the children of an ``nn.Sequential`` become the blocks, so the block runner prunes any
            sequential model layer by layer with the pruned outputs feeding the next (SparseGPT's protocol).
        overrides: ``{module_glob: sparsity or {sparsity?, pattern?, method?, method_options?,
            comparison?}}``: config groups, e.g. ``{'*.mlp.*': {'pattern': '2:4'}, 'lm_head': 0}``
            (0 leaves a layer dense). The last matching glob wins.
        schedule: for :class:`Pruner`: ``{'kind': 'cubic', 'start': 0, 'end': 1000, 'every': 100}`` ...
        iterations: pruning rounds inside one ``prune()`` call, on an exponential schedule
            (SynFlow's 100); None: method default.
        method_options: keyword arguments of the criterion (e.g. ``{'norm': 2}``).
        max_batches: use at most this many calibration batches.
        seed: seeds every random choice (random criterion).
        structural: options of ``mode='remove'`` (``round_to``, ``max_ratio``, ``keep_at_least``,
            ``gqa`` ...), see :class:`secateurs.granularity.StructuralOptions`.
        regularizer: a training-time penalty :meth:`Pruner.regularize` applies (``'l1'``, ``'bn_l1'``).
        regularizer_options: its options (``strength`` ...).
    """

    #: the mode when neither the user nor the method says (the LLM front door bakes)
    default_mode: ClassVar[str] = "mask"
    #: structural options this front door sets unless the user gives them (the LLM one times nothing)
    default_structural: ClassVar[Mapping[str, Any]] = {}

    method: str | Criterion = option("magnitude", check=instance((str, Criterion), "a method name or a Criterion"))
    sparsity: float | None = option(None, check=fraction(hint=" (0.9 removes 90% of weights)"))
    pattern: str | Mapping | Pattern | None = option(None, check=anything)
    allocation: str | Mapping[str, float] | Allocation | None = option(
        None,
        check=either(
            string(optional=True),
            mapping(),
            instance(Allocation, ""),
            what="an allocation name, a {glob: sparsity} dict or an Allocation",
        ),
    )
    allocation_options: Mapping[str, Any] | None = option(None, check=mapping())
    comparison: str | None = option(None, check=one_of(COMPARISONS, optional=True))
    scope: ScopeSpec | Mapping | list | str | None = option(None, check=anything)
    mode: str | None = option(None, check=_mode_names)
    solver: str | Solver | None = option(
        None, check=either(string(optional=True), instance(Solver, ""), what="a solver name or a Solver")
    )
    solver_options: Mapping[str, Any] | None = option(None, check=mapping())
    runner: str | None = option(None, check=lambda name, value: one_of(RUNNERS.names(), optional=True)(name, value))
    blocks: str | None = option(
        None, check=instance(str, "a module name such as 'model.layers' ('': the model itself)", optional=True)
    )
    overrides: Mapping[str, Any] | None = option(None, check=mapping(keys="module-name globs"))
    schedule: Schedule | Mapping | str | None = option(None, check=anything)
    iterations: int | None = option(None, check=integer(1, optional=True))
    method_options: Mapping[str, Any] | None = option(None, check=mapping())
    max_batches: int | None = option(None, check=integer(1, optional=True))
    seed: int = option(0, check=integer())
    structural: Mapping[str, Any] | None = option(None, check=mapping())
    regularizer: str | Regularizer | None = option(
        None, check=either(string(optional=True), instance(Regularizer, ""), what="a regularizer name or instance")
    )
    regularizer_options: Mapping[str, Any] | None = option(None, check=mapping())

    # resolved views (never written back into the fields above)
    criterion_: Criterion = resolved()
    pattern_: Pattern | Granularity = resolved()
    sparsity_: float | None = resolved()
    allocation_: Allocation = resolved()
    comparison_: str = resolved()
    scope_: ScopeSpec = resolved()
    mode_: str = resolved()
    application_: Application = resolved()
    solver_: Solver | None = resolved()
    adaptive_: bool = resolved()
    runner_: Runner = resolved()
    overrides_: tuple[Override, ...] = resolved()
    schedule_: Schedule = resolved()
    structural_: StructuralOptions | None = resolved()
    regularizer_: Regularizer | None = resolved()

    # -- resolution ---------------------------------------------------------------------------------
    def _resolve(self) -> None:
        criterion = make_criterion(self.method, dict(self.method_options) if self.method_options else None)
        self._set("criterion_", criterion)
        mode = self.mode or self._default_mode(criterion)
        if mode not in criterion.modes:
            raise ConfigError(
                f"method {criterion.name!r} supports mode {choices(criterion.modes)}, not {mode!r}"
                + (f"; pass mode={criterion.modes[0]!r}" if len(criterion.modes) == 1 else "")
            )
        application = APPLICATIONS.get(mode)()
        self._set("mode_", mode)
        self._set("application_", application)
        removing = application.structural
        self._resolve_pattern(criterion, removing)
        self._resolve_allocation(criterion)
        self._resolve_solver(criterion, application)
        self._set("scope_", self._scope())
        self._set("schedule_", make_schedule(self.schedule))
        self._set("regularizer_", make_regularizer(self.regularizer, self.regularizer_options))
        self._set("overrides_", self._resolve_overrides())
        if removing:
            self._check_remove(criterion)
        else:
            self._set("structural_", None)
            if self.structural is not None:
                raise ConfigError("structural options apply only with mode='remove'")
        if self.iterations not in (None, 1) and not application.multi_round:
            advice = ("for iterative removal use secateurs.Pruner(..., mode='remove', schedule=...) in your training "
                      "loop" if removing else "exponential rounds need mode='mask' or 'bake'")  # fmt: skip
            raise ConfigError(f"mode={mode!r} prunes in one round (iterations={self.iterations}); {advice}")
        runner = RUNNERS.get(self._runner())()
        self._set("runner_", runner)
        runner.check(self)
        self.allocation_.check_run(self)

    def _default_mode(self, criterion: Criterion) -> str:
        """The mode when the user names none: the method's own (SparseGPT reconstructs), its only one (FLAP,
        ShortGPT, FPGM and BatchNorm scale remove), else the front door's (``mask``; ``bake`` for LLMs)."""
        if criterion.default_mode is not None:
            return criterion.default_mode
        return criterion.modes[0] if len(criterion.modes) == 1 else self.default_mode

    def _runner(self) -> str:
        """The runner when the user names none: the whole model."""
        return self.runner or "model"

    def _scope(self) -> ScopeSpec:
        return ScopeSpec.from_value(self.scope)

    def _resolve_pattern(self, criterion: Criterion, removing: bool) -> None:
        if removing:
            pattern: Pattern | Granularity = parse_granularity(self.pattern or criterion.default_pattern)
        else:
            pattern = parse_pattern(self.pattern)
        sparsity = check_sparsity(self.sparsity, pattern, required=False)  # unless the allocation sets it: below
        comparison = self.comparison or criterion.default_comparison
        if not removing:
            self._check_pattern(criterion, pattern)  # type: ignore[arg-type]
        self._set("pattern_", pattern)
        self._set("sparsity_", sparsity)
        self._set("comparison_", comparison)

    @staticmethod
    def _check_pattern(criterion: Criterion, pattern: Pattern) -> None:
        if criterion.patterns is not None and pattern.name not in criterion.patterns:
            raise ConfigError(
                f"method {criterion.name!r} scores whole {criterion.patterns[0]}s; use pattern="
                f"{criterion.patterns[0]!r} (got {pattern.spec()!r})"
            )

    def _resolve_allocation(self, criterion: Criterion) -> None:
        allocation = make_allocation(
            self.allocation or criterion.default_allocation, default=self.sparsity_, options=self.allocation_options
        )
        # required unless the allocation sets it, or a Pruner only drives a regularizer (learned gates, group lasso)
        if self.sparsity_ is None and allocation.implied_sparsity() is None and self.regularizer is None:
            check_sparsity(None, self.pattern_)
        self._check_allocation(allocation, self.pattern_, self.comparison_, self.sparsity_)
        self._set("allocation_", allocation)

    @staticmethod
    def _check_allocation(allocation: Allocation, pattern: Any, comparison: str, sparsity: float | None) -> None:
        """The allocation fits the pattern and comparison, and can reach ``sparsity`` (e.g. OWL's lambda bound)."""
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
        allocation.check(sparsity)

    def _resolve_solver(self, criterion: Criterion, application: Application) -> None:
        mode = self.mode_
        if self.solver == NO_SOLVER or (self.solver is None and not application.takes_solver):
            if self.solver_options:
                raise ConfigError("solver_options were given, but no solver runs in this configuration")
            if application.requires_solver:
                raise ConfigError(f"mode={mode!r} needs a solver; valid: {choices(self._solvers_for(mode))}")
            solver = None
        elif self.solver is not None:
            if not application.takes_solver:
                raise ConfigError(
                    f"mode={mode!r} takes no solver (solvers update weights in 'reconstruct' and compensate in "
                    f"'remove'); drop solver={self.solver!r}"
                )
            solver = make_solver(self.solver, self.solver_options)
        else:
            name = criterion.default_solver
            if name is None or name not in SOLVERS or mode not in SOLVERS.get(name).modes:
                name = application.default_solver
            solver = make_solver(name, self.solver_options) if name is not None else None
            if solver is None and self.solver_options:
                raise ConfigError(f"solver_options were given, but mode={mode!r} runs no solver by default")
        if solver is not None and mode not in solver.modes:
            raise ConfigError(
                f"solver {solver.name!r} serves mode {choices(solver.modes)}, not {mode!r}; "
                f"solvers for {mode!r}: {choices(self._solvers_for(mode))}"
            )
        adaptive = bool(solver is not None and application.updates_survivors and criterion.adaptive and solver.adaptive)
        if adaptive and solver.patterns is not None and self.pattern_.name not in solver.patterns:
            raise ConfigError(
                f"solver {solver.name!r} chooses {choices(solver.patterns)} masks, not {self.pattern_.spec()!r}"
            )
        if adaptive and (self.method_options or _configured(criterion)):
            options = dict(self.method_options or {}) or _public(criterion)
            raise ConfigError(
                f"method_options={options!r} configure the {criterion.name!r} criterion, which does not "
                f"run when solver {solver.name!r} chooses the masks (mode='reconstruct'); pass them as solver_options "
                f"(e.g. solver_options={{'dampening': 0.05}}), or prune with mode='mask' to use the criterion alone"
            )
        if adaptive and self.comparison is not None:
            raise ConfigError(
                f"solver {solver.name!r} chooses its mask block of columns by block of columns (the paper's adaptive "
                f"selection), so comparison={self.comparison!r} cannot apply; drop it, or prune with mode='mask' to "
                "compare within fixed groups"
            )
        if adaptive and self.allocation_.reads_scores:
            raise ConfigError(
                f"allocation {self.allocation_.name!r} ranks the criterion's scores, but {criterion.name!r} chooses "
                f"its mask while {solver.name!r} updates the weights; use allocation 'uniform', 'erk' or 'owl'"
            )
        self._set("solver_", solver)
        self._set("adaptive_", adaptive)

    @staticmethod
    def _solvers_for(mode: str) -> list[str]:
        return [name for name, cls in SOLVERS.items() if mode in cls.modes]

    def _resolve_overrides(self) -> tuple[Override, ...]:
        if not self.overrides:
            return ()
        if self.application_.structural:
            raise ConfigError(
                "overrides set a pattern or method per layer, which mode='remove' does not take (it ranks groups "
                "of coupled channels); use scope, or an explicit {glob: sparsity} allocation"
            )
        out = []
        for glob, value in self.overrides.items():
            out.append(self._override(glob, value))
        return tuple(out)

    def _override(self, glob: str, value: Any) -> Override:
        """One override, checked like the base configuration; every error names the override."""
        where = f"overrides[{glob!r}]"
        try:
            return self._check_override(where, glob, value)
        except (ConfigError, PatternError) as exc:
            if str(exc).startswith(where):
                raise
            raise type(exc)(f"{where}: {exc}") from None

    def _check_override(self, where: str, glob: str, value: Any) -> Override:
        check_glob(glob, "overrides key")
        if is_number(value) or value is None:
            value = {"sparsity": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a sparsity or a mapping of {choices(OVERRIDE_KEYS)}, got {value!r}")
        unknown = [k for k in value if k not in OVERRIDE_KEYS]
        if unknown:
            raise ConfigError(
                f"{where} has unknown key(s) {sorted(map(str, unknown))}; valid: {choices(OVERRIDE_KEYS)}"
            )
        fraction(optional=True)(f"{where}.sparsity", value.get("sparsity"))
        mapping()(f"{where}.method_options", value.get("method_options"))
        one_of(COMPARISONS, optional=True)(f"{where}.comparison", value.get("comparison"))
        if "method" in value:
            criterion = make_criterion(value["method"], dict(value.get("method_options") or {}) or None)
        elif "method_options" in value:
            criterion = make_criterion(self.criterion_.name, dict(value["method_options"]))
        else:
            criterion = self.criterion_
        if self.mode_ not in criterion.modes:
            raise ConfigError(f"method {criterion.name!r} supports mode {choices(criterion.modes)}, not {self.mode_!r}")
        if self.adaptive_ and (criterion is not self.criterion_ or "pattern" in value or "comparison" in value):
            raise ConfigError(
                f"{self.criterion_.name!r} with solver {self.solver_.name!r} chooses every mask itself; "
                "an override can set a sparsity only"
            )
        pattern = parse_pattern(value["pattern"]) if "pattern" in value else self.pattern_
        sparsity = check_sparsity(value.get("sparsity"), pattern, required=False)
        comparison = value.get("comparison") or (criterion.default_comparison if "method" in value
                                                 else self.comparison_)  # fmt: skip
        self._check_pattern(criterion, pattern)
        # an override's own sparsity is its layers' sparsity (an explicit base allocation names other values)
        own = isinstance(pattern, NM) or (value.get("sparsity") is not None and isinstance(self.allocation_, Explicit))
        allocation = Uniform() if own else self.allocation_
        if "method" in value:
            self._check_override_defaults(criterion, allocation)
        self._check_allocation(allocation, pattern, comparison, sparsity)  # OWL's bound at the override's own
        return Override(glob, sparsity, pattern, criterion, comparison, allocation)

    def _check_override_defaults(self, criterion: Criterion, allocation: Allocation) -> None:
        """An override shares the run's allocation and rounds. A method whose own defaults differ (LAMP and
        SNIP rank globally, SynFlow prunes in 100 rounds) would silently become another method under
        them, so the run must choose them explicitly (:meth:`_override` names the override)."""
        if self.allocation is None and criterion.default_allocation != allocation.name:
            raise ConfigError(
                f"method {criterion.name!r} ranks with allocation {criterion.default_allocation!r} "
                f"by default, but an override runs under the run's allocation, here {allocation.name!r}; make "
                f"{criterion.name!r} the run's method, or set allocation=... on the run to choose explicitly"
            )
        rounds = self._default_rounds(criterion)
        if self.iterations is None and rounds != self.rounds:
            raise ConfigError(
                f"method {criterion.name!r} prunes in {rounds} rounds by default, but an override runs "
                f"in the run's {self.rounds}; make {criterion.name!r} the run's method, or set iterations=... "
                "on the run to choose explicitly"
            )

    def _check_remove(self, criterion: Criterion) -> None:
        moved = {"blocks": "blocks=... (a top-level option)", "bias_compensation": "solver='bias_compensation' "
                 "(or solver='none' to turn FLAP's off)"}  # fmt: skip
        given = self.structural or {}  # a mapping: the field's check refuses anything else
        for key, where in moved.items():
            if key in given:
                raise ConfigError(f"structural.{key} moved: use {where}")
        # the front door's defaults under what the user gave
        self._set("structural_", spec_from(StructuralOptions, {**self.default_structural, **given}, "structural"))
        if not self.allocation_.sizes_groups:
            raise ConfigError(
                f"allocation {self.allocation_.name!r} sizes weight tensors, not groups of channels; use 'uniform' "
                "or 'global'"
            )
        kinds = self.pattern_.kinds
        if kinds == ("layer",) and isinstance(self.allocation_, Explicit):
            raise ConfigError(
                "pattern='layer' ranks the blocks against each other and removes the lowest-scored share of them; "
                "an explicit allocation cannot name blocks. Give one sparsity: the share of blocks to remove"
            )
        unsupported = [k for k in kinds if k not in criterion.granularities]
        if unsupported:
            hint = ("Use method='shortgpt' (block influence) or 'random'" if kinds == ("layer",)
                    else "use pattern='layer'")  # fmt: skip
            raise ConfigError(
                f"method {criterion.name!r} ranks {choices(criterion.granularities)}, not {'+'.join(unsupported)}; "
                f"{hint}"
            )

    # -- views --------------------------------------------------------------------------------------
    def _needers(self) -> list[tuple[str, frozenset[Need]]]:
        """Who in this run reads evidence: the criteria (not when the solver chooses the masks itself), the
        allocation and the solver."""
        found = []
        for criterion in {id(c): c for c in (self.criterion_, *(o.criterion for o in self.overrides_))}.values():
            if self.scores_with(criterion):
                found.append((f"method {criterion.name!r}", criterion.needs))
        found.append((f"allocation {self.allocation_.name!r}", self.allocation_.needs))
        if self.solver_ is not None:
            found.append((f"solver {self.solver_.name!r}", self.solver_.needs))
        return found

    def target_needs(self, plans: Sequence[Plan]) -> dict[str, frozenset[Need]]:
        """What each target's config group reads: its criterion (not when the solver chooses the masks), its
        allocation and the solver. Gathering only that keeps, e.g., a Hessian off the layers whose method
        does not read one."""
        solver = self.solver_.needs if self.solver_ is not None else frozenset()
        out: dict[str, frozenset[Need]] = {}
        for plan in plans:
            criterion = plan.criterion.needs if self.scores_with(plan.criterion) else frozenset()
            needs = criterion | plan.allocation.needs | solver
            out.update(dict.fromkeys((t.name for t in plan.targets), needs))
        return out

    def scores_with(self, criterion: Criterion) -> bool:
        """Whether ``criterion`` scores its targets: not where the solver chooses the masks in its place."""
        return not (self.adaptive_ and criterion is self.criterion_)

    @staticmethod
    def observed_targets(plans: Sequence[Plan]) -> list[Target]:
        """The targets an observing allocation (OWL) reads the dense model for: those it allocates."""
        return [t for plan in plans if plan.allocation.needs for t in plan.targets]

    @property
    def needs(self) -> frozenset[Need]:
        """Everything the run must gather."""
        return frozenset(n for _, needs in self._needers() for n in needs)

    def describe_needs(self, needs: frozenset[Need]) -> str:
        """Who in this configuration needs ``needs``, as the subject of a sentence ('... needs X')."""
        who = list(dict.fromkeys(name for name, own in self._needers() if own & needs))
        return " and ".join(who) if len(who) < 2 else f"{', '.join(who[:-1])} and {who[-1]} each"

    @property
    def final_sparsity(self) -> float:
        """The overall sparsity the schedule aims at."""
        if self.sparsity_ is not None:
            return self.sparsity_
        implied = self.allocation_.implied_sparsity()  # an explicit dict's largest value, a budget's
        return implied if implied is not None else 0.0

    @property
    def rounds(self) -> int:
        """Pruning rounds inside one call (the method's preset, e.g. SynFlow's 100, where rounds compose)."""
        if self.iterations is not None:
            return self.iterations
        return self._default_rounds(self.criterion_)

    def _default_rounds(self, criterion: Criterion) -> int:
        """The method's preset rounds where rounds compose in this mode, else one."""
        return criterion.default_iterations if self.application_.multi_round else 1

    def plans(self, targets: Sequence[Target]) -> list[Plan]:
        """Split ``targets`` into config groups: the base configuration and one per override (the last
        matching glob wins; an override at sparsity 0 leaves its targets dense)."""
        self.allocation_.check_targets(targets)  # a glob naming no target, a profile of another model
        owner: dict[str, Override | None] = {t.name: None for t in targets}
        for override in self.overrides_:
            matched = [t for t in targets if target_matches(t, override.glob)]
            if not matched:
                names = ", ".join(t.module_name for t in targets[:20])
                raise ConfigError(f"overrides key {override.glob!r} matches no target; targets are: {names}")
            for t in matched:
                owner[t.name] = override
        plans = []
        base = [t for t in targets if owner[t.name] is None]
        if base:
            plans.append(Plan(base, self.criterion_, self.pattern_, self.comparison_, self.allocation_,
                              self.final_sparsity))  # fmt: skip
        for override in self.overrides_:
            members = [t for t in targets if owner[t.name] is override]
            sparsity = override.sparsity if override.sparsity is not None else self.final_sparsity
            if members and sparsity > 0:
                plans.append(Plan(members, override.criterion, override.pattern, override.comparison,
                                  override.allocation, sparsity))  # fmt: skip
        return plans

    def to_dict(self) -> dict[str, Any]:
        """The resolved run as plain data (a valid recipe that rebuilds this configuration)."""
        method = self.method if isinstance(self.method, str) else self.criterion_.name
        options = dict(self.method_options or {})
        if not isinstance(self.method, str):
            options = _public(self.criterion_)
        solver = self.solver_
        solver_options = None
        if solver is not None:
            solver_options = _public(solver) or None
        return {
            "method": method,
            "sparsity": self.sparsity_,
            "pattern": self.pattern_.spec(),
            "allocation": self.allocation_.to_spec(),
            "allocation_options": self.allocation_.options() or None,
            "comparison": None if self.adaptive_ else self.comparison_,  # the solver chooses, not a fixed group
            "scope": self.scope_.to_dict(),
            "mode": self.mode_,
            "solver": solver.name if solver is not None else (NO_SOLVER if self.application_.takes_solver else None),
            "solver_options": solver_options,
            "runner": self.runner_.name,
            "blocks": self.blocks,
            "overrides": self._overrides_spec(),
            "schedule": None
            if isinstance(self.schedule_, OneShot) and self.schedule is None
            else self.schedule_.to_spec(),
            "iterations": self.rounds,
            "method_options": None if self.adaptive_ else options or None,  # the criterion does not run
            "max_batches": self.max_batches,
            "seed": self.seed,
            "structural": None if self.structural_ is None else self.structural_.to_dict(),
            "regularizer": None if self.regularizer_ is None else self.regularizer_.name,
            "regularizer_options": None if self.regularizer_ is None else self.regularizer_.options() or None,
        }

    def _overrides_spec(self) -> dict[str, Any] | None:
        if not self.overrides:
            return None
        return {glob: (dict(v) if isinstance(v, Mapping) else {"sparsity": v}) for glob, v in self.overrides.items()}


def _public(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _configured(criterion: Criterion) -> bool:
    """Was this criterion instance built with options other than its defaults?"""
    try:
        return _public(criterion) != _public(type(criterion)())
    except TypeError:  # no default construction: every instance is configured
        return True
