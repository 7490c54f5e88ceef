"""``mode='remove'``: scope -> granularity -> criterion -> allocation -> selection -> removal (+ solver).

The ``remove`` application mode of the one pipeline, run by the whole-model runner. Everything up
to the selection mutates nothing. The removal is one :class:`Step`, applied all or nothing with a
forward check and recorded in the model's pruning plan; a solver (FLAP's bias compensation)
adds what the removed inputs contributed on average to the consuming layers' biases.
"""

from __future__ import annotations

import inspect
import time
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PruneConfig
from ..distributed import add_over_ranks, reduce_evidence
from ..errors import DataRequiredError, ScopeError, StructureError
from ..evidence import GRADIENT_NEEDS, Need, gather, preserved
from ..guards import refuse_inference_weights
from ..layout import Layout, layout_of
from ..pipeline import Data, make_evidence, require_data
from ..scope import ScopeSpec, Target, matches, refuse_unmatched
from ..selection import keep_mask
from ..solvers.base import Solver
from . import hf, layers
from .allocate import prune_counts, select
from .criteria import GroupCriterion, as_group_criterion
from .graph import DependencyGraph, Group
from .handlers import handler_for
from .removal import apply_recorded, refuse_reparametrized
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
        if not any(matches(o, scope.include) or matches(g.name, scope.include) for o in owners):
            continue
        touched = [*g.modules, *(m for m, _ in g.blocked)]
        if scope.exclude and any(matches(m, scope.exclude) for m in touched):
            continue
        if g.blocked:
            module, reason = g.blocked[0]
            kind = type(graph.model.get_submodule(module)).__name__ if module else type(graph.model).__name__
            layout = _attention_layout_note(graph.model, module)
            raise StructureError(
                f"group {g.name!r} cannot be removed: {reason}{layout}. Either exclude it "
                f"(scope={{'exclude': [{module or g.name!r}]}}) or teach the graph this module: "
                f"secateurs.structural.register_handler({kind}, YourHandler()) (see docs/structural.md)"
            )
        if g.units:
            chosen.append(g)
    if not chosen:
        present = {g.kind for g in graph.groups if g.units}
        frozen = sorted({r for g in graph.groups if g.kind in kinds for r in g.frozen_reasons})
        seen = _attention_seen(graph.model) if "head" in kinds else ""
        raise ScopeError(
            f"nothing to remove at granularity {'+'.join(kinds)} within the scope: removable kinds in this model: "
            f"{sorted(present) or 'none'}; frozen because: {'; '.join(frozen) or 'n/a'}{seen}"
        )
    return chosen


def _attention_seen(model: nn.Module) -> str:
    """The attention modules of ``model`` and why none gave heads (for 'nothing to remove')."""
    from .handlers import handler_for
    from .hf_attention import why_not

    seen: dict[str, str] = {}
    for name, m in model.named_modules():
        if type(m).__name__.endswith("Attention") and type(m).__name__ not in seen:
            covered = handler_for(m) is not None
            seen[type(m).__name__] = f"{name!r} ({type(m).__name__}): " + (
                "handled" if covered else why_not(m) or "no handler"
            )
    if not seen:
        return "; no module whose class name ends in 'Attention' was found"
    return (
        f"; attention modules seen: {'; '.join(seen.values())}. Register a handler for such a module "
        "(secateurs.structural.register_handler, see docs/structural.md)"
    )


def _attention_layout_note(model: nn.Module, module: str) -> str:
    """For a group blocked inside an attention module: why the generic attention handler did not take it."""
    from .hf_attention import why_not

    if not module:
        return ""
    m = model.get_submodule(module)
    if not type(m).__name__.endswith("Attention"):
        return ""
    why = why_not(m) or "not a transformers module"
    return f" ({type(m).__name__} is not taken by the generic attention handler: {why})"


def consumers(groups: list[Group], modules: dict[str, nn.Module]) -> list[Target]:
    """The layers whose input columns the groups' units feed (what a removal solver compensates)."""
    found: dict[str, Target] = {}
    for g in groups:
        for view in g.ports:
            module = modules[view.port.module]
            layout = layout_of(module)
            if view.port.role == "in" and view.port.param == "weight" and layout not in (None, Layout.EMBEDDING):
                found.setdefault(view.port.module, Target(view.port.module, module, layout))
    return list(found.values())


