"""The whole-model runner: hooks over the calibration batches on the whole model, every target at once.

Scope -> config groups -> check -> (per round) gather evidence -> score -> allocate -> select ->
apply, all or nothing. ``mode='remove'`` hands over to the structural pipeline, which ranks groups
of coupled channels through the same evidence gathering.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from ..batches import check_inputs
from ..collapse import refuse_collapse
from ..config import PruneConfig
from ..evidence import gather, preserved
from ..masking import all_or_nothing
from ..pipeline import (
    Context,
    Data,
    apply,
    check,
    decide,
    layer_names,
    make_evidence,
    refuse_lower,
)
from ..progress import progress
from ..report import LayerResult, Report, RunDetails, build_report
from ..runner import implements
from ..schedules import exponential_sparsity
from ..scope import Target, resolve
from ..structural.pipeline import remove_structures


@implements("model")
def run_model(model: nn.Module, config: PruneConfig, data: Data) -> Any:
    """The whole-model runner; ``mode='remove'`` hands over to the structural pipeline."""
    if config.application_.structural:
        return remove_structures(model, config, data)
    pruning = Pruning(model, config, data)
    pruning.refuse_lower(config.final_sparsity)
    start = time.perf_counter()
    rounds = config.rounds
    with all_or_nothing(pruning.targets, config.application_.writes_weights):
        label = f"{config.criterion_.name} rounds"
        for k in progress(range(1, rounds + 1), label, data.show_progress and rounds > 1):
            step = exponential_sparsity(k, rounds, config.final_sparsity) if rounds > 1 else config.final_sparsity
            pruning.prune_to(step, round_=k)
        report = pruning.report(data.example_inputs, time.perf_counter() - start)
        if not data.allow_collapse:  # inside the block: a refusal restores the masks and weights
            refuse_collapse(report.collapsed_layers, report.connected)
        config.application_.finish(pruning.targets)
    return report


class Pruning:
    """One whole-model pruning, resolved and checked once; :meth:`prune_to` may run many times
    (rounds inside ``prune()``, or the steps of a :class:`~secateurs.Pruner` schedule)."""

    def __init__(self, model: nn.Module, config: PruneConfig, data: Data) -> None:
        self.model, self.config, self.data = model, config, data
        scoped = resolve(model, config.scope_)
        self.plans = config.plans(scoped)
        self.targets: list[Target] = [t for plan in self.plans for t in plan.targets]
        check(self.plans, config, data)
        source = "example_inputs" if data.example_inputs_given else "the first sample of the first calibration batch"
        check_inputs(model, data.example_inputs, source)  # the report runs them after the pruning
        self.needs = config.target_needs(self.plans)
        self.observed = config.observed_targets(self.plans)
        self.context = Context(all_targets={id(p): p.targets for p in self.plans})
        if config.allocation_.needs:
            self.context.layer_of = layer_names(model, self.targets, config.blocks)
        self.solved: list[LayerResult] = []
        self.allocated: dict[str, float] = {}

    def refuse_lower(self, sparsity: float) -> None:
        refuse_lower(self.plans, self.config, sparsity)

    def prune_to(self, sparsity: float, round_: int = 0) -> None:
        """Gather the evidence on the model as it is now, then score, select and apply at ``sparsity``."""
        config = self.config
        evidence = make_evidence(self.model, self.targets, config, self.data, round_)
        with preserved(self.model, self.targets):  # passes leave no trace; the pruning itself comes after
            gather(evidence, self.needs)
            if self.observed and not self.context.observed:  # observed once, on the dense model
                self.context.observed = config.allocation_.observe(self.observed, evidence, self.context.layer_of)
            decisions = decide([(p, p.targets) for p in self.plans], evidence, config, sparsity, self.context)
        self.solved, self.allocated = apply(decisions, config)

    def report(self, example_inputs: Any, seconds: float | None = None) -> Report:
        patterns = {t.name: plan.pattern for plan in self.plans for t in plan.targets}
        details = RunDetails(
            runner="model", layer_sparsities=layer_sparsities(self.allocated, self.context.layer_of),
            observed=self.context.observed, solved=self.solved, seconds=seconds,
        )  # fmt: skip
        return build_report(self.model, self.targets, patterns, example_inputs, self.config.to_dict(), details)


def layer_sparsities(allocated: dict[str, float], layer_of: dict[str, str]) -> dict[str, float]:
    """Mean allocated sparsity per layer: per block where targets belong to one, else per target."""
    per_layer: dict[str, list[float]] = {}
    for name, sparsity in allocated.items():
        per_layer.setdefault(layer_of.get(name, name), []).append(sparsity)
    return {layer: sum(v) / len(v) for layer, v in per_layer.items()}
