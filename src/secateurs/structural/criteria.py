"""Group criteria for ``mode='remove'``: one score per unit of coupled channels (higher = keep).

A unit spans several tensors (a filter, its BatchNorm entry, the next layer's input
columns ...). The element criteria (magnitude, gradient, activation, APoZ, Wanda ...)
score units by reducing their element scores over every weight the unit touches;
``magnitude``, ``taylor``, ``lamp`` and ``random`` have group forms of their own (group norms,
Molchanov et al. 2019, LAMP on unit norms, one draw per unit), registered by the element
criterion's name. The criteria below the forms exist only for structures; they register in
the one criteria registry like every other method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..batches import default_loss, model_device, to_device
from ..criteria.base import CRITERIA, Criterion, register
from ..criteria.magnitude import Magnitude, lamp_normalize
from ..errors import ConfigError, DataRequiredError
from ..evidence import Evidence, Need, preserved
from ..layout import Layout, from_canonical, layout_of
from ..progress import progress
from ..registry import Registry
from ..scope import Target
from .graph import Group
from .layers import block_influence
from .units import GroupEvidence, UnitAccumulator, rows_along

#: group forms of element criteria, registered under the element criterion's name
GROUP_FORMS: Registry[type[GroupCriterion]] = Registry("group form")


class GroupCriterion(Criterion):
    """Base class: override :meth:`group_scores` (and :meth:`targets` for gathered evidence);
    criteria that rank whole blocks (``pattern='layer'``) override :meth:`block_scores`."""

    modes: ClassVar[tuple[str, ...]] = ("remove",)

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        raise ConfigError(f"method {self.name!r} scores whole structures; use mode='remove'")

    def targets(self, groups: list[Group], modules: dict[str, nn.Module]) -> list[Target]:
        """Weights whose activations / gradients the runner should gather."""
        return []

    def block_scores(
        self, model: nn.Module, blocks: Sequence[nn.Module], evidence: Evidence, removing: int | None = None
    ) -> Tensor:
        """One score per block (``pattern='layer'``); higher = keep. ``removing``: how many will go (criteria
        that search under the budget read it)."""
        raise ConfigError(f"method {self.name!r} scores channels, not whole blocks; use method='shortgpt'")

    @classmethod
    def from_element(cls, criterion: Criterion) -> GroupCriterion:
        """The group form of an element criterion (group forms override to copy its options)."""
        return cls()

    #: its own calibration passes (``Need.DATA_PASSES``) add their sums over the ranks of a distributed run
    #: (through ``Evidence.sum_over_ranks``); hooked statistics (``Need.ACTIVATIONS`` ...) are added by the runner
    passes_add_over_ranks: ClassVar[bool] = False

    #: what the criterion reads, for the error when a group offers none of it (see :meth:`_views`)
    reads: ClassVar[str] = ""

    def _views(self, group: Group, modules: dict[str, nn.Module]):
        """The ports of ``group`` this criterion reads (criteria with a :attr:`reads` override it)."""
        return iter(group.ports)

    def check_groups(self, groups: list[Group], modules: dict[str, nn.Module]) -> None:
        """Refuse groups this criterion cannot score, before anything runs."""
        empty = [g.name for g in groups if next(iter(self._views(g, modules)), None) is None]
        if empty:
            raise ConfigError(
                f"method {self.name!r} reads {self.reads}, and groups {empty[:5]} have none; exclude them "
                "from the scope or use method='magnitude'"
            )

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        raise NotImplementedError


def _weight_views(group: Group, ev: GroupEvidence, roles=("out", "in", "pass", "free"), min_ndim: int = 2):
    for view in group.ports:
        tensor = ev.tensor(view)
        if tensor is not None and view.port.role in roles and tensor.ndim >= min_ndim:
            yield view, tensor


@GROUP_FORMS.register
class GroupMagnitude(GroupCriterion):
    """L1 (``norm=1``) or L2 (``norm=2``) norm of all weights a unit holds (DepGraph's group norm,
    Fang et al. 2023, arXiv:2301.12900; filters: Li et al. 2017, arXiv:1608.08710)."""

    name = "magnitude"

    def __init__(self, norm: int = 1) -> None:
        self.norm = Magnitude(norm).norm

    @classmethod
    def from_element(cls, criterion: Criterion) -> GroupCriterion:
        return cls(criterion.norm)  # type: ignore[attr-defined]

    def unit_norms(self, group: Group, ev: GroupEvidence) -> Tensor:
        acc = UnitAccumulator(group.units, "sum" if self.norm == 1 else "l2")
        for view, tensor in _weight_views(group, ev):
            acc.add(view.index, rows_along(tensor, view.port.dim).abs())
        return acc.result()

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        return {g.name: self.unit_norms(g, ev) for g in ev.groups}


@GROUP_FORMS.register
class GroupLAMP(GroupCriterion):
    """LAMP (Lee et al. 2021, arXiv:2010.07611) on unit L2 norms: scale-free within each group,
    so one global threshold compares groups of different sizes."""

    name = "lamp"
    default_allocation = "global"

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        norms = GroupMagnitude(2).group_scores(ev)
        return {name: lamp_normalize(s) for name, s in norms.items()}


@GROUP_FORMS.register
class GroupRandom(GroupCriterion):
    """One uniform draw per unit (or per block) from the run's seeded generator."""

    name = "random"
    granularities = ("channel", "head", "hidden", "layer")

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        gen = ev.evidence.generator
        return {g.name: torch.rand(g.units, generator=gen, dtype=torch.float64) for g in ev.groups}

    def block_scores(
        self, model: nn.Module, blocks: Sequence[nn.Module], evidence: Evidence, removing: int | None = None
    ) -> Tensor:
        return torch.rand(len(blocks), generator=evidence.generator, dtype=torch.float64)


