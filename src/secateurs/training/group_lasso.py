"""Group lasso over the dependency graph's coupled groups, and removal of the groups it zeroes.

Structured sparsity learning (Wen et al. 2016, arXiv:1608.03665) penalises the L2 norm of each
group of weights, ``strength * sum_g ||w_g||_2``, so whole groups reach zero together. Here a group
is one *unit* of the dependency graph (:mod:`secateurs.structural.graph`): everything that goes
when one channel, neuron or attention head goes (a filter, its bias, the BatchNorm entries that
scale it, the next layers' input columns, the matching filters of every layer tied to it by a
residual add; a head's query/key/value rows and output-projection columns, GQA's shared key/value
heads included). That is the group whose zeros :func:`remove_zero_groups` can take out without
changing what the model computes.

Two ways to apply it:

- plain: ``pruner.regularize()`` adds ``strength * w_g / ||w_g||`` to each group's gradient
  (a subgradient: zero for a group already at zero). Groups get small, rarely exactly zero;
- proximal (``proximal_lr=`` the optimizer's learning rate): the gradient step is left alone and
  ``pruner.step()`` applies the group soft-threshold ``w_g <- w_g * max(0, 1 - lr*strength/||w_g||)``
  (proximal gradient descent), which sets whole groups to exact zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataRequiredError, ScopeError
from ..scope import Target
from ..structural.graph import KINDS, DependencyGraph, Group
from ..structural.removal import refuse_reparametrized, remove
from ..structural.step import Step
from ..structural.surgery import own_tensor
from .regularizers import Contribution, Regularizer, check_proximal_lr, register_regularizer


@dataclass
class _View:
    """One tensor slice of a group: ``index[i]`` is the unit of position ``i`` along ``dim`` (-1: none)."""

    name: str
    tensor: Tensor
    dim: int | None
    index: Tensor
    role: str

    def rows(self, tensor: Tensor | None = None) -> Tensor:
        t = self.tensor if tensor is None else tensor
        return t.reshape(-1, 1) if self.dim is None else t.movedim(self.dim, 0).reshape(t.shape[self.dim], -1)

    def unrows(self, rows: Tensor) -> Tensor:
        if self.dim is None:
            return rows.reshape(self.tensor.shape)
        moved = self.tensor.movedim(self.dim, 0).shape
        return rows.reshape(moved).movedim(0, self.dim)


def group_views(model: nn.Module, group: Group) -> list[_View]:
    """The tensors one group's units live in (parameters only: buffers are not trained)."""
    modules = dict(model.named_modules())
    views = []
    for view in group.ports:
        port = view.port
        if port.param.startswith("#"):
            continue
        tensor = own_tensor(modules[port.module], port.param)
        if not isinstance(tensor, nn.Parameter):
            continue
        name = f"{port.module}.{port.param}" if port.module else port.param
        views.append(_View(name, tensor, port.dim, view.index.to(tensor.device), port.role))
    return views


def unit_norms(views: Sequence[_View], units: int, roles: tuple[str, ...] | None = None) -> Tensor:
    """L2 norm of each unit over the given views (all roles by default), float64 on the CPU."""
    squares = torch.zeros(units, dtype=torch.float64)
    for v in views:
        if roles is not None and v.role not in roles:
            continue
        hit = v.index >= 0
        rows = v.rows().detach()[hit].double().square().sum(1).cpu()
        squares.index_add_(0, v.index[hit].cpu(), rows)
    return squares.sqrt()


def _owns(owner: str, in_scope: set[str]) -> bool:
    """Is the module that creates a group's units in scope: a layer in scope, or a module holding one
    (an attention module creates its heads, and its projections are the scope's targets)?"""
    return owner in in_scope or any(name.startswith(owner + ".") for name in in_scope)


def _check_kinds(kinds: Any) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, (list, tuple)) or not kinds or any(k not in KINDS for k in kinds):
        raise ConfigError(f"regularizer_options.kinds must be a non-empty list of {list(KINDS)}, got {kinds!r}")
    return tuple(kinds)


