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
a new gate needs no change here. A weight held by several modules (tied) carries the same gate in
every holder.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import CheckpointError, ConfigError, ScopeError, StateError
from .guards import outside_inference_mode
from .io import atomic_path
from .loading import read_safetensors
from .scope import Target, parameter_holders, prunable_target, target_of

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

    def detached(self, module: nn.Module) -> None:
        """The gate has just left ``module`` (bake, unmask): drop whatever it installed there (hooks)."""


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
    """Put a gate (e.g. a learned one) on ``target``, in every module that holds its weight (one gate
    object, so tied holders can never disagree); refused if the weight already carries one."""
    existing = gate_of(target.module, target.param_name)
    if existing is not None:
        raise StateError(
            f"{target.name} already carries a {type(existing).__name__}; make it permanent with "
            "secateurs.bake(model) or drop it with secateurs.unmask(model) first"
        )
    for _, module, param in target.users:
        gate.parameter_order = tuple(module._parameters)
        parametrize.register_parametrization(module, param, gate)
    return gate


def attach(target: Target, mask: Tensor) -> None:
    """Mask ``target`` in every module that holds its weight (replacing an existing secateurs mask
    in place). The holders share one mask tensor, so they can never disagree."""
    mask = mask.to(device=target.parameter.device, dtype=torch.bool)
    existing = gate_of(target.module, target.param_name)
    if existing is not None and not isinstance(existing, WeightMask):
        raise StateError(
            f"{target.name} carries a {type(existing).__name__} (a learned gate); make it permanent with "
            "secateurs.bake(model) or drop it with secateurs.unmask(model) before masking it"
        )
    shared = current_mask(target)
    if shared is not None:
        shared.copy_(mask)
    else:
        # a tensor of its own: never an alias of the caller's, never an inference-mode tensor
        # (autograd saves the mask for backward, which an inference tensor refuses)
        with torch.inference_mode(False):
            shared = mask.clone()
    for _, module, param in target.users:
        ours = _our_parametrization(module, param)
        if ours is None:
            order = tuple(module._parameters)
            parametrize.register_parametrization(module, param, WeightMask(shared, order))
        elif ours.mask is not shared:
            ours.mask = shared  # a holder masked separately before: from now on the one shared mask


def detach(target: Target, bake: bool) -> None:
    """Remove the gate from every holder of ``target``; ``bake`` writes what survives
    (:meth:`Gate.fold`) into the weight (once: the holders share the tensor)."""
    if bake:
        check_foldable(target)
    for _, module, param in target.users:
        _detach_one(module, param, bake)
        bake = False  # the shared tensor already holds the zeros


def check_foldable(target: Target) -> None:
    """Baking writes the gate's decision into the stored tensor, which is right only when the gate reads
    that tensor directly: a user parametrization applied *before* it (weight = gate(P(original))) would
    need P inverted. Refused, before anything is written."""
    for name, module, param in target.users:
        gate = gate_of(module, param)
        if gate is None:
            continue
        chain = module.parametrizations[param]
        first = chain[0]
        if first is not gate:
            where = f"{name}.{param}" if name else param
            raise StateError(
                f"{where} is parametrized by {type(first).__name__} before its mask, so the mask cannot be written "
                f"into the stored weight; remove that parametrization first "
                f"(torch.nn.utils.parametrize.remove_parametrizations(module, {param!r})), or keep the mask"
            )


def _detach_one(module: nn.Module, param: str, bake: bool) -> None:
    gate = gate_of(module, param)
    if gate is None:
        return
    chain = module.parametrizations[param]
    folded = None
    if bake:
        with torch.no_grad():
            folded = gate.fold(chain.original.detach())
    gate.detached(module)
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
    """Zero the pruned entries for good (in the one tensor every holder uses)."""
    if current_mask(target) is not None:
        attach(target, mask)
        detach(target, bake=True)
        return
    with torch.no_grad():
        target.parameter.masked_fill_(~mask.to(target.parameter.device, torch.bool), 0.0)


def masked_targets(model: nn.Module) -> list[Target]:
    """Every weight of ``model`` that carries a gate (a secateurs mask or a learned gate), once per
    tensor: holders of a tied weight form one target."""
    holders = parameter_holders(model)
    found: list[Target] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        parametrizations = getattr(module, "parametrizations", None)
        if parametrizations is None:
            continue
        for param in parametrizations:
            if gate_of(module, param) is None:
                continue
            target = target_of(model, name, param, holders)
            if id(target.parameter) not in seen:
                seen.add(id(target.parameter))
                found.append(target)
    return found


@outside_inference_mode
def unmask(model: nn.Module) -> int:
    """Drop every mask, restoring the dense weights. Returns how many were removed."""
    targets = masked_targets(model)
    for t in targets:
        detach(t, bake=False)
    return len(targets)


@outside_inference_mode
def bake(model: nn.Module) -> int:
    """Make every mask permanent (zeros in the weights, original state_dict keys). All or nothing: every
    mask is checked to be foldable before the first is written."""
    targets = masked_targets(model)
    for t in targets:
        check_foldable(t)
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