def _evidence_targets(criterion: GroupCriterion, solver: Solver | None, groups: list[Group], modules: dict) -> list:
    """Everything the criterion and the solver can refuse before they run; the weights to gather for."""
    criterion.check_groups(groups, modules)
    targets = {t.name: t for t in criterion.targets(groups, modules)}
    criterion.validate(list(targets.values()))
    if solver is not None:
        needed = consumers(groups, modules)
        solver.validate(needed, "remove")
        for t in needed:
            targets.setdefault(t.name, t)
    return list(targets.values())


def _needs(criterion: GroupCriterion, solver: Solver | None) -> frozenset[Need]:
    return criterion.needs | (solver.needs if solver is not None else frozenset())


def score_groups(
    model: nn.Module, criterion: GroupCriterion, groups: list[Group], config: PruneConfig, data: Data
) -> tuple[GroupEvidence, dict[str, Tensor]]:
    """The criterion's unit scores per group, and the evidence (the solver reads it too)."""
    modules = dict(model.named_modules())
    solver = config.solver_
    targets = _evidence_targets(criterion, solver, groups, modules)
    needs = _needs(criterion, solver)
    require_data(needs, f"method {criterion.name!r}" + (f" with solver {solver.name!r}" if solver else ""), data)
    refuse_inference_weights(targets, criterion.name, bool(needs & GRADIENT_NEEDS))
    evidence = make_evidence(model, targets, config, data)
    with preserved(model, targets):
        gather(evidence, needs)
        if data.group is not None:  # this rank's share: every rank's sums and token counts added
            reduce_evidence(data.group, evidence.activations, evidence.hessians, f"{criterion.name} statistics")
        opts, sparsity, allocation = config.structural_, config.final_sparsity, config.allocation_

        def decide(s: dict[str, Tensor]) -> dict[str, Tensor]:  # exactly the choice remove_structures makes
            return select(groups, s, prune_counts(groups, s, allocation, sparsity, opts))

        ev = GroupEvidence(model, groups, evidence, modules, sparsity=sparsity, decide=decide,
                           solver=solver.name if solver is not None else None)  # fmt: skip
        return ev, criterion.group_scores(ev)


