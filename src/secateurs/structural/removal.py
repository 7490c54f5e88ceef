"""Removal by hand: ``remove(model, {group: units}, example_inputs)``, and the refusal every removal starts with.

Below the configuration, so the structural package exports it without importing the pipeline that
resolves configurations (:mod:`secateurs.structural.pipeline`, the ``remove`` mode of the one
pipeline, builds on these).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import StructureError
from ..guards import outside_inference_mode
from ..masking import WeightMask, gate_of, masked_targets
from . import hf
from .apply import apply_steps
from .graph import DependencyGraph
from .plan import record_step, start_plan
from .step import Step


def refuse_reparametrized(model: nn.Module) -> None:
    """Removal slices tensors in place; a mask or parametrization over a weight would be cut apart
    from it (or silently re-applied at the old shape), so both are refused up front."""
    targets = masked_targets(model)
    learned = [(t.name, type(gate_of(t.module, t.param_name)).__name__) for t in targets
               if not isinstance(gate_of(t.module, t.param_name), WeightMask)]  # fmt: skip
    if learned:
        shown = ", ".join(f"{n} ({kind})" for n, kind in learned[:3]) + (
            f" and {len(learned) - 3} more" if len(learned) > 3 else ""
        )
        raise StructureError(
            f"mode='remove' changes tensor shapes, but {len(learned)} weight(s) carry learned gates ({shown}): "
            "convert them first with secateurs.bake(model) (folds each gate's test-time decision into the weight), "
            "then secateurs.training.remove_zero_groups(model, example_inputs) or prune(..., mode='remove')"
        )
    masked = [t.name for t in targets]
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


@outside_inference_mode
def remove(model: nn.Module, removed: dict[str, Any], example_inputs: Any, check: bool = True, **options: Any) -> Step:
    """Remove chosen units (``{group_name: unit_indices}``) from ``model``; returns the applied step.
    Group names come from ``DependencyGraph(model, example_inputs).groups``."""
    refuse_reparametrized(model)
    graph = DependencyGraph(model, example_inputs, **options)
    step = graph.step(removed)
    apply_recorded(model, step, example_inputs, check, hf.sync_config)
    return step


def apply_recorded(model: nn.Module, step: Step, example_inputs: Any, check: bool, after: Any) -> None:
    """Apply ``step`` and record it in the model's pruning plan, only once it has really been applied (a
    refused removal leaves no plan behind)."""
    plan = start_plan(model)
    apply_steps(model, [step], example_inputs, check=check, after=after)
    record_step(model, plan, step)
