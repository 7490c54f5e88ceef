"""Application of masks: ``mask`` (ephemeral) and ``bake`` (permanent zeros), and the mask protocol.

``mask`` registers a parametrization (``torch.nn.utils.parametrize``): the trained
tensor stays the same ``nn.Parameter`` object (so an optimizer built earlier keeps
working), ``copy.deepcopy`` works, the forward pass sees ``w * mask``, and the
gradient of a pruned entry is exactly zero, so no optimizer step can revive it.
The original values are kept, which makes masking reversible (:func:`unmask`).

``bake`` writes the zeros into the weight and removes the parametrization, so the
state_dict has exactly the original keys and loads into the unpruned class with
``strict=True``.

The mask protocol: a :class:`Gate` is any parametrization that answers "what does this weight
contribute now" (:meth:`Gate.forward`) and "what survives if it is made permanent"
(:meth:`Gate.keep`, :meth:`Gate.fold`). Binary masks (:class:`WeightMask`) are one kind; learned
gates (hard-concrete L0 gates, variational dropout, movement scores) are others. Everything below
(reports, bake, unmask, save/load, removal's refusal of masked weights) speaks to the protocol, so
a new gate needs no change here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import StateError
from .io import atomic_path
from .layout import layout_of
from .scope import Target

MODES = ("mask", "bake")


class Gate(nn.Module):
    """The mask protocol: a parametrization of one weight that decides what it contributes.

    Subclasses implement :meth:`forward` (the weight the layer computes with now, e.g. scaled by a
    stochastic gate while training) and :meth:`keep` (the boolean mask of what survives if the
    gate is made permanent now, deterministic). :meth:`fold` is the weight written by ``bake``;
    the default keeps the surviving entries unchanged.
    """

    #: module parameter order before the parametrization (removing one re-registers the weight last)
    parameter_order: tuple[str, ...] = ()

    def forward(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def keep(self) -> Tensor:
        raise NotImplementedError

    def fold(self, weight: Tensor) -> Tensor:
        """The permanent weight: surviving entries as they are, +0.0 elsewhere."""
        return torch.where(self.keep().to(weight.device), weight, 0.0)


class WeightMask(Gate):
    """The binary mask: keep where a boolean mask (a buffer) is set, +0.0 elsewhere.

    ``where`` rather than ``weight * mask``: a product writes ``-0.0`` for negative weights,
    which the compressed checkpoint would have to store as a value."""

    def __init__(self, mask: Tensor, parameter_order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.parameter_order = parameter_order

    def forward(self, weight: Tensor) -> Tensor:
        return torch.where(self.mask, weight, 0.0)

    def keep(self) -> Tensor:
        return self.mask


def gate_of(module: nn.Module, param: str) -> Gate | None:
    """The gate (binary mask or learned gate) on ``module.<param>``, or None."""
    if not parametrize.is_parametrized(module, param):
        return None
    for p in module.parametrizations[param]:
        if isinstance(p, Gate):
            return p
    return None


def _our_parametrization(module: nn.Module, param: str) -> WeightMask | None:
    gate = gate_of(module, param)
    return gate if isinstance(gate, WeightMask) else None


def current_mask(target: Target) -> Tensor | None:
    """The boolean keep-mask of ``target``'s gate (stored shape), or None if it has none."""
    gate = gate_of(target.module, target.param_name)
    return None if gate is None else gate.keep()


def attach_gate(target: Target, gate: Gate) -> Gate:
    """Put a gate (e.g. a learned one) on ``target``; refused if it already carries one."""
    existing = gate_of(target.module, target.param_name)
    if existing is not None:
        raise StateError(
            f"{target.name} already carries a {type(existing).__name__}; make it permanent with "
            "secateurs.bake(model) or drop it with secateurs.unmask(model) first"
        )
    gate.parameter_order = tuple(target.module._parameters)
    parametrize.register_parametrization(target.module, target.param_name, gate)
    return gate


def attach(target: Target, mask: Tensor) -> None:
    """Mask ``target`` (replacing an existing secateurs mask in place)."""
    mask = mask.to(device=target.parameter.device, dtype=torch.bool)
    ours = _our_parametrization(target.module, target.param_name)
    if ours is not None:
        ours.mask.copy_(mask)
        return
    attach_gate(target, WeightMask(mask))


