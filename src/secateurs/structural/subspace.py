"""Subspace node pruning (Offergeld, van Gerven, Ahmad 2024, arXiv:2405.17506): the criterion.

A layer's units (MLP neurons, conv channels) are orthogonalised by a triangular transform of their
activations, i.e. Gram-Schmidt in the order of a pivoted Cholesky factorisation of their calibration
covariance ``C = L L^T``: each next unit is the one whose part *not* predicted by the units already
chosen carries the most output energy (its residual variance times the squared norm of the consumer's
column that reads it). A unit chosen late is almost a linear combination of earlier ones, so removing
it and recovering its predictable part in the consumer by least squares (the default solver,
:mod:`secateurs.solvers.subspace`) loses only its residual.

A unit's score is the fraction of the layer's orthogonal variance carried by it and every unit after it
in that order (non-increasing along the order). Ranked globally (the default allocation), one
threshold keeps the same fraction of orthogonal variance in every layer, so each layer gets its own
ratio from the variance its subspace keeps (the paper's per-layer ratios).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..criteria.base import register
from ..errors import ConfigError
from ..evidence import Need
from ..layout import Layout, layout_of
from ..scope import Target
from ..solvers.subspace import channel_moments
from .criteria import GroupCriterion
from .graph import Group
from .units import GroupEvidence, rows_along


def pivoted_orthogonal_variance(covariance: Tensor, energy: Tensor) -> tuple[Tensor, Tensor]:
    """``(order, residual variances)``: greedy Gram-Schmidt of the units with covariance ``covariance``.

    Step k picks the unit maximising ``energy_j * residual_j`` (its variance not explained by the units
    already picked; the Schur complement's diagonal, i.e. a pivoted Cholesky factor's squared diagonal),
    and records that residual variance weighted by its energy."""
    residual = covariance.double().clone()
    energy = energy.double()
    n = residual.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    order = torch.empty(n, dtype=torch.long)
    values = torch.zeros(n, dtype=torch.float64)
    floor = 1e-12 * float(torch.diagonal(residual).abs().max().clamp_min(1e-300))
    for k in range(n):
        gain = (torch.diagonal(residual).clamp_min(0.0) * energy).masked_fill(chosen, -1.0)
        j = int(torch.argmax(gain))
        order[k], values[k], chosen[j] = j, gain[j].clamp_min(0.0), True
        pivot = residual[j, j]
        if pivot > floor:  # the triangular (Cholesky) step: remove what unit j explains from every other unit
            column = residual[:, j].clone()
            residual -= torch.outer(column, column) / pivot
    return order, values


def tail_fractions(order: Tensor, values: Tensor) -> Tensor:
    """Per unit: the fraction of the total orthogonal variance carried by it and every unit after it."""
    tails = values.flip(0).cumsum(0).flip(0) / values.sum().clamp_min(1e-300)
    scores = torch.empty_like(tails)
    scores[order] = tails
    return scores


@register
class SubspaceNode(GroupCriterion):
    """Subspace node pruning (arXiv:2405.17506): rank units by the variance their orthogonalised
    activations add, remove the most predictable ones, reconstruct them in the consumer by least squares."""

    name = "subspace"
    reads = "the inputs of a Linear or Conv layer that consumes a unit (one column per unit)"
    needs = frozenset({Need.HESSIAN, Need.ACTIVATIONS})
    granularities = ("channel",)
    default_allocation = "global"
    default_solver = "subspace_reconstruction"
    default_pattern = "channel"

    def _views(self, group: Group, modules: dict[str, nn.Module]):
        for view in group.ports:
            module = modules[view.port.module]
            layout = layout_of(module)
            if view.port.role == "in" and view.port.param == "weight" and layout in (
                Layout.LINEAR, Layout.TRANSPOSED, Layout.CONV,
            ) and getattr(module, "groups", 1) == 1:  # fmt: skip
                yield view

    def targets(self, groups, modules):
        found = {}
        for g in groups:
            for view in self._views(g, modules):
                module = modules[view.port.module]
                found.setdefault(view.port.module, Target(view.port.module, module, layout_of(module)))
        return list(found.values())

    def check_groups(self, groups: list[Group], modules: dict[str, nn.Module]) -> None:
        super().check_groups(groups, modules)
        for g in groups:
            for view in self._views(g, modules):
                hit = view.index[view.index >= 0]
                if hit.numel() != g.units or torch.unique(hit).numel() != g.units:
                    raise ConfigError(
                        f"group {g.name!r} reaches {view.port.module!r} through a reshape (a unit feeds several of "
                        "its columns); subspace node pruning reconstructs one column per unit: exclude the group "
                        f"(scope={{'exclude': [{view.port.module!r}]}})"
                    )

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        out = {}
        targets = {t.module_name: t for t in ev.evidence.targets}
        for g in ev.groups:
            views = list(self._views(g, ev.modules))
            energy = torch.zeros(g.units, dtype=torch.float64)
            for view in views:  # every consumer's squared column norms, per unit
                weight = ev.tensor(view)
                hit = view.index >= 0
                energy.index_add_(
                    0, view.index[hit], rows_along(weight, view.port.dim)[hit].double().square().sum(1).cpu()
                )
            first = views[0]
            covariance, _ = channel_moments(targets[first.port.module], ev.evidence)
            hit = first.index >= 0
            columns = torch.empty(g.units, dtype=torch.long)
            columns[first.index[hit]] = hit.nonzero().reshape(-1)
            order, values = pivoted_orthogonal_variance(covariance[columns][:, columns], energy)
            out[g.name] = tail_fractions(order, values)
        return out
