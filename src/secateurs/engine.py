"""The pipeline of one pruning step: evidence -> scores -> units -> allocation -> selection.

:func:`check` runs every validation that does not need scores; :func:`compute_masks`
mutates nothing; :func:`apply_masks` is the only writer, and :func:`pruning`
restores the model exactly if anything in between fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .allocation import Budget
from .batches import LossFn
from .config import PruneConfig
from .criteria import Criterion
from .errors import DataRequiredError
from .evidence import Evidence, Need, gather, preserved
from .guards import refuse_inference_weights
from .layout import from_canonical, to_canonical
from .masking import MaskSnapshot, attach, bake_target, current_mask
from .scope import Target
from .selection import check_finite, keep_mask


@dataclass
class Data:
    """What the user handed over for data-needing criteria."""

    batches: list[Any]
    loss_fn: LossFn | None = None
    example_inputs: Any = None
    show_progress: bool = True


def check(targets: Sequence[Target], config: PruneConfig, data: Data) -> None:
    """Everything that can be refused before a single score is computed."""
    criterion, pattern = config.criterion_, config.pattern_
    for t in targets:
        pattern.check(t.name, t.canonical_shape, config.comparison)
    criterion.validate(list(targets))
    needs = criterion.needs
    if needs & {Need.ACTIVATIONS, Need.GRADIENTS, Need.DATA_PASSES} and not data.batches:
        raise DataRequiredError(
            f"method {criterion.name!r} needs calibration data ({', '.join(sorted(n.value for n in needs))}); "
            "pass calibration=<iterable of batches>, e.g. a DataLoader or a list of (inputs, targets)"
        )
    if Need.INPUT_SHAPE in needs and data.example_inputs is None and not data.batches:
        raise DataRequiredError(
            f"method {criterion.name!r} runs data-free passes but needs the input shape; "
            "pass example_inputs=torch.zeros(1, *input_shape)"
        )
    refuse_inference_weights(targets, criterion.name, bool(needs & {Need.GRADIENTS, Need.BATCH_GRADIENTS}))
    for t in targets:
        check_finite(t.weight.detach(), f"weight {t.name}")


@contextlib.contextmanager
def evidence_for(
    model: nn.Module, targets: Sequence[Target], criterion: Criterion, config: PruneConfig, data: Data, round_: int = 0
) -> Iterator[Evidence]:
    """Gather what ``criterion`` needs for ``targets``; score inside the block: the model's buffers,
    grads, flags and RNG are restored when it ends (scoring may run passes too, e.g. GraSP)."""
    evidence = Evidence(
        model=model,
        targets=targets,
        batches=data.batches,
        loss_fn=data.loss_fn,
        example_inputs=data.example_inputs,
        generator=torch.Generator().manual_seed(config.seed * 1_000_003 + round_),
        show_progress=data.show_progress,
    )
    with preserved(model, targets):
        gather(evidence, criterion.needs)
        yield evidence


def score_targets(
    model: nn.Module, targets: Sequence[Target], config: PruneConfig, data: Data, round_: int = 0
) -> dict[str, Tensor]:
    """Run the criterion: gather its evidence, return canonical ``(O, S, I)`` scores per target."""
    with evidence_for(model, targets, config.criterion_, config, data, round_) as evidence:
        return config.criterion_.scores(evidence)


def select_masks(
    targets: Sequence[Target], scores: dict[str, Tensor], config: PruneConfig, sparsity: float
) -> dict[str, Tensor]:
    """Keep-masks (stored weight shape, bool) from scores: pattern units, allocation, exact selection.
    Units already pruned by an existing mask stay pruned and count toward the budget."""
    criterion, pattern, comparison = config.criterion_, config.pattern_, config.comparison
    unit_scores: dict[str, Tensor] = {}
    dead: dict[str, Tensor | None] = {}  # None: no mask yet, nothing dead
    alive: dict[str, Tensor | None] = {}
    for t in targets:
        score3 = scores[t.name].detach()
        check_finite(score3, f"{criterion.name} scores of {t.name}")
        if criterion.signed:  # per-batch first-order contributions: mean over batches of |unit sum|
            units = torch.stack([pattern.units(b, comparison, "sum").abs() for b in score3]).mean(0)
        else:
            units = pattern.units(score3, comparison, criterion.reduction)
        unit_scores[t.name] = units
        existing = current_mask(t)
        alive[t.name] = None if existing is None else to_canonical(existing, t.layout).to(units.device)
        if existing is not None:
            dead[t.name] = pattern.units(alive[t.name].to(units.dtype), comparison, "max") == 0
        else:
            dead[t.name] = None

    budget = Budget(targets, sparsity, config.final_sparsity, unit_scores, dead, pattern)
    counts = config.allocation_.prune_counts(budget)

    masks = {}
    for t in targets:
        keep_units = keep_mask(unit_scores[t.name], counts[t.name], dead[t.name])
        keep3 = pattern.expand(keep_units, t.canonical_shape, comparison)
        if alive[t.name] is not None:
            keep3 = keep3 & alive[t.name]
        masks[t.name] = from_canonical(keep3, t.layout, t.shape).to(t.parameter.device)
    return masks


def compute_masks(
    model: nn.Module, targets: Sequence[Target], config: PruneConfig, sparsity: float, data: Data, round_: int = 0
) -> dict[str, Tensor]:
    """Score then select; mutates nothing."""
    return select_masks(targets, score_targets(model, targets, config, data, round_), config, sparsity)


def apply_masks(targets: Sequence[Target], masks: dict[str, Tensor], bake: bool = False) -> None:
    for t in targets:
        if bake:
            bake_target(t, masks[t.name])
        else:
            attach(t, masks[t.name])


@contextlib.contextmanager
def pruning(targets: Sequence[Target]) -> Iterator[None]:
    """All-or-nothing: on any exception the targets' masks are put back as they were."""
    snapshot = MaskSnapshot.take(targets)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