def detach(target: Target, bake: bool) -> None:
    """Remove the gate from ``target``; ``bake`` writes what survives (:meth:`Gate.fold`) into the weight."""
    module, param = target.module, target.param_name
    gate = gate_of(module, param)
    if gate is None:
        return
    chain = module.parametrizations[param]
    folded = None
    if bake:
        with torch.no_grad():
            folded = gate.fold(chain.original.detach())
    if len(chain) == 1:
        parametrize.remove_parametrizations(module, param, leave_parametrized=False)
        _restore_order(module, gate.parameter_order)
        if folded is not None:
            with torch.no_grad():
                getattr(module, param).copy_(folded)
        return
    # other parametrizations (e.g. the user's weight norm) stay: fold ours into the original
    if folded is not None:
        with torch.no_grad():
            chain.original.copy_(folded)
    index = next(i for i, p in enumerate(chain) if p is gate)
    del chain[index]


def _restore_order(module: nn.Module, order: tuple[str, ...]) -> None:
    """Put ``module._parameters`` back in registration order, so state_dict key order is unchanged."""
    params = module._parameters
    if set(order) != set(params):
        return
    items = [(name, params[name]) for name in order]
    params.clear()
    params.update(items)


def bake_target(target: Target, mask: Tensor) -> None:
    """Zero the pruned entries for good."""
    if _our_parametrization(target.module, target.param_name) is not None:
        attach(target, mask)
        detach(target, bake=True)
        return
    with torch.no_grad():
        target.parameter.masked_fill_(~mask.to(target.parameter.device, torch.bool), 0.0)


def masked_targets(model: nn.Module) -> list[Target]:
    """Every weight of ``model`` that carries a gate (a secateurs mask or a learned gate)."""
    found = []
    for name, module in model.named_modules():
        parametrizations = getattr(module, "parametrizations", None)
        if parametrizations is None:
            continue
        for param in parametrizations:
            if gate_of(module, param) is not None:
                found.append(Target(name, module, layout_of(module), param))
    return found


def unmask(model: nn.Module) -> int:
    """Drop every mask, restoring the dense weights. Returns how many were removed."""
    targets = masked_targets(model)
    for t in targets:
        detach(t, bake=False)
    return len(targets)


def bake(model: nn.Module) -> int:
    """Make every mask permanent (zeros in the weights, original state_dict keys)."""
    targets = masked_targets(model)
    for t in targets:
        detach(t, bake=True)
    return len(targets)


@dataclass
class MaskSnapshot:
    """The mask state of some targets, to restore the model exactly after a failure."""

    masks: dict[str, Tensor | None]
    targets: Sequence[Target]

    @classmethod
    def take(cls, targets: Sequence[Target]) -> MaskSnapshot:
        masks = {}
        for t in targets:
            m = current_mask(t)
            masks[t.name] = None if m is None else m.clone()
        return cls(masks, targets)

    def restore(self) -> None:
        for t in self.targets:
            saved = self.masks[t.name]
            if saved is None:
                detach(t, bake=False)
            else:
                attach(t, saved)


def save_masks(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write every mask of ``model`` (what each gate keeps) to a safetensors file (uint8, 1 = keep), atomically."""
    targets = masked_targets(model)
    if not targets:
        raise StateError("the model carries no secateurs masks; prune it with mode='mask' first")
    tensors = {t.name: current_mask(t).to(torch.uint8).contiguous().cpu() for t in targets}
    metadata = {"format": "secateurs.masks", "version": "1", "targets": json.dumps(sorted(tensors))}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_masks(model: nn.Module, path: str | os.PathLike, mode: str = "mask") -> list[str]:
    """Re-attach masks saved by :func:`save_masks`. All names and shapes are checked
    before any module is touched. ``mode='bake'`` applies them as permanent zeros."""
    if mode not in MODES:
        raise StateError(f"unknown mode {mode!r}; valid: {MODES}")
    tensors = load_file(str(path))
    modules = dict(model.named_modules())
    plan: list[tuple[Target, Tensor]] = []
    for name, mask in tensors.items():
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            raise StateError(f"mask {name!r} in {path} names no module of this model")
        target = Target(module_name, module, layout_of(module), param)
        if tuple(mask.shape) != tuple(target.shape):
            raise StateError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the weight is {tuple(target.shape)}; "
                "the masks belong to a different architecture"
            )
        plan.append((target, mask.bool()))
    for target, mask in plan:
        if mode == "mask":
            attach(target, mask)
        else:
            bake_target(target, mask)
    return [t.name for t, _ in plan]


def effective_masks(targets: Sequence[Target]) -> Mapping[str, Tensor]:
    """Where each target's effective weight (masked, or baked) is nonzero: what really survives."""
    return {t.name: t.weight.detach() != 0 for t in targets}
