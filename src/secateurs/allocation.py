"""Allocation: how much each target loses.

Every allocator answers one question: for each target, how many units does each of its
comparison groups lose at this step? Selection then takes that many of the lowest-scoring
units, so global ranking and per-layer budgets share one code path. Allocators that set a
fraction per target (uniform, ERK, explicit, OWL) also say that fraction
(:meth:`Allocation.target_sparsities`), which is what an adaptive solver (SparseGPT) prunes to.

An allocation may read evidence of the *dense* model before anything is pruned (OWL's outlier
ratios): it declares ``needs`` and the runner calls :meth:`Allocation.observe` first, once for
the whole model (whole-model runner) or once per block (block runner).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .analysis.budget import parse_budget, solve_budget
from .analysis.profile import DEFAULT_GRID, SensitivityProfile, check_grid, check_metric
from .criteria.activation import Wanda
from .criteria.magnitude import lamp_normalize
from .errors import ConfigError, StateError, choices
from .evidence import Evidence, Need
from .patterns import Pattern
from .registry import Registry
from .scope import Target, check_glob, target_matches
from .selection import global_prune_counts
from .spec import is_number

ALLOCATIONS: Registry[type[Allocation]] = Registry("allocation")


@dataclass
class Budget:
    """What an allocator sees for one step."""

    targets: Sequence[Target]  # the targets pruned now (one block's, in the block runner)
    sparsity: float  # overall sparsity asked for at this step
    final_sparsity: float  # the run's final sparsity (to scale explicit per-layer values)
    unit_scores: dict[str, Tensor] | None  # (groups, units) per target; None when nothing was scored
    dead: dict[str, Tensor | None]  # (groups, units) bool: units already pruned; None: none are
    pattern: Pattern
    comparison: str = "layer"
    all_targets: Sequence[Target] = ()  # every target of the run (ERK sizes layers against all of them)
    observed: dict[str, Any] = field(default_factory=dict)  # what observe() gathered on the dense model
    layer_of: dict[str, str] = field(default_factory=dict)  # target name -> layer (block) it belongs to

    def units_per_group(self, target: Target) -> int:
        if self.unit_scores is not None:
            return self.unit_scores[target.name].shape[1]
        probe = torch.empty(target.canonical_shape, device="meta")
        return self.pattern.units(probe, self.comparison).shape[1]


class Allocation:
    """Base class: override :meth:`target_sparsities` (a fraction per target) or :meth:`prune_counts`."""

    name: ClassVar[str] = ""
    #: ranks units of every target together, so it needs all targets' scores at once
    needs_single_group: ClassVar[bool] = False
    #: reads the criterion's scores (False: sizes layers from shapes or observations only)
    reads_scores: ClassVar[bool] = False
    #: can size groups of coupled channels (mode='remove')
    sizes_groups: ClassVar[bool] = True
    #: evidence of the dense model it reads in :meth:`observe`
    needs: ClassVar[frozenset[Need]] = frozenset()

    def observe(self, targets: Sequence[Target], evidence: Evidence, layer_of: Mapping[str, str]) -> dict[str, Any]:
        """Read the dense model's evidence for ``targets`` (before any pruning); returns observations."""
        return {}

    def check(self, sparsity: float | None) -> None:
        """Refuse a sparsity this allocation cannot reach, before anything runs."""

    def check_targets(self, targets: Sequence[Target], kind: str = "target", hint: str = "") -> None:
        """Refuse targets this allocation cannot size (checked once, before anything is pruned)."""

    def check_run(self, config: Any) -> None:
        """Refuse a run (a resolved :class:`~secateurs.PruneConfig`) this allocation cannot serve; model-free,
        called once when the configuration resolves."""

    def implied_sparsity(self) -> float | None:
        """The run's final sparsity when the allocation sets it itself (no ``sparsity`` given), else None."""
        return None

    def target_sparsities(self, budget: Budget) -> dict[str, float] | None:
        """The fraction of units each target loses, or None for allocators that only rank."""
        return None

    def prune_counts(self, budget: Budget) -> dict[str, int]:
        """Units each comparison group of each target loses."""
        sparsities = self.target_sparsities(budget)
        if sparsities is None:
            raise NotImplementedError(f"{type(self).__name__} must implement target_sparsities() or prune_counts()")
        return {
            t.name: budget.pattern.units_to_prune(budget.units_per_group(t), sparsities[t.name]) for t in budget.targets
        }

    def to_spec(self) -> str | dict:
        return self.name

    def options(self) -> dict[str, Any]:
        """Constructor options (``allocation_options``) that rebuild this allocation."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


ALLOCATIONS.base = Allocation


@ALLOCATIONS.register
class Uniform(Allocation):
    """Every target at the same sparsity."""

    name = "uniform"

    def target_sparsities(self, budget: Budget) -> dict[str, float]:
        return {t.name: budget.sparsity for t in budget.targets}


@ALLOCATIONS.register
class Global(Allocation):
    """One threshold over all targets' scores (the criterion must be comparable across layers)."""

    name = "global"
    needs_single_group = True
    reads_scores = True

    def _scores(self, budget: Budget) -> dict[str, Tensor]:
        assert budget.unit_scores is not None
        return budget.unit_scores

    def prune_counts(self, budget: Budget) -> dict[str, int]:
        numel = {t.name: budget.pattern.unit_numel(t.canonical_shape) for t in budget.targets}
        return global_prune_counts(self._scores(budget), numel, budget.dead, budget.sparsity)