@register_regularizer
class GroupLasso(Regularizer):
    """Group lasso over coupled channels / neurons / heads (Wen et al. 2016, arXiv:1608.03665).

    Args:
        strength: lambda in ``lambda * sum_g ||w_g||_2``.
        kinds: which of the graph's groups: ``'channel'`` (channels and neurons), ``'head'``
            (attention heads, GQA-aware), ``'hidden'`` (a transformer's residual width).
        proximal_lr: apply the penalty as its proximal step with this learning rate (exact zeros).
        strength_schedule: ramp the strength in (see :mod:`secateurs.training.regularizers`).

    Needs ``example_inputs`` on the Pruner (the graph is traced once per bind). Groups whose
    producing layer is outside the pruner's scope are left alone.
    """

    name = "group_lasso"

    def __init__(self, strength: float = 1e-4, strength_schedule: Mapping[str, Any] | None = None,
                 kinds: Sequence[str] = ("channel", "head"), proximal_lr: float | None = None) -> None:  # fmt: skip
        super().__init__(strength, strength_schedule)
        self.kinds = _check_kinds(kinds)
        self.proximal_lr = check_proximal_lr(proximal_lr)
        self._groups: list[tuple[Group, list[_View]]] = []

    def options(self) -> dict[str, Any]:
        out = super().options()
        out["kinds"] = list(self.kinds)
        if self.proximal_lr is not None:
            out["proximal_lr"] = self.proximal_lr
        return out

    def bind(self, model: nn.Module, targets: Sequence[Target], example_inputs: Any = None) -> None:
        if example_inputs is None:
            raise DataRequiredError(
                "regularizer 'group_lasso' penalises the dependency graph's coupled groups and traces the model "
                "once: pass example_inputs=<one input batch> to the Pruner"
            )
        graph = DependencyGraph(model, example_inputs)
        in_scope = {t.module_name for t in targets}
        self._groups = []
        for g in graph.groups:
            if g.kind not in self.kinds or not g.units or g.blocked:
                continue
            if not any(_owns(s.owner, in_scope) for s in g.sources):
                continue
            views = group_views(model, g)
            if views:
                self._groups.append((g, views))
        if not self._groups:
            present = sorted({g.kind for g in graph.groups if g.units})
            raise ScopeError(
                f"regularizer 'group_lasso' found no removable {'/'.join(self.kinds)} group produced by a layer in "
                f"scope; removable kinds in this model: {present or 'none'} (regularizer_options={{'kinds': [...]}}"
                ", or widen the scope)"
            )

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        value, parts = 0.0, []
        with torch.no_grad():
            for group, views in self._groups:
                norms = unit_norms(views, group.units)
                value += float(norms.sum())
                if self.proximal_lr is not None:
                    continue
                # d/dw ||w_g|| = w / ||w_g||; a group at zero gets the zero subgradient
                inverse = torch.where(norms > 0, strength / norms, torch.zeros_like(norms))
                for v in views:
                    scale = torch.zeros(v.index.shape[0], dtype=v.tensor.dtype, device=v.tensor.device)
                    hit = v.index >= 0
                    scale[hit] = inverse.to(v.tensor.device, v.tensor.dtype)[v.index[hit]]
                    parts.append((v.name, v.tensor, v.unrows(v.rows() * scale[:, None])))
        return strength * value, parts

    def proximal(self) -> None:
        if self.proximal_lr is None:
            return
        amount = self.proximal_lr * self.current_strength
        with torch.no_grad():
            for group, views in self._groups:
                norms = unit_norms(views, group.units)
                shrink = torch.where(norms > amount, 1.0 - amount / norms.clamp_min(1e-300), torch.zeros_like(norms))
                for v in views:
                    scale = torch.ones(v.index.shape[0], dtype=torch.float64)
                    hit = (v.index >= 0).cpu()
                    scale[hit] = shrink[v.index.cpu()[hit]]
                    scale = scale.to(v.tensor.device, v.tensor.dtype)
                    v.tensor.copy_(v.unrows(v.rows() * scale[:, None]))

    def group_norms(self) -> dict[str, Tensor]:
        return {g.name: unit_norms(views, g.units) for g, views in self._groups}


@dataclass
class ZeroGroups:
    """What :func:`remove_zero_groups` took out: units per group, and the applied removal step."""

    removed: dict[str, int]
    units_before: dict[str, int]
    step: Step | None

    @property
    def total(self) -> int:
        return sum(self.removed.values())


def dead_units(model: nn.Module, group: Group, tolerance: float = 0.0) -> Tensor:
    """Indices of the units of ``group`` nothing reads: every tensor of the unit is zero (within
    ``tolerance`` in L2 norm), or every weight that consumes it (``in`` columns) is. Removing them
    leaves the model's outputs unchanged (up to float tolerance, or ``tolerance``'s effect)."""
    views = group_views(model, group)
    whole = unit_norms(views, group.units)
    dead = whole <= tolerance
    if any(v.role == "in" for v in views):
        dead |= unit_norms(views, group.units, roles=("in",)) <= tolerance
    return dead.nonzero().reshape(-1)


def remove_zero_groups(
    model: nn.Module,
    example_inputs: Any,
    tolerance: float = 0.0,
    kinds: Sequence[str] = ("channel", "head"),
    check: bool = True,
) -> ZeroGroups:
    """Remove, for real, every channel / neuron / head that training left at zero (group lasso's
    proximal step, L0 gates or variational dropout after ``secateurs.bake(model)``), through the
    dependency graph: tensors shrink, configs are updated, the step is recorded in the model's
    pruning plan (``secateurs.structural.save_structured`` works). With the default ``tolerance=0``
    only units whose removal cannot change the outputs go; learned gates or masks still attached
    are refused with the call that makes them permanent (``secateurs.bake(model)``)."""
    kinds = _check_kinds(kinds)
    if not tolerance >= 0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance!r}")
    refuse_reparametrized(model)
    graph = DependencyGraph(model, example_inputs)
    removed: dict[str, Tensor] = {}
    before: dict[str, int] = {}
    for g in graph.groups:
        if g.kind not in kinds or not g.units or g.blocked:
            continue
        before[g.name] = g.units
        dead = dead_units(model, g, tolerance)
        if len(dead) == g.units:  # a layer left with nothing: keep its strongest unit (collapse is refused)
            norms = unit_norms(group_views(model, g), g.units)
            dead = dead[dead != int(norms.argmax())]
        if len(dead):
            removed[g.name] = dead
    step = remove(model, removed, example_inputs, check=check) if removed else None
    return ZeroGroups({k: len(v) for k, v in removed.items()}, before, step)
