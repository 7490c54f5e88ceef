"""``prune(model, ..., mode='remove')``: scope -> granularity -> criterion -> allocation -> selection -> removal.

Everything up to the selection mutates nothing. The removal is one :class:`Step`,
applied all or nothing with a forward check, recorded in the model's pruning plan.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PruneConfig
from ..criteria.structural import GroupCriterion, as_group_criterion
from ..engine import Data, evidence_for
from ..errors import ConfigError, DataRequiredError, ScopeError, StructureError
from ..evidence import Need
from ..scope import ScopeSpec, _matches, refuse_unmatched
from ..selection import keep_mask
from . import hf, layers
from .allocate import prune_counts, select
from .apply import apply_steps
from .graph import DependencyGraph, Group
from .handlers import handler_for
from .plan import start_plan
from .report import GroupChange, LatencyTwin, StructuralReport, measure
from .step import Step
from .surgery import Surgery
from .units import GroupEvidence


def candidate_groups(graph: DependencyGraph, kinds: tuple[str, ...], scope: ScopeSpec) -> list[Group]:
    """Groups of the asked kinds whose producers the scope includes and which touch no excluded module.

    A group that passes through an op or module the graph cannot follow is an error, never a
    silent skip: exclude that module, or register a handler for its type."""
    names = [n for n, _ in graph.model.named_modules() if n] + [g.name for g in graph.groups]
    refuse_unmatched(scope, names, type(graph.model).__name__)  # a mistyped exclude must not prune its layer
    chosen = []
    for g in graph.groups:
        if g.kind not in kinds or (g.units == 0 and not g.blocked):
            continue
        owners = [s.owner for s in g.sources]
        if not any(_matches(o, scope.include) or _matches(g.name, scope.include) for o in owners):
            continue
        touched = [*g.modules, *(m for m, _ in g.blocked)]
        if scope.exclude and any(_matches(m, scope.exclude) for m in touched):
            continue
        if g.blocked:
            module, reason = g.blocked[0]
            kind = type(graph.model.get_submodule(module)).__name__ if module else type(graph.model).__name__
            raise StructureError(
                f"group {g.name!r} cannot be removed: {reason}. Either exclude it "
                f"(scope={{'exclude': [{module or g.name!r}]}}) or teach the graph this module: "
                f"secateurs.structural.register_handler({kind}, YourHandler()) (see docs/structural.md)"
            )
        if g.units:
            chosen.append(g)
    if not chosen:
        present = {g.kind for g in graph.groups if g.units}
        frozen = sorted({r for g in graph.groups if g.kind in kinds for r in g.frozen_reasons})
        raise ScopeError(
            f"nothing to remove at granularity {'+'.join(kinds)} within the scope: removable kinds in this model: "
            f"{sorted(present) or 'none'}; frozen because: {'; '.join(frozen) or 'n/a'}"
        )
    return chosen


def _check_evidence(criterion: GroupCriterion, groups: list[Group], modules: dict, data: Data) -> list:
    """Everything a criterion can refuse before it runs; returns the weights to gather evidence for."""
    criterion.check_groups(groups, modules)
    targets = criterion.targets(groups, modules)
    criterion.validate(targets)
    if criterion.needs - {Need.INPUT_SHAPE} and not data.batches:
        raise DataRequiredError(
            f"method {criterion.name!r} needs calibration data; pass calibration=<iterable of batches>"
        )
    return targets


def score_groups(
    model: nn.Module, criterion: GroupCriterion, groups: list[Group], config: PruneConfig, data: Data
) -> tuple[GroupEvidence, dict[str, Tensor]]:
    """The criterion's unit scores per group (and the evidence, for bias compensation)."""
    modules = dict(model.named_modules())
    targets = _check_evidence(criterion, groups, modules, data)
    with evidence_for(model, targets, criterion, config, data) as evidence:
        ev = GroupEvidence(model, groups, evidence, modules)
        return ev, criterion.group_scores(ev)


def _compensation_after(step: Step, deltas: dict[str, Tensor]):
    """Fold FLAP's bias compensation into the layers (new biases were declared in the step)."""
    keep = {c.module: c.keep for c in step.cuts if c.param == "bias"}

    def apply(model: nn.Module, edit: Surgery) -> None:
        for name, delta in deltas.items():
            module = model.get_submodule(name)
            if name in keep:
                delta = delta[keep[name]]
            bias = module.bias
            edit.assign(module, "bias", bias.detach() + delta.to(bias.device, bias.dtype))

    return apply


