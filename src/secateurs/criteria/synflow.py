"""SynFlow: data-free, iterative conservation of synaptic flow."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..batches import logits_of, model_inputs
from ..errors import DataRequiredError
from ..evidence import Evidence, Need
from ..layout import to_canonical
from ..scope import Target
from .base import Criterion, register


def input_shape(evidence: Evidence) -> tuple[int, ...]:
    """Shape of one input sample, from ``example_inputs`` or the first calibration batch."""
    example = evidence.example_inputs
    if example is None and evidence.batches:
        example = model_inputs(evidence.batches[0])
    if not isinstance(example, Tensor) or not example.is_floating_point():
        raise DataRequiredError(
            "SynFlow needs the shape of a float input: pass example_inputs=torch.zeros(1, *shape) "
            "(it does not read the values)"
        )
    return tuple(example.shape[1:])


@register
class SynFlow(Criterion):
    """Tanaka et al. 2020 (arXiv:2006.05467). All parameters are replaced by their
    absolute values (BatchNorm in eval mode), an all-ones input is pushed through,
    and R = sum of the outputs is the synaptic flow; the score is ``|w * dR/dw|``.
    Run iteratively with an exponential schedule (100 rounds) it avoids layer
    collapse, which single-shot criteria hit at extreme sparsity."""

    name = "synflow"
    needs = frozenset({Need.INPUT_SHAPE})
    default_allocation = "global"
    default_iterations = 100
    scores_embeddings = False

    def scores(self, evidence: Evidence) -> dict[str, Tensor]:
        shape = input_shape(evidence)
        # a float64 copy: no overflow in deep nets, and the user's model is never touched
        linear = copy.deepcopy(evidence.model).double().eval()
        with torch.no_grad():
            for tensor in linear.state_dict().values():
                if tensor.is_floating_point():
                    tensor.abs_()
        modules = dict(linear.named_modules())
        params = [Target(t.module_name, modules[t.module_name], t.layout).parameter for t in evidence.targets]
        for p in linear.parameters():
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        device = params[0].device
        with torch.enable_grad():
            logits_of(linear(torch.ones((1, *shape), dtype=torch.float64, device=device))).sum().backward()
        return {
            t.name: to_canonical((p.grad * p).detach().abs(), t.layout)
            if p.grad is not None
            else to_canonical(torch.zeros_like(p), t.layout)
            for t, p in zip(evidence.targets, params)
        }