@GROUP_FORMS.register
class GroupTaylor(GroupCriterion):
    """Molchanov et al. 2019 (arXiv:1906.10771), eq. 8: the loss change from removing a unit S is
    about ``(sum_{s in S} g_s w_s)^2``, with the sum over every parameter of the unit (weights,
    biases, norm scales), computed per minibatch and averaged over minibatches."""

    name = "taylor"
    needs = frozenset({Need.DATA_PASSES})

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        params = {
            id(t): t
            for g in ev.groups
            for v in g.ports
            if isinstance(t := ev.tensor(v), nn.Parameter) and t.is_floating_point()
        }
        loss_fn = ev.evidence.loss_fn or default_loss
        totals = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in ev.groups}
        device = model_device(ev.model)
        flags = [type("P", (), {"parameter": p})() for p in params.values()]
        with preserved(ev.model, flags), torch.enable_grad():
            for p in params.values():
                p.requires_grad_(True)
            for batch in progress(ev.evidence.batches, "taylor (group)", ev.evidence.show_progress):
                for p in ev.model.parameters():
                    p.grad = None
                loss_fn(ev.model, to_device(batch, device)).backward()
                for g in ev.groups:
                    acc = UnitAccumulator(g.units, "sum")
                    for view in g.ports:
                        t = ev.tensor(view)
                        if isinstance(t, nn.Parameter) and t.grad is not None:
                            acc.add(view.index, rows_along(t.grad * t, view.port.dim))
                    totals[g.name] += acc.result().square()
        n = max(len(ev.evidence.batches), 1)
        return {name: s / n for name, s in totals.items()}


class ElementAdapter(GroupCriterion):
    """Any element criterion, reduced over the ``weight`` of every Linear / Conv / Conv1D /
    Embedding a unit touches (only producers for criteria defined on outputs, e.g. APoZ)."""

    reads = "the weights of Linear / Conv layers"

    def __init__(self, element: Criterion) -> None:
        self.element = element
        self.name = element.name
        self.needs = element.needs
        self.reduction = element.reduction

    def _views(self, group: Group, modules: dict[str, nn.Module]):
        on_outputs = Need.OUTPUTS in self.element.needs  # defined on a layer's outputs: scores its producers only
        for view in group.ports:
            module = modules[view.port.module]
            layout = layout_of(module)
            if view.port.param != "weight" or layout is None or view.port.dim is None:
                continue
            if on_outputs and view.port.role != "out":
                continue
            if layout is Layout.EMBEDDING and not self.element.scores_embeddings:
                continue
            yield view, module, layout

    def targets(self, groups, modules):
        found = {}
        for g in groups:
            for view, module, layout in self._views(g, modules):
                found.setdefault(view.port.module, Target(view.port.module, module, layout))
        return list(found.values())

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        scores = self.element.scores(ev.evidence)
        out = {}
        for g in ev.groups:
            acc = UnitAccumulator(g.units, self.reduction)
            for view, module, layout in self._views(g, ev.modules):
                weight = module.weight
                full = from_canonical(scores[f"{view.port.module}.weight"].double(), layout, weight.shape)
                acc.add(view.index, rows_along(full, view.port.dim))
            out[g.name] = acc.result()
        return out


def as_group_criterion(criterion: Criterion) -> GroupCriterion:
    """The group form of any criterion (what ``mode='remove'`` ranks units with): its own, a registered
    form (the exact registered element class only, not a user subclass), or the element adapter."""
    if isinstance(criterion, GroupCriterion):
        return criterion
    name = criterion.name
    if name in GROUP_FORMS and name in CRITERIA and type(criterion) is CRITERIA.get(name):
        return GROUP_FORMS.get(name).from_element(criterion)
    if criterion.signed:
        raise ConfigError(
            f"method {criterion.name!r} returns per-batch signed contributions, which mode='remove' cannot "
            "reduce over units; give it a GroupCriterion form, or use 'taylor'"
        )
    return ElementAdapter(criterion)