def _channels(model, config, data, inputs) -> tuple[Step, list[GroupChange], dict[str, Tensor]]:
    opts = config.structural_
    graph = DependencyGraph(model, inputs, gqa=opts.gqa)
    groups = candidate_groups(graph, config.pattern_.kinds, config.scope_)
    criterion = as_group_criterion(config.criterion_)
    ev, scores = score_groups(model, criterion, groups, config, data)
    counts = prune_counts(groups, scores, config.allocation_, config.final_sparsity, opts)
    removed = select(groups, scores, counts)
    step = graph.step(removed)
    compensate = opts.bias_compensation if opts.bias_compensation is not None else criterion.compensates
    if compensate and not hasattr(criterion, "compensation"):
        raise ConfigError(f"method {criterion.name!r} has no bias compensation; use method='flap'")
    deltas = criterion.compensation(ev, removed) if compensate else {}
    modules = dict(model.named_modules())
    for name, delta in deltas.items():
        if modules[name].bias is None:
            step.new_parameters[f"{name}.bias"] = [len(delta)]
            step.updates.setdefault(name, handler_for(modules[name]).name)
    changes = [GroupChange(g.name, g.kind, g.units, g.units - len(removed.get(g.name, [])), len(g.modules))
               for g in groups]  # fmt: skip
    return step, changes, deltas


def _blocks(model, config, data) -> tuple[Step, list[str]]:
    criterion = config.criterion_
    container, blocks = layers.find_blocks(model, config.structural_.blocks)
    n = layers.how_many(len(blocks), config.final_sparsity, config.structural_.keep_at_least)
    if criterion.name == "random":
        gen = torch.Generator().manual_seed(config.seed * 1_000_003)
        scores = torch.rand(len(blocks), generator=gen, dtype=torch.float64)
    else:
        scores = layers.block_influence(model, blocks, data.batches, data.show_progress)
    gone = (~keep_mask(scores.reshape(1, -1), n)).reshape(-1).nonzero().reshape(-1).tolist()
    return layers.layer_step(container, gone), [f"{container}.{i}" for i in gone]


def refuse_reparametrized(model: nn.Module) -> None:
    """Removal slices tensors in place; a mask or parametrization over a weight would be cut apart
    from it (or silently re-applied at the old shape), so both are refused up front."""
    from ..masking import masked_targets

    masked = [t.name for t in masked_targets(model)]
    if masked:
        shown = ", ".join(masked[:3]) + (f" and {len(masked) - 3} more" if len(masked) > 3 else "")
        raise StructureError(
            f"mode='remove' changes tensor shapes, but {len(masked)} weight(s) carry secateurs masks ({shown}): "
            "make them permanent first with secateurs.bake(model) (keeps the zeros), or drop them with "
            "secateurs.unmask(model)"
        )
    for name, module in model.named_modules():
        if getattr(module, "parametrizations", None):
            raise StructureError(
                f"module {name or '<root>'!r} ({type(module).__name__}) has parametrized tensors "
                f"{sorted(module.parametrizations)}, which removal cannot resize: remove them first with "
                "torch.nn.utils.parametrize.remove_parametrizations(module, name)"
            )
        orig = [n for n, _ in module.named_parameters(recurse=False) if n.endswith("_orig")]
        if orig and any(hasattr(module, n[: -len("_orig")] + "_mask") for n in orig):
            raise StructureError(
                f"module {name or '<root>'!r} ({type(module).__name__}) carries torch.nn.utils.prune masks "
                f"({', '.join(orig)}), which removal cannot resize: call torch.nn.utils.prune.remove(module, "
                "'weight') first, or prune with secateurs"
            )


def prune_structured(model: nn.Module, config: PruneConfig, data: Data) -> StructuralReport:
    opts = config.structural_
    refuse_reparametrized(model)
    inputs = data.example_inputs if data.example_inputs is not None else hf.example_inputs(model)
    if inputs is None:
        raise DataRequiredError(
            "mode='remove' traces the model once: pass example_inputs=<one input batch> (or calibration=...)"
        )
    before = measure(model, inputs)
    twin = LatencyTwin(model, inputs) if opts.latency else None  # dense copy, timed alternately with the pruned
    start = time.perf_counter()
    deltas: dict[str, Tensor] = {}
    if config.pattern_.kinds == ("layer",):
        step, removed_blocks = _blocks(model, config, data)
        changes = []
    else:
        step, changes, deltas = _channels(model, config, data, inputs)
        removed_blocks = []
    finish = _compensation_after(step, deltas) if deltas else None

    def after(m: nn.Module, edit: Surgery) -> None:
        if finish is not None:
            finish(m, edit)
        hf.sync_config(m, edit)

    plan = start_plan(model)
    apply_steps(model, [step], inputs, check=opts.check, after=after)
    plan.steps.append(step)
    seconds = time.perf_counter() - start
    return StructuralReport(changes, before, measure(model, inputs), seconds, removed_blocks, config.to_dict(),
                            latency=twin.compare(model) if twin else None)  # fmt: skip


def remove(model: nn.Module, removed: dict[str, Any], example_inputs: Any, check: bool = True, **options: Any) -> Step:
    """Remove chosen units (``{group_name: unit_indices}``) from ``model``; returns the applied step.
    Group names come from ``DependencyGraph(model, example_inputs).groups``."""
    refuse_reparametrized(model)
    graph = DependencyGraph(model, example_inputs, **options)
    step = graph.step(removed)
    plan = start_plan(model)
    apply_steps(model, [step], example_inputs, check=check, after=hf.sync_config)
    plan.steps.append(step)
    return step