def compensation(
    solver: Solver, ev: GroupEvidence, removed: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(module -> bias delta, module -> new full weight)`` from the solver, for every layer that loses
    input columns (a new weight only from solvers that update the survivors, e.g. subspace reconstruction)."""
    targets = {t.module_name: t for t in consumers(ev.groups, ev.modules)}
    keep: dict[str, Tensor] = {}  # module -> its weight's keep mask (removed input columns False)
    for g in ev.groups:
        gone = removed.get(g.name)
        if gone is None or not gone.numel():
            continue
        for view in g.ports:
            if view.port.module not in targets or view.port.role != "in" or view.port.param != "weight":
                continue
            mask = keep.setdefault(view.port.module, torch.ones(targets[view.port.module].shape, dtype=torch.bool))
            mask.index_fill_(view.port.dim, torch.isin(view.index, gone).nonzero().reshape(-1), False)
    chosen = [targets[module] for module in keep]
    results = solver.solve(chosen, ev.evidence, {t.name: keep[t.module_name] for t in chosen})
    # the removed columns themselves are cut away; the survivors take the solver's new values, if any
    deltas = {t.module_name: results[t.name].bias_delta for t in chosen if results[t.name].bias_delta is not None}
    weights = {t.module_name: results[t.name].weight for t in chosen if results[t.name].weight is not None}
    return deltas, weights


def _channels(model, config, data, inputs) -> tuple[Step, list[GroupChange], dict[str, Tensor], dict[str, Tensor]]:
    opts = config.structural_
    graph = DependencyGraph(model, inputs, gqa=opts.gqa)
    groups = candidate_groups(graph, config.pattern_.kinds, config.scope_)
    criterion = as_group_criterion(config.criterion_)
    ev, scores = score_groups(model, criterion, groups, config, data)
    counts = prune_counts(groups, scores, config.allocation_, config.final_sparsity, opts)
    removed = select(groups, scores, counts)
    step = graph.step(removed)
    deltas, weights = compensation(config.solver_, ev, removed) if config.solver_ is not None else ({}, {})
    modules = ev.modules  # the model is unchanged since scoring: the step is only a plan
    for name, delta in deltas.items():
        if modules[name].bias is None:
            step.new_parameters[f"{name}.bias"] = [len(delta)]
            step.updates.setdefault(name, handler_for(modules[name]).name)
    changes = [GroupChange(g.name, g.kind, g.units, g.units - len(removed.get(g.name, [])), len(g.modules))
               for g in groups]  # fmt: skip
    return step, changes, deltas, weights


def _blocks(model, config, data) -> tuple[Step, list[str]]:
    criterion = as_group_criterion(config.criterion_)
    container, blocks = layers.find_blocks(model, config.blocks)
    n = layers.how_many(len(blocks), config.final_sparsity, config.structural_.keep_at_least)
    require_data(criterion.needs, f"method {criterion.name!r}", data)
    evidence = make_evidence(model, [], config, data)
    if data.group is not None:
        evidence.sum_over_ranks = partial(add_over_ranks, data.group, step=f"{criterion.name} block scores")
    # criteria written before ``removing`` existed keep their three-argument signature
    budget = {"removing": n} if "removing" in inspect.signature(criterion.block_scores).parameters else {}
    scores = criterion.block_scores(model, blocks, evidence, **budget)
    gone = (~keep_mask(scores.reshape(1, -1), n)).reshape(-1).nonzero().reshape(-1).tolist()
    return layers.layer_step(container, gone), [f"{container}.{i}" for i in gone]


def example_inputs_for(model: nn.Module, data: Data) -> Any:
    inputs = data.example_inputs if data.example_inputs is not None else hf.example_inputs(model)
    if inputs is None:
        raise DataRequiredError(
            "mode='remove' traces the model once: pass example_inputs=<one input batch> (or calibration=...)"
        )
    return inputs


def remove_structures(model: nn.Module, config: PruneConfig, data: Data) -> StructuralReport:
    """Run the ``remove`` mode of ``config`` on ``model`` (in place); returns what it bought."""
    opts = config.structural_
    refuse_reparametrized(model)
    inputs = example_inputs_for(model, data)
    before = measure(model, inputs)
    twin = LatencyTwin(model, inputs) if opts.latency else None  # dense copy, timed alternately with the pruned
    start = time.perf_counter()
    deltas: dict[str, Tensor] = {}
    weights: dict[str, Tensor] = {}
    if config.pattern_.kinds == ("layer",):
        step, removed_blocks = _blocks(model, config, data)
        changes = []
    else:
        step, changes, deltas, weights = _channels(model, config, data, inputs)
        removed_blocks = []
    keep = {c.module: c.keep for c in step.cuts if c.param == "bias"}

    def after(m: nn.Module, edit: Surgery) -> None:
        for name, weight in weights.items():  # a solver's updated survivors, cut as the step cut the weight
            for cut in step.cuts:
                if cut.module == name and cut.param == "weight":
                    weight = weight.index_select(cut.dim, cut.keep.to(weight.device))
            edit.assign(m.get_submodule(name), "weight", weight)
        for name, delta in deltas.items():  # bias compensation (new biases were declared in the step)
            module = m.get_submodule(name)
            bias = module.bias
            delta = delta[keep[name]] if name in keep else delta
            edit.assign(module, "bias", bias.detach() + delta.to(bias.device, bias.dtype))
        hf.sync_config(m, edit)

    apply_recorded(model, step, inputs, opts.check, after)
    seconds = time.perf_counter() - start
    return StructuralReport(changes, before, measure(model, inputs), seconds, removed_blocks, config.to_dict(),
                            latency=twin.compare(model) if twin else None)  # fmt: skip