@ALLOCATIONS.register
class LAMPAllocation(Global):
    """Global ranking of LAMP-normalised scores (Lee et al. 2021, arXiv:2010.07611) decides
    each layer's budget; the criterion's own scores then pick the units in each layer."""

    name = "lamp"

    def _scores(self, budget: Budget) -> dict[str, Tensor]:
        assert budget.unit_scores is not None
        return {
            name: lamp_normalize(s if budget.dead[name] is None else s.masked_fill(budget.dead[name], 0.0))
            for name, s in budget.unit_scores.items()
        }


@ALLOCATIONS.register
class ERK(Allocation):
    """Erdos-Renyi-Kernel (Evci et al. 2020, arXiv:1911.11134): density proportional to
    ``sum(shape) / prod(shape)``, scaled to the overall budget, layers capped at dense."""

    name = "erk"
    sizes_groups = False  # it sizes weight tensors from their shapes, not groups of channels

    def target_sparsities(self, budget: Budget) -> dict[str, float]:
        every = erk_sparsities(budget.all_targets or budget.targets, budget.sparsity)
        return {t.name: every[t.name] for t in budget.targets}


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
            if not isinstance(key, str):
                raise ConfigError(f"allocation keys are module-name globs (strings), got {key!r}")
            check_glob(key, "allocation key")
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"allocation[{key!r}] = {value!r}: a sparsity must be a number in [0, 1)")
        self.sparsities = {k: float(v) for k, v in sparsities.items()}
        self.default = default

    def check_targets(self, targets: Sequence[Target], kind: str = "target", hint: str = "") -> None:
        """Every glob must name at least one target of the run (checked once, before the run splits its
        targets into config groups: a glob may name targets of an override's group). ``kind`` says what
        the targets are (structural removal allocates over groups of channels), ``hint`` how they are named."""
        for key in self.sparsities:
            if not any(target_matches(t, key) for t in targets):
                raise ConfigError(
                    f"allocation key {key!r} matches no {kind}{hint}; {kind}s are: "
                    f"{', '.join(t.module_name for t in targets[:20])}{' ...' if len(targets) > 20 else ''}"
                )

    def resolve(self, targets: Sequence[Target]) -> dict[str, float]:
        """Per-target sparsity: the last glob naming a target wins; targets no glob names get ``default``."""
        result: dict[str, float] = {}
        for t in targets:
            value = self.default
            for key, sparsity in self.sparsities.items():
                if target_matches(t, key):
                    value = sparsity
            result[t.name] = value
        return result

    def scaled(self, targets: Sequence[Target], sparsity: float, final_sparsity: float) -> dict[str, float]:
        """Each target's value at a step of ``sparsity`` toward ``final_sparsity``: its share of the value."""
        scale = sparsity / final_sparsity if final_sparsity > 0 else 1.0
        return {name: value * scale for name, value in self.resolve(targets).items()}

    def target_sparsities(self, budget: Budget) -> dict[str, float]:
        return self.scaled(budget.targets, budget.sparsity, budget.final_sparsity)

    def implied_sparsity(self) -> float | None:
        return max(self.sparsities.values(), default=0.0)

    def to_spec(self) -> dict:
        return dict(self.sparsities)

    def __repr__(self) -> str:
        return f"Explicit({self.sparsities!r}, default={self.default!r})"


