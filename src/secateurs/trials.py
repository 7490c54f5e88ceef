"""``with secateurs.trial(model): ...``: prune, measure, and get the model back exactly.

A trial records every module of the model as it is (its class, its attributes, its parameters,
buffers and children, a copy of every tensor's values, dtype and device, and of every gradient)
and, when the block ends, puts all of it back: the very same tensor, gradient and module objects
(an optimizer built earlier still points at live parameters), with the same values, dtypes,
devices, classes (a masked module's parametrized class goes) and configuration fields. It works
for every application mode and runner because it does not ask what happened inside. Sensitivity
analysis is a loop of trials.

What counts as a configuration is decided by type (:func:`_config_types`), not by sniffing for a
``to_dict`` method: a configuration's fields are put back one by one on the same object, so every
module that shares it (a composite model's ``config.text_config`` is its language model's
``config``) still shares it afterwards. Any other object a module holds is put back by reference,
as it was, but its contents are not copied, with one exception: the lists, dicts and sets a module or
a configuration holds directly (hook tables, the non-persistent buffer set, a config's list of layer
types) get their contents back (after the tensors, so a tensor is restored whatever happens), because
torch and user code edit those in place; a subclass of one (an immutable fx list, a transformers
``ModelOutput``) is put back by reference only.

A masked module's class is torch's per-module parametrized class, and torch edits that class in place
(removing the last parametrization of a tensor deletes the class's property for it; adding one adds a
property), so a trial also restores the properties of every parametrized class it saw.
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import ConfigError
from .spec import Spec


@dataclass
class _ModuleState:
    """A module's class and attributes; its ``_parameters``, ``_buffers`` and ``_modules`` are plain dicts
    among them, so their contents come back with every other container's (:func:`_contents`)."""

    module: nn.Module
    cls: type
    attributes: dict[str, Any]


_CONTAINERS = (list, dict, OrderedDict, set)  # exactly these: a subclass may refuse changes (fx's immutable
# collections, transformers' ModelOutput) or mean something else, and is put back by reference only


