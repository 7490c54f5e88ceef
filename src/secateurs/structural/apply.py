"""Applying steps with a forward check, all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import StructureError
from ..evidence import preserved
from .sizes import sync_sizes
from .step import Step, apply_step
from .surgery import Surgery
from .tracer import call_model, module_stack, outputs_of


def output_shapes(model: nn.Module, inputs: Any) -> list[tuple[int, ...]]:
    with preserved(model, []), torch.no_grad():
        model.eval()
        return [tuple(y.shape) for y in outputs_of(call_model(model, inputs))]


def forward_check(model: nn.Module, inputs: Any, expected: list[tuple[int, ...]] | None) -> None:
    """The pruned model must run and give outputs of the same shapes. Code with a hard-coded
    size (``x.view(-1, 512)``) fails here, and the error names the module that failed."""
    with preserved(model, []), torch.no_grad(), module_stack(model) as stack:
        model.eval()
        try:
            got = [tuple(y.shape) for y in outputs_of(call_model(model, inputs))]
        except Exception as exc:
            name = stack[-1] if stack else ""
            where = f"{name!r} ({type(model.get_submodule(name)).__name__})" if name else (
                f"the top-level forward of {type(model).__name__}")  # fmt: skip
            raise StructureError(
                f"the pruned model fails in {where}: {type(exc).__name__}: {exc}. Its code probably assumes the "
                "old sizes (a hard-coded shape?); the model was restored. Make that forward read sizes from its "
                "tensors, or exclude the layers feeding it from the scope"
            ) from exc
    if expected is not None and got != expected:
        raise StructureError(
            f"the pruned model's outputs changed shape ({expected} -> {got}); the model was restored. "
            "Exclude the layers that feed the outputs from the scope"
        )


def apply_steps(
    model: nn.Module, steps: Sequence[Step], example_inputs: Any = None, check: bool = True, after=None
) -> Surgery:
    """Apply ``steps``; ``after(model, edit)`` runs last (HF config updates). If anything fails,
    including the forward check on ``example_inputs``, the model is restored exactly."""
    expected = output_shapes(model, example_inputs) if check and example_inputs is not None else None
    edit = Surgery(model)
    try:
        for step in steps:
            apply_step(model, step, edit)
        sync_sizes(model, edit)
        if after is not None:
            after(model, edit)
        if expected is not None:
            forward_check(model, example_inputs, expected)
    except BaseException:
        edit.undo()
        raise
    edit.commit()
    return edit
