"""The stages both runners share: check -> score -> allocate -> select -> apply, all or nothing.

A runner decides *where* evidence comes from (the whole model over calibration batches, or one
block's captured inputs) and which targets are pruned together; everything else is here, once:
:func:`check` refuses what can be refused before a score is computed, :func:`decide` scores,
allocates and selects for one batch of targets and :func:`apply` carries it out; the runners wrap
that in :class:`~secateurs.masking.Rollback`, which puts the model back exactly if anything fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from .allocation import Budget, Explicit
from .application import requested_sparsity
from .batches import LossFn, checked_loss, first_sample, model_inputs, take
from .blocks import BlockDiscoveryError, block_owners, find_blocks
from .config import Plan, PruneConfig
from .errors import ConfigError, DataRequiredError, StateError
from .evidence import DATA_NEEDS, GRADIENT_NEEDS, Evidence, Need, gather, preserved
from .guards import refuse_inference_weights
from .layout import from_canonical, to_canonical
from .masking import WeightMask, current_mask, gate_of, refuse_lower_target
from .report import LayerResult
from .scope import Target
from .selection import check_finite, keep_mask
from .spec import boolean


@dataclass
class Data:
    """What the user handed over for data-needing methods."""

    batches: list[Any]
    loss_fn: LossFn | None = None
    example_inputs: Any = None
    show_progress: bool = True
    device: torch.device | None = None  # block runner: where each block is processed (None: where it lives)
    rollback: bool = True  # keep what is needed to restore the model exactly if the run fails
    example_inputs_given: bool = False  # False: taken from the calibration (messages say which)
    allow_collapse: bool = False  # accept a layer left empty / no input-output path (refused otherwise)
    group: Any = None  # distributed.Group: statistics added over its ranks, each layer solved on one (block runner)

    @classmethod
    def from_user(
        cls, config: PruneConfig, calibration: Iterable[Any] | None, loss_fn: LossFn | None, example_inputs: Any,
        show_progress: bool, allow_collapse: bool = False,
    ) -> Data:  # fmt: skip
        """Check the call's own arguments (the config checked its fields) and take the batches."""
        boolean()("progress", show_progress)
        boolean()("allow_collapse", allow_collapse)
        loss_fn = checked_loss(loss_fn)
        batches = take(calibration, config.max_batches)
        given = example_inputs is not None
        if example_inputs is None and batches:
            example_inputs = first_sample(model_inputs(batches[0]))
        return cls(batches, loss_fn, example_inputs, show_progress, example_inputs_given=given,
                   allow_collapse=allow_collapse)  # fmt: skip


@dataclass
class Context:
    """What selection sees beyond the targets pruned now: the whole run's targets per plan (ERK and
    explicit allocations size against all of them), the allocation's observations of the dense
    model (OWL) and each target's layer (block)."""

    all_targets: dict[int, Sequence[Target]] = field(default_factory=dict)  # id(plan) -> its targets
    observed: dict[str, Any] = field(default_factory=dict)
    layer_of: dict[str, str] = field(default_factory=dict)


def check(plans: Sequence[Plan], config: PruneConfig, data: Data) -> None:
    """Everything that can be refused before a single score is computed."""
    targets = [t for plan in plans for t in plan.targets]
    for plan in plans:
        for t in plan.targets:
            plan.pattern.check(t.name, t.canonical_shape, plan.comparison)
        plan.criterion.validate(list(plan.targets))
    needs = config.needs
    require_data(needs, config.describe_needs(needs & DATA_NEEDS), data)
    if Need.INPUT_SHAPE in needs and data.example_inputs is None and not data.batches:
        raise DataRequiredError(
            f"method {config.criterion_.name!r} runs data-free passes but needs the input shape; "
            "pass example_inputs=torch.zeros(1, *input_shape)"
        )
    if config.solver_ is not None:
        config.solver_.validate(targets, config.mode_)
    refuse_inference_weights(targets, config.criterion_.name, bool(needs & GRADIENT_NEEDS))
    for t in targets:
        _check_target(t, config)


def _check_target(t: Target, config: PruneConfig) -> None:
    if t.parameter.is_meta:
        raise StateError(f"{t.name} is on the meta device (no values); load the weights before pruning")
    if not t.parameter.is_floating_point():
        raise ConfigError(
            f"{t.name} holds {t.parameter.dtype} values (quantized or integer weights); prune the float model, "
            "then quantize"
        )
    gate = gate_of(t.module, t.param_name)
    if gate is not None and config.application_.updates_survivors:
        raise StateError(
            f"{t.name} carries a mask, and mode={config.mode_!r} rewrites the weights it masks; make the mask "
            "permanent first with secateurs.bake(model), or drop it with secateurs.unmask(model)"
        )
    if gate is not None and not isinstance(gate, WeightMask):
        raise StateError(
            f"{t.name} carries a {type(gate).__name__} (a learned gate); make it permanent with secateurs.bake(model) "
            "or drop it with secateurs.unmask(model) before pruning it again"
        )
    check_finite(t.weight.detach(), f"weight {t.name}")