@ALLOCATIONS.register
class OWL(Allocation):
    """Outlier-weighted layerwise sparsity (Yin et al. 2023, arXiv:2310.05175): layers holding more
    outliers are pruned less.

    The outlier ratio ``D_l`` of a layer (a transformer block: all its pruned weights together) is the
    fraction of Wanda scores ``|W_ij| * ||X_j||`` above ``m`` times the layer's mean score, measured
    on the dense model. Densities ``2 * lam * (D_l - min D) / (max D - min D)`` are shifted to
    average ``1 - sparsity``, so layer sparsities span ``sparsity +- lam`` and average to the target.
    The paper uses ``m = 5`` and ``lam = 0.08`` for LLaMA. Layers are the model's repeated blocks
    (``layers='blocks'``), or each weight tensor (``layers='targets'``, also used when the model has
    no repeated blocks).
    """

    name = "owl"
    needs = frozenset({Need.ACTIVATIONS})
    sizes_groups = False  # outlier ratios of weight tensors, not of groups of channels
    LAYERS: ClassVar[tuple[str, ...]] = ("blocks", "targets")

    def __init__(self, m: float = 5.0, lam: float = 0.08, layers: str = "blocks") -> None:
        if not is_number(m) or not m > 0:
            raise ConfigError(f"allocation_options.m (OWL's outlier threshold) must be a positive number, got {m!r}")
        if not is_number(lam) or lam < 0:
            raise ConfigError(f"allocation_options.lam (OWL's lambda) must be a number >= 0, got {lam!r}")
        if layers not in self.LAYERS:
            raise ConfigError(f"allocation_options.layers must be one of {choices(self.LAYERS)}, got {layers!r}")
        self.m, self.lam, self.layers = float(m), float(lam), layers

    def options(self) -> dict[str, Any]:
        return {"m": self.m, "lam": self.lam, "layers": self.layers}

    def check(self, sparsity: float | None) -> None:
        if sparsity is not None:
            check_lambda(self.lam, sparsity)

    def layer_key(self, target: Target, layer_of: Mapping[str, str]) -> str:
        return layer_of.get(target.name, target.name) if self.layers == "blocks" else target.name

    def observe(self, targets: Sequence[Target], evidence: Evidence, layer_of: Mapping[str, str]) -> dict[str, Any]:
        scores = Wanda().scores(evidence)
        layers: dict[str, list[Tensor]] = {}
        for t in targets:
            layers.setdefault(self.layer_key(t, layer_of), []).append(scores[t.name])
        return {layer: outlier_ratio(parts, self.m) for layer, parts in layers.items()}

    def target_sparsities(self, budget: Budget) -> dict[str, float]:
        ratios = budget.observed
        if not ratios:
            raise ConfigError("OWL needs the outlier ratios of the dense model; the runner observed none")
        sizes = dict.fromkeys(ratios, 0)
        for t in budget.all_targets or budget.targets:  # the weights this allocation spreads its budget over
            sizes[self.layer_key(t, budget.layer_of)] += t.numel
        spread = owl_sparsities(list(ratios.values()), budget.sparsity, self.lam, list(sizes.values()))
        layer_sparsity = dict(zip(ratios, spread))
        return {t.name: layer_sparsity[self.layer_key(t, budget.layer_of)] for t in budget.targets}


