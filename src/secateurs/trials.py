"""``with secateurs.trial(model): ...``: prune, measure, and get the model back exactly.

A trial records every module of the model as it is (its class, its attributes, its parameters,
buffers and children, and a copy of every tensor's values) and, when the block ends, puts all of
it back: the very same tensor and module objects (an optimizer built earlier still points at
live parameters), with the same values, classes (a masked module's parametrized class goes) and
Hugging Face config fields. It works for every application mode and runner because it does not
ask what happened inside. Sensitivity analysis is a loop of trials.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class _ModuleState:
    module: nn.Module
    cls: type
    attributes: dict[str, Any]
    parameters: dict[str, Any]
    buffers: dict[str, Any]
    children: dict[str, Any]


def _configs(module: nn.Module) -> list[Any]:
    """Configuration objects held by a module (Hugging Face ``config``): removal edits their fields."""
    found = []
    for value in vars(module).values():
        if hasattr(value, "to_dict") and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, Tensor)):
            found.append(value)
    return found


@contextlib.contextmanager
def trial(model: nn.Module, storage: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """Run the block on ``model`` and restore it exactly afterwards, whatever the block did (prune in any
    mode, with any runner, fine-tune, run forward passes in train mode). Copies of the tensors' values
    live on ``storage`` (the CPU by default, so a GPU model's memory is not doubled)."""
    modules = list(dict.fromkeys(model.modules()))
    states = [
        _ModuleState(m, type(m), dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
        for m in modules
    ]
    configs = {id(c): (c, copy.deepcopy(vars(c))) for m in modules for c in _configs(m)}
    values: dict[int, tuple[Tensor, Tensor, bool]] = {}
    for m in modules:
        for tensor in [*m._parameters.values(), *m._buffers.values()]:
            if tensor is not None and id(tensor) not in values:
                values[id(tensor)] = (tensor, tensor.detach().to(storage, copy=True), tensor.requires_grad)
    grads = {id(t): (t, t.grad) for t, *_ in values.values() if isinstance(t, nn.Parameter)}
    try:
        yield model
    finally:
        for state in states:
            m = state.module
            m.__class__ = state.cls
            vars(m).clear()
            vars(m).update(state.attributes)
            for store, saved in ((m._parameters, state.parameters), (m._buffers, state.buffers),
                                 (m._modules, state.children)):  # fmt: skip
                store.clear()
                store.update(saved)
        for config, saved in configs.values():
            vars(config).clear()
            vars(config).update(saved)
        with torch.no_grad():
            for tensor, saved, requires_grad in values.values():
                if tensor.shape != saved.shape:  # resized in place (.data =): give it its storage back
                    tensor.data = saved.to(tensor.device)
                else:
                    tensor.copy_(saved.to(tensor.device))
                tensor.requires_grad_(requires_grad)
        for tensor, grad in grads.values():
            tensor.grad = grad
        for m in modules:
            if isinstance(m, nn.RNNBase):  # RNNs cache a flat list of their weights
                m._init_flat_weights()