def refuse_lower(plans: Sequence[Plan], config: PruneConfig, sparsity: float) -> None:
    """Masks only grow: a request below what the masks already prune would change nothing (both runners).
    An explicit allocation asks each target for its own value, so each target it names is checked alone
    (a target no glob names, left at a default of 0, and a target named with 0, are not asked anything:
    0 leaves a layer as it is, as an override at 0 does)."""
    for plan in plans:
        allocation = plan.allocation
        if not isinstance(allocation, Explicit):
            refuse_lower_target(plan.targets, plan_sparsity(plan, config, sparsity))
            continue
        wanted = allocation.scaled(plan.targets, sparsity, config.final_sparsity)  # a schedule's step: its share
        for t in plan.targets:
            if wanted[t.name] > 0:
                refuse_lower_target([t], wanted[t.name], f"{t.name!r}")


def require_data(needs: frozenset[Need], who: str, data: Data) -> None:
    """Refuse up front when ``who`` (the subject of the sentence) needs calibration batches that were not given."""
    missing = needs & DATA_NEEDS
    if missing and not data.batches:
        raise DataRequiredError(
            f"{who} needs calibration data ({', '.join(sorted(n.value for n in missing))}); pass "
            "calibration=<iterable of batches>, e.g. a DataLoader or a list of (inputs, targets)"
        )


def plan_sparsity(plan: Plan, config: PruneConfig, step_sparsity: float) -> float:
    """This plan's sparsity at a step: the run's step value, scaled for an override with its own target."""
    final = config.final_sparsity
    if plan.sparsity == final:
        return step_sparsity
    return plan.sparsity * step_sparsity / final if final > 0 else plan.sparsity


def _budget(
    plan: Plan, targets: Sequence[Target], sparsity: float, context: Context,
    unit_scores: dict[str, Tensor] | None, dead: dict[str, Tensor | None],
) -> Budget:  # fmt: skip
    return Budget(
        targets, sparsity, plan.sparsity, unit_scores, dead, plan.pattern, plan.comparison,
        all_targets=context.all_targets.get(id(plan), plan.targets), observed=context.observed,
        layer_of=context.layer_of,
    )  # fmt: skip


def select(
    plan: Plan, targets: Sequence[Target], scores: dict[str, Tensor], sparsity: float, context: Context
) -> tuple[dict[str, Tensor], dict[str, float] | None]:  # fmt: skip
    """Keep-masks (stored weight shape, bool) from scores: pattern units, allocation, exact selection.
    Units already pruned by an existing mask stay pruned and count toward the budget, unless the
    criterion ``reselects`` (then the masks are chosen afresh from every unit). Also returns
    the fraction the allocation set per target, when it sets one."""
    criterion, pattern, comparison = plan.criterion, plan.pattern, plan.comparison
    unit_scores: dict[str, Tensor] = {}
    dead: dict[str, Tensor | None] = {}
    alive: dict[str, Tensor | None] = {}
    for t in targets:
        score3 = scores[t.name].detach()
        check_finite(score3, f"{criterion.name} scores of {t.name}")
        if criterion.signed:  # per-batch first-order contributions: mean over batches of |unit sum|
            units = torch.stack([pattern.units(b, comparison, "sum").abs() for b in score3]).mean(0)
        else:
            units = pattern.units(score3, comparison, criterion.reduction)
        unit_scores[t.name] = units
        existing = None if criterion.reselects else current_mask(t)
        alive[t.name] = None if existing is None else to_canonical(existing, t.layout).to(units.device)
        dead[t.name] = None
        if existing is not None:
            dead[t.name] = pattern.units(alive[t.name].to(units.dtype), comparison, "max") == 0
    budget = _budget(plan, targets, sparsity, context, unit_scores, dead)
    counts = plan.allocation.prune_counts(budget)
    masks = {}
    for t in targets:
        keep_units = keep_mask(unit_scores[t.name], counts[t.name], dead[t.name])
        keep3 = pattern.expand(keep_units, t.canonical_shape, comparison)
        if alive[t.name] is not None:
            keep3 = keep3 & alive[t.name]
        masks[t.name] = from_canonical(keep3, t.layout, t.shape).to(t.parameter.device)
    return masks, plan.allocation.target_sparsities(budget)