class Rollback:
    """All or nothing: the masks, and (for modes that write them) the weights and biases of every target
    saved so far, put back exactly on failure. Copies live on the CPU."""

    def __init__(self, weights: bool) -> None:
        self.weights = weights
        self._masks: list[MaskSnapshot] = []
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}

    def save(self, targets: Sequence[Target]) -> None:
        self._masks.append(MaskSnapshot.take(targets))
        if not self.weights:
            return
        for t in targets:
            biases = [getattr(module, "bias", None) for _, module, _ in t.users]  # a solver corrects every holder
            for tensor in (t.parameter, *biases):
                if isinstance(tensor, Tensor) and id(tensor) not in self._saved:
                    self._saved[id(tensor)] = (tensor, tensor.detach().to("cpu", copy=True))

    def restore(self) -> None:
        for snapshot in reversed(self._masks):
            snapshot.restore()
        with torch.no_grad():
            for tensor, saved in self._saved.values():
                tensor.copy_(saved.to(tensor.device))


@contextlib.contextmanager
def all_or_nothing(targets: Sequence[Target], weights: bool) -> Iterator[Rollback]:
    """Save ``targets`` now; on any exception inside the block put them back and re-raise."""
    rollback = Rollback(weights)
    rollback.save(targets)
    try:
        yield rollback
    except BaseException:
        rollback.restore()
        raise


MASK_FORMAT = "secateurs.masks"


def save_masks(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write every mask of ``model`` (what each gate keeps) to a safetensors file (uint8, 1 = keep),
    atomically; a tied weight's mask is stored once, under its first holder's name."""
    targets = masked_targets(model)
    if not targets:
        raise StateError("the model carries no secateurs masks; prune it with mode='mask' first")
    tensors = {t.name: current_mask(t).to(torch.uint8).contiguous().cpu() for t in targets}
    tied = {t.name: t.tied_names for t in targets if t.tied}
    metadata = {"format": MASK_FORMAT, "version": "1", "targets": json.dumps(sorted(tensors)), "tied": json.dumps(tied)}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def _read_mask_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The masks of a file written by :func:`save_masks`, refused unless whole and boolean."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != MASK_FORMAT:
        raise CheckpointError(f"{path} is not a secateurs masks file (format={metadata.get('format')!r})")
    try:
        listed = json.loads(metadata["targets"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} does not list the masks it should hold; it is corrupted") from exc
    if not isinstance(listed, list) or sorted(map(str, listed)) != sorted(tensors):
        missing = sorted(set(map(str, listed)) - set(tensors)) if isinstance(listed, list) else []
        raise CheckpointError(
            f"{path} holds {len(tensors)} mask(s) but was saved with {len(listed)}"
            f"{f' (missing {missing[:5]})' if missing else ''}; it is incomplete or edited"
        )
    for name, mask in tensors.items():
        if mask.dtype not in (torch.uint8, torch.bool) or (mask.dtype == torch.uint8 and bool((mask > 1).any())):
            raise CheckpointError(
                f"mask {name!r} in {path} is not boolean (dtype {mask.dtype}, values other than 0 and 1); "
                "masks say keep (1) or prune (0), nothing in between"
            )
    return tensors


@outside_inference_mode
def load_masks(model: nn.Module, path: str | os.PathLike, mode: str = "mask") -> list[str]:
    """Re-attach masks saved by :func:`save_masks`, all or nothing: the file, every name (a weight
    secateurs prunes), shape and value is checked before any module is touched, and a failure while
    applying puts the model back. ``mode='bake'`` applies them as permanent zeros."""
    if mode not in MODES:
        raise StateError(f"unknown mode {mode!r}; valid: {MODES}")
    tensors = _read_mask_file(path)
    holders = parameter_holders(model)
    plan: dict[int, tuple[Target, Tensor]] = {}
    for name, mask in tensors.items():
        try:
            target = prunable_target(model, name, holders)
        except ScopeError as exc:
            raise StateError(f"mask {name!r} in {path} does not fit this model: {exc}") from None
        if tuple(mask.shape) != tuple(target.shape):
            raise StateError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the weight is {tuple(target.shape)}; "
                "the masks belong to a different architecture"
            )
        earlier = plan.get(id(target.parameter))
        if earlier is not None and not torch.equal(earlier[1], mask.bool()):
            raise StateError(f"masks {earlier[0].name!r} and {name!r} in {path} differ, but the weight is tied")
        plan[id(target.parameter)] = (target, mask.bool())
    targets = [t for t, _ in plan.values()]
    with all_or_nothing(targets, weights=mode == "bake"):
        for target, mask in plan.values():
            if mode == "mask":
                attach(target, mask)
            else:
                bake_target(target, mask)
    return [t.name for t in targets]


def refuse_lower_target(targets: Sequence[Target], sparsity: float, what: str = "the scope") -> None:
    """Masks only grow (pruned units stay pruned and count toward the budget), so asking for less
    than the targets' current sparsity would silently change nothing: say so instead."""
    masks = [current_mask(t) for t in targets]
    if all(m is None for m in masks):
        return
    pruned = sum(int((~m).sum()) for m in masks if m is not None)
    current = pruned / max(sum(t.numel for t in targets), 1)
    if current > sparsity + 1e-9:
        raise ConfigError(
            f"{what} is already {current:.2%} sparse (masks from an earlier prune), more than the "
            f"requested sparsity={sparsity:g}; masks only grow, so nothing would change. Ask for more than "
            f"{current:.2%}, or call secateurs.unmask(model) first to start again from the dense weights"
        )


def effective_masks(targets: Sequence[Target]) -> Mapping[str, Tensor]:
    """Where each target's effective weight (masked, or baked) is nonzero: what really survives."""
    return {t.name: t.weight.detach() != 0 for t in targets}