def _contents(holders: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    """A shallow copy of every plain list, dict and set the holders' attributes hold directly, each once."""
    found: dict[int, tuple[Any, Any]] = {}
    for attributes in holders:
        for value in attributes.values():
            if type(value) in _CONTAINERS and id(value) not in found:
                found[id(value)] = (value, value.copy())
    return list(found.values())


def _refill(container: Any, saved: Any) -> None:
    """Give a list, dict or set its saved contents back, keeping the object (handles hold it)."""
    if isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


def _class_properties(modules: list[nn.Module]) -> list[tuple[type, dict[str, Any]]]:
    """The attributes of each parametrized class the modules have: torch adds and deletes properties there."""
    classes = {id(type(m)): type(m) for m in modules if parametrize.is_parametrized(m)}
    return [(cls, dict(vars(cls))) for cls in classes.values()]


def _restore_class(cls: type, saved: dict[str, Any]) -> None:
    for name in [n for n in vars(cls) if n not in saved]:
        delattr(cls, name)
    for name, value in saved.items():
        if vars(cls).get(name) is not value:
            setattr(cls, name, value)


@dataclass
class _TensorState:
    """A tensor's object, values (a copy on the trial's storage), device and flag, and its gradient's."""

    tensor: Tensor
    values: Tensor
    device: torch.device
    requires_grad: bool
    grad: Tensor | None
    grad_values: Tensor | None
    grad_device: torch.device | None

    @classmethod
    def of(cls, tensor: Tensor, storage: torch.device | str) -> _TensorState:
        grad = tensor.grad if tensor.is_leaf else None  # only a leaf accumulates a .grad
        return cls(
            tensor, tensor.detach().to(storage, copy=True), tensor.device, tensor.requires_grad, grad,
            None if grad is None else grad.detach().to(storage, copy=True), None if grad is None else grad.device,
        )  # fmt: skip


def _config_types() -> tuple[type, ...]:
    """The types whose fields pruning edits and a trial therefore restores one by one.

    transformers' ``PreTrainedConfig``: removal writes the pruned sizes into it. It is looked up in
    ``sys.modules``, never imported (no object can be one before transformers' configuration module is
    loaded, and importing transformers takes seconds). secateurs' own :class:`~secateurs.spec.Spec`:
    its resolved views (fields ending in ``_``) are written after construction. Duck typing
    (``hasattr(value, "to_dict")``) would also catch unrelated objects, and miss a config without it.
    """
    found: list[type] = [Spec]
    configuration_utils = sys.modules.get("transformers.configuration_utils")
    for name in ("PreTrainedConfig", "PretrainedConfig"):  # transformers 5 / 4 spelling
        config_type = getattr(configuration_utils, name, None)
        if isinstance(config_type, type):
            found.append(config_type)
            break
    return tuple(found)


def _configs(modules: list[nn.Module]) -> list[Any]:
    """Every configuration object reachable from the modules' attributes, nested ones (a config's
    ``text_config``, configs inside lists and dicts) included, each once."""
    types = _config_types()
    found: dict[int, Any] = {}
    seen: set[int] = set()
    pending: list[Any] = [value for m in modules for value in vars(m).values()]
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        if isinstance(value, types):
            seen.add(id(value))
            found[id(value)] = value
            pending.extend(vars(value).values())
        elif isinstance(value, (list, tuple, dict)):
            seen.add(id(value))
            pending.extend(value.values() if isinstance(value, dict) else value)
    return list(found.values())


def _put_back(tensor: Tensor, values: Tensor, device: torch.device) -> None:
    """Give ``tensor`` its saved values, dtype, device and shape, keeping the object."""
    saved = (values.shape, values.dtype, device, values.layout)
    if (tensor.shape, tensor.dtype, tensor.device, tensor.layout) != saved:
        tensor.data = values.to(device)  # resized (.data =) or converted (.half(), .to()): new storage, same object
    else:
        tensor.copy_(values)


def _restore_tensors(states: list[_TensorState]) -> None:
    with torch.no_grad():
        for state in states:  # unhooked first: a .grad must match its tensor's dtype and shape when set
            if state.tensor.is_leaf:
                state.tensor.grad = None
        for state in states:
            _put_back(state.tensor, state.values, state.device)
            state.tensor.requires_grad_(state.requires_grad)
            if state.grad is not None:  # the same .grad object (code may hold it), its own values back
                assert state.grad_values is not None and state.grad_device is not None
                _put_back(state.grad, state.grad_values, state.grad_device)
                state.tensor.grad = state.grad


@contextlib.contextmanager
def trial(model: nn.Module, storage: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """Run the block on ``model`` and restore it exactly afterwards, whatever the block did (prune in any
    mode, with any runner, fine-tune, backpropagate, convert with ``.half()`` or ``.to()``, run forward
    passes in train mode). Copies of the tensors' values live on ``storage`` (the CPU by default, so a
    GPU model's memory is not doubled). A gradient that was None is None again."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"trial() restores a torch.nn.Module, got {type(model).__name__}")
    modules = list(dict.fromkeys(model.modules()))
    states = [_ModuleState(m, type(m), dict(vars(m))) for m in modules]
    configs = [(c, dict(vars(c))) for c in _configs(modules)]  # field by field, on the same objects
    contents = _contents([state.attributes for state in states] + [fields for _, fields in configs])
    classes = _class_properties(modules)
    tensors: dict[int, _TensorState] = {}
    for m in modules:
        for tensor in [*m._parameters.values(), *m._buffers.values()]:
            if tensor is not None and id(tensor) not in tensors:
                tensors[id(tensor)] = _TensorState.of(tensor, storage)
    try:
        yield model
    finally:
        for state in states:
            m = state.module
            m.__class__ = state.cls
            vars(m).clear()
            vars(m).update(state.attributes)
        for config, fields in configs:
            vars(config).clear()
            vars(config).update(fields)
        for cls, properties in classes:
            _restore_class(cls, properties)
        _restore_tensors(list(tensors.values()))
        for container, saved in contents:
            _refill(container, saved)
        for m in modules:
            if isinstance(m, nn.RNNBase):  # RNNs cache a flat list of their weights
                m._init_flat_weights()