@dataclass
class Decision:
    """What to do to some targets: the masks (or, for a solver that chooses them, only the fractions)."""

    plan: Plan
    targets: list[Target]
    evidence: Evidence  # restricted to ``targets`` (a solver reads it)
    masks: dict[str, Tensor] | None
    sparsities: dict[str, float] | None
    #: what scoring took, per target: the dampening a Hessian criterion's inverse needed (reported as a solver's)
    scored: list[LayerResult] = field(default_factory=list)


def decide(
    plans: Sequence[tuple[Plan, Sequence[Target]]], evidence: Evidence, config: PruneConfig, step_sparsity: float,
    context: Context,
) -> list[Decision]:  # fmt: skip
    """Score, allocate and select for the ``(plan, targets)`` pairs pruned now; mutates nothing."""
    decisions = []
    for plan, targets in plans:
        if not targets:
            continue
        view = replace(evidence, targets=list(targets))
        sparsity = plan_sparsity(plan, config, step_sparsity)
        if not config.scores_with(plan.criterion):
            # the solver chooses the mask as it updates the weights (SparseGPT section 3.4): only the fractions
            budget = _budget(plan, targets, sparsity, context, None, dict.fromkeys(t.name for t in targets))
            decisions.append(Decision(plan, list(targets), view, None, plan.allocation.target_sparsities(budget)))
        else:
            masks, sparsities = select(plan, targets, plan.criterion.scores(view), sparsity, context)
            scored = [LayerResult(t.name, requested_sparsity(t, masks[t.name], sparsities), *view.dampening[t.name])
                      for t in targets if t.name in view.dampening]  # fmt: skip
            decisions.append(Decision(plan, list(targets), view, masks, sparsities, scored))
    return decisions


def apply(
    decisions: Sequence[Decision], config: PruneConfig, solver: Any = None
) -> tuple[list[LayerResult], dict[str, float]]:
    """Carry out the decisions with the configuration's application mode (and solver; ``solver`` replaces
    the configuration's, e.g. by one that solves each layer on one rank). Returns the solver's
    per-layer results and the sparsity the allocation set per target (when it sets one)."""
    results: list[LayerResult] = []
    allocated: dict[str, float] = {}
    solver = config.solver_ if solver is None else solver
    for d in decisions:
        solved = config.application_.apply(d.targets, d.masks, d.evidence, solver, d.sparsities,
                                           d.plan.pattern)  # fmt: skip
        results += _merged(d.scored, solved)
        allocated.update(d.sparsities or {})
    return results, allocated


def _merged(scored: list[LayerResult], solved: list[LayerResult]) -> list[LayerResult]:
    """One result per target: the solver's, carrying the scoring's dampening and retries when scoring needed
    more (a Hessian criterion and the solver may factor the same Hessian with different dampening)."""
    by_name = {r.name: r for r in scored}
    out = []
    for r in solved:
        s = by_name.pop(r.name, None)
        if s is not None and s.retries > r.retries:
            r = replace(r, dampening=s.dampening, retries=s.retries)
        out.append(r)
    return out + list(by_name.values())


def make_evidence(model: nn.Module, targets: Sequence[Target], config: PruneConfig, data: Data, round_: int = 0):
    """An empty :class:`Evidence` for a whole-model pass over ``data`` (the runner gathers into it)."""
    return Evidence(
        model=model, targets=list(targets), batches=data.batches, loss_fn=data.loss_fn,
        example_inputs=data.example_inputs, generator=seeded(config, round_), show_progress=data.show_progress,
    )  # fmt: skip


def score_targets(
    model: nn.Module, targets: Sequence[Target], config: PruneConfig, data: Data, round_: int = 0
) -> dict[str, Tensor]:
    """The criterion's canonical ``(O, S, I)`` scores of ``targets`` on the model as it is now (its evidence
    is gathered on the whole model; nothing is changed)."""
    evidence = make_evidence(model, targets, config, data, round_)
    with preserved(model, targets):
        gather(evidence, config.criterion_.needs)
        return config.criterion_.scores(evidence)


def seeded(config: PruneConfig, round_: int) -> torch.Generator:
    """The run's generator for round ``round_`` (random criteria draw from it)."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + round_)


def layer_names(model: nn.Module, targets: Sequence[Target], blocks: str | None) -> dict[str, str]:
    """Each target's layer, as OWL counts layers: the repeated block holding it (or itself)."""
    try:
        name, found = find_blocks(model, blocks)
    except BlockDiscoveryError:
        if blocks is not None:
            raise
        return {}
    owner = block_owners(found)
    return {t.name: f"{name}.{owner[id(t.module)]}" for t in targets if id(t.module) in owner}