@register
class BNScale(GroupCriterion):
    """Network slimming (Liu et al. 2017, arXiv:1708.06519): |gamma| of the BatchNorm that scales
    each channel (summed when a residual path ties several), ranked globally as in the paper.
    Train with an L1 penalty on gamma first for the paper's results."""

    name = "bn_scale"
    default_allocation = "global"
    reads = "the scale of an affine BatchNorm"

    def _views(self, group: Group, modules: dict[str, nn.Module]):
        for view in group.ports:
            if view.port.param == "weight" and isinstance(modules[view.port.module], nn.modules.batchnorm._BatchNorm):
                yield view

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        out = {}
        for g in ev.groups:
            acc = UnitAccumulator(g.units, "sum")
            for view in self._views(g, ev.modules):
                acc.add(view.index, rows_along(ev.tensor(view), 0).abs())
            out[g.name] = acc.result()
        return out


@register
class FPGM(GroupCriterion):
    """Filter pruning via geometric median (He et al. 2019, arXiv:1811.00250): a filter close to
    the geometric median of its layer is replaceable by the others. Score = sum of Euclidean
    distances to the layer's other filters (the paper's practical form), summed over the
    producing layers of a unit."""

    name = "fpgm"
    reads = "the filters that produce a unit"

    def _views(self, group, modules):
        return (v for v in group.ports if v.port.role in ("out", "pass") and v.port.dim is not None)

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        out = {}
        for g in ev.groups:
            acc = UnitAccumulator(g.units, "sum")
            for view, tensor in _weight_views(g, ev, roles=("out", "pass")):
                rows = rows_along(tensor, view.port.dim).double()
                acc.add(view.index, torch.cdist(rows, rows).sum(1, keepdim=True))
            out[g.name] = acc.result()
        return out


@register
class FLAP(GroupCriterion):
    """FLAP (An et al. 2024, arXiv:2312.11983): fluctuation of each input channel of the layer
    that consumes a unit, weighted by that column's squared norm (WIFV):
    ``S_j = var(X_j) * ||W[:, j]||^2``. As in the reference implementation, head metrics are
    squared, every layer's metrics are standardised, heads average their channels, and all
    units are ranked together weighted by their parameter count (adaptive structure search,
    default allocation 'global'). Removed inputs are replaced by their calibration mean folded
    into the next layer's bias (its default solver, ``bias_compensation``), so no retraining is needed."""

    name = "flap"
    reads = "the inputs of the Linear layer that consumes a unit"
    needs = frozenset({Need.ACTIVATIONS})
    default_allocation = "global"
    default_solver = "bias_compensation"
    default_pattern = "head+channel"

    def _views(self, group: Group, modules: dict[str, nn.Module]):
        for view in group.ports:
            module = modules[view.port.module]
            layout = layout_of(module)
            if view.port.role == "in" and view.port.param == "weight" and layout in (Layout.LINEAR, Layout.TRANSPOSED):
                yield view, module, layout

    def targets(self, groups, modules):
        found = {v.port.module: Target(v.port.module, m, lay) for g in groups for v, m, lay in self._views(g, modules)}
        return list(found.values())

    def _stats(self, ev: GroupEvidence, name: str):
        stats = ev.evidence.activations.get(f"{name}.weight")
        if stats is None:
            raise DataRequiredError(f"no calibration activations reached {name!r}; is it used in forward()?")
        return stats

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        out = {}
        for g in ev.groups:
            values, index = [], []
            for view, module, layout in self._views(g, ev.modules):
                in_dim = 1 if layout is Layout.LINEAR else 0
                column_sq = module.weight.detach().double().square().sum(dim=1 - in_dim).cpu()
                metric = self._stats(ev, view.port.module).input_variance.cpu() * column_sq
                if g.kind == "head":
                    metric = metric.square()
                hit = view.index >= 0
                values.append(metric[hit])
                index.append(view.index[hit])
            v, i = torch.cat(values), torch.cat(index)
            v = (v - v.mean()) / v.std().clamp_min(1e-12)
            acc = UnitAccumulator(g.units, "mean")
            acc.add(i, v.reshape(-1, 1))
            out[g.name] = acc.result()
        return out


@register
class ShortGPT(GroupCriterion):
    """ShortGPT block influence (Men et al. 2024, arXiv:2403.03853): ``BI_i = 1 - E[cos(x_i, x_{i+1})]``
    over calibration tokens, where x_i is the hidden state entering block i. Blocks that barely
    change their input are removed first (``pattern='layer'``)."""

    name = "shortgpt"
    needs = frozenset({Need.DATA_PASSES})
    passes_add_over_ranks = True
    granularities = ("layer",)
    default_pattern = "layer"

    def block_scores(
        self, model: nn.Module, blocks: Sequence[nn.Module], evidence: Evidence, removing: int | None = None
    ) -> Tensor:
        return block_influence(model, blocks, evidence.batches, evidence.show_progress, evidence.sum_over_ranks)