@ALLOCATIONS.register
class Sensitivity(Allocation):
    """Per-target sparsities from a measured sensitivity profile, under a budget: the exact multiple-choice
    knapsack over the profile's options (SPDY, arXiv:2201.13096; OBC, arXiv:2208.11580; HALP's latency
    knapsack, arXiv:2110.10811), see :mod:`secateurs.analysis.budget`.

    ``profile`` is a :class:`~secateurs.analysis.SensitivityProfile` or the path of one saved as JSON;
    ``budget`` is None (the run's ``sparsity``) or one of ``{'sparsity': s}``, ``{'params': n}`` (whole-model
    parameters left), ``{'macs': n}`` or ``{'latency': r}`` (a ratio of the dense model's latency measured in
    the profile). A budget other than the run's sparsity replaces it, so ``sparsity`` must then be omitted.
    The profile must cover exactly the run's targets with the same shapes (refused otherwise, naming the
    first mismatch); a profile entry may be a block holding several targets, which all get its sparsity.

    Without ``profile`` the front doors (``prune()``, ``Pruner``, ``prune_llm()``, ``secateurs prune``)
    measure one on the model before anything is pruned, with the run's own method, options and calibration
    (:func:`secateurs.analysis.measured.measure_profile`): ``sparsities`` is the grid (default 0.1 ... 0.95),
    ``metric`` the analysis metric (``'loss'``), ``local`` scores blocks by their reconstruction error (the
    default with ``runner='blocks'``), ``out`` a directory that keeps the cells (resumable) and
    ``profile.json``. The run's configuration then holds the measured profile.
    """

    name = "sensitivity"
    #: how a missing profile is measured (allocation_options without ``profile``)
    MEASURE_OPTIONS: ClassVar[tuple[str, ...]] = ("sparsities", "metric", "local", "out")

    def __init__(
        self,
        profile: Any = None,
        budget: Mapping[str, Any] | None = None,
        sparsities: Sequence[float] | None = None,
        metric: str | None = None,
        local: bool | None = None,
        out: str | os.PathLike | None = None,
    ) -> None:
        measure = {"sparsities": sparsities, "metric": metric, "local": local, "out": out}
        if profile is not None:
            profile = self._profile(profile, [k for k, v in measure.items() if v is not None])
        else:
            sparsities = check_grid(sparsities, "allocation_options.sparsities") if sparsities is not None else None
            if metric is not None:
                check_metric(metric, "allocation_options.metric")
            if local is not None and not isinstance(local, bool):
                raise ConfigError(f"allocation_options.local must be True or False, got {local!r}")
            if out is not None and not isinstance(out, (str, os.PathLike)):
                raise ConfigError(f"allocation_options.out must be a directory path, got {type(out).__name__}")
        self.profile: SensitivityProfile | None = profile
        self.sparsities, self.metric, self.local, self.out = sparsities, metric, local, out
        self.budget = None if budget is None else dict(budget)
        if budget is not None:
            parse_budget(budget, None)
        self._solved: dict[tuple[str, ...], dict[str, float]] = {}

    @staticmethod
    def _profile(profile: Any, measuring: Sequence[str]) -> SensitivityProfile:
        if measuring:
            raise ConfigError(
                f"allocation_options {', '.join(measuring)} say how to measure a profile, but a profile was given; "
                "drop them, or drop profile to measure one on this model"
            )
        if isinstance(profile, (str, os.PathLike)):
            profile = SensitivityProfile.load(profile)
        elif isinstance(profile, Mapping):
            profile = SensitivityProfile.from_dict(profile)
        elif not isinstance(profile, SensitivityProfile):
            raise ConfigError(
                "allocation_options.profile must be a SensitivityProfile or the path of one (JSON), got "
                f"{type(profile).__name__}; compute one with secateurs.analysis.sensitivity(model, ...), or leave "
                "it out to measure one on the fly"
            )
        if profile.missing():
            target, sparsity = profile.missing()[0]
            raise ConfigError(
                f"the sensitivity profile is unfinished: {len(profile.missing())} cells missing, the first "
                f"{target!r} at {sparsity:g}; resume the analysis (same --out) to finish it"
            )
        return profile

    def with_profile(self, profile: SensitivityProfile) -> Sensitivity:
        """This allocation (same budget) with ``profile``: what the run allocates by once one is measured."""
        return Sensitivity(profile, self.budget)

    def options(self) -> dict[str, Any]:
        if self.profile is not None:  # plain data: the run's recipe rebuilds this allocation
            return {"profile": self.profile.to_dict(), "budget": self.budget}
        measure = {k: getattr(self, k) for k in self.MEASURE_OPTIONS if getattr(self, k) is not None}
        return {"budget": self.budget, **{k: str(v) if k == "out" else v for k, v in measure.items()}}

    def to_spec(self) -> str:
        return self.name

    def __repr__(self) -> str:
        if self.profile is None:
            return f"Sensitivity(<measured on the fly: {self.options()}>)"
        entries = f"<{len(self.profile.entries)} entries of a {self.profile.model}>"
        return f"Sensitivity(profile={entries}, budget={self.budget!r})"

    def check(self, sparsity: float | None) -> None:
        if self.budget is not None and "sparsity" not in self.budget and sparsity is not None:
            raise ConfigError(
                f"allocation_options.budget {self.budget} sets how much is pruned, so sparsity={sparsity} would be "
                "ignored; drop sparsity (or use budget={'sparsity': ...})"
            )
        if self.budget is not None and "sparsity" in self.budget and sparsity is not None:
            raise ConfigError("give the sparsity once: as sparsity= or as allocation_options.budget, not both")
        if self.budget is None and sparsity is None:
            raise ConfigError("allocation 'sensitivity' needs a sparsity, or allocation_options.budget")

    def check_run(self, config: Any) -> None:
        """A profile measured on the fly prunes each cell as the run will: refuse what a cell cannot mirror."""
        if self.profile is not None:
            return
        if config.overrides_:
            raise ConfigError(
                "overrides give some layers their own method or pattern, which one on-the-fly sensitivity profile "
                "cannot measure; measure it with secateurs.analysis.sensitivity(...) and pass "
                "allocation_options={'profile': ...}, or drop overrides"
            )
        if self.budget is not None and "latency" in self.budget and not config.application_.structural:
            raise ConfigError(
                "a latency budget needs measured latencies, which only channel removal changes: use mode='remove' "
                "(masks do not change latency), or a params / macs / sparsity budget"
            )
        if self.local and config.runner_.name != "blocks":
            raise ConfigError(
                "allocation_options.local=True scores each repeated block by its reconstruction error, which needs "
                "runner='blocks'; drop local (the whole-model metric) or prune with runner='blocks'"
            )
        if self.local and self.metric is not None:
            raise ConfigError(
                f"allocation_options.local=True scores blocks by their reconstruction error, so metric="
                f"{self.metric!r} would be ignored; drop one of them"
            )

    def measures_locally(self, runner: str) -> bool:
        """Whether an on-the-fly profile scores blocks by their reconstruction error: asked, or by default under
        the block runner (which never sees the loss either) unless a metric is named."""
        return self.local if self.local is not None else (runner == "blocks" and self.metric is None)

    def implied_sparsity(self) -> float | None:
        if self.budget is None:
            return None
        if "sparsity" in self.budget:
            return float(self.budget["sparsity"])
        return max(self.profile.grid if self.profile is not None else (self.sparsities or DEFAULT_GRID))

    def check_targets(self, targets: Sequence[Target], kind: str = "target", hint: str = "") -> None:
        if self.profile is not None:  # a profile still to measure is measured on these very targets
            self.profile.check_targets(targets)

    def target_sparsities(self, budget: Budget) -> dict[str, float]:
        """The knapsack solves the final budget once; a schedule's step gets each target's share of its final
        value (step / final sparsity), as an explicit allocation does, so masks only grow toward it."""
        if self.profile is None:
            raise StateError(
                "allocation 'sensitivity' has no profile yet: the front doors (prune(), Pruner, prune_llm()) measure "
                "it before the run; a runner called directly needs allocation_options={'profile': ...}"
            )
        every = list(budget.all_targets or budget.targets)
        key = tuple(t.name for t in every)
        if key not in self._solved:  # the block runner asks once per block: solve the whole model once
            owner = self.profile.check_targets(every)
            kind, value = parse_budget(self.budget, budget.final_sparsity)
            allocated = solve_budget(self.profile, kind, value)
            self._solved[key] = {t.name: allocated.sparsities[owner[t.name].name] for t in every}
        scale = budget.sparsity / budget.final_sparsity if budget.final_sparsity > 0 else 1.0
        return {t.name: self._solved[key][t.name] * scale for t in budget.targets}


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """Fraction of entries whose score exceeds ``m`` times the mean over all of ``scores``."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(
    ratios: Sequence[float], sparsity: float, lam: float, sizes: Sequence[int] | None = None
) -> list[float]:
    """Per-layer sparsities from outlier ratios, spanning ``2 * lam``; their mean weighted by the layers'
    ``sizes`` (weights pruned; equal when None) is ``sparsity``, so the model loses exactly that share
    of its weights. The paper's layers (LLaMA blocks) are all one size, where this is its plain mean."""
    check_lambda(lam, sparsity)
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return [sparsity] * len(r)
    n = torch.ones_like(r) if sizes is None else torch.tensor(list(sizes), dtype=torch.float64)
    density = (r - r.min()) / spread * (2 * lam)
    density = density - (density * n).sum() / n.sum() + (1.0 - sparsity)
    out = [float(1.0 - d) for d in density]
    bad = [(i, s) for i, (s, size) in enumerate(zip(out, n.tolist())) if size > 0 and not 0.0 <= s < 1.0]
    if bad:
        raise ConfigError(
            f"OWL lambda={lam} at sparsity {sparsity:g} would give layer {bad[0][0]} a sparsity of {bad[0][1]:.3f} "
            "(the layers differ in size, so the budget-preserving shift is uneven); lower lambda"
        )
    return out


def check_lambda(lam: float, sparsity: float) -> None:
    """Every layer's sparsity must stay in [0, 1): lambda < min(S, 1 - S)."""
    bound = min(sparsity, 1.0 - sparsity)
    if lam < 0 or (lam > 0 and lam >= bound):
        raise ConfigError(
            f"OWL lambda={lam} must be in [0, {bound:g}) at sparsity {sparsity:g} (lambda < min(S, 1 - S)), "
            "so every layer's sparsity stays in [0, 1)"
        )


def make_allocation(
    value: str | Mapping[str, float] | Allocation,
    default: float | None = None,
    options: Mapping[str, Any] | None = None,
) -> Allocation:
    """A registered name (``'uniform' | 'global' | 'erk' | 'lamp' | 'owl'`` ...) with its options, an
    explicit ``{glob: sparsity}`` dict, or an instance."""
    if isinstance(value, Mapping):
        if options:
            raise ConfigError("allocation_options do not apply to an explicit {glob: sparsity} allocation")
        return Explicit(value, default=default or 0.0)
    if isinstance(value, str) and value not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {value!r}; valid: {choices(ALLOCATIONS)} or a {{glob: sparsity}} dict")
    return ALLOCATIONS.build(value, options, "allocation_options")
