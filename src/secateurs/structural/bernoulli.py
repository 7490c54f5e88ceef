"""Forward-only, optimisation-based structural pruning (Gao et al. 2024, arXiv:2406.10576).

Every prunable unit (an attention head, or a whole GQA group with ``structural={'gqa': 'kv_groups'}``;
an MLP neuron) gets a keep probability ``theta``. A step draws ``K`` masks ``m ~ Bernoulli(theta)``,
runs the model on a calibration batch with the dropped units replaced by their calibration mean
(the mean ablation that bias compensation makes permanent), and moves ``theta`` along the policy
gradient (REINFORCE, the paper's eq. 6): ``g = 1/K sum_k (L(m_k) - b) (m_k - theta) / (theta (1 - theta))``
with ``b`` a moving average of the losses. No autograd graph is built through the model: the passes
run under ``torch.no_grad`` and the gradient is this closed form. The step is ``lr * g / max|g|``
(``lr`` is the largest change of a probability per step, whatever the loss scale); then ``theta`` is
projected onto the budget ``sum_u theta_u params_u = (1 - sparsity) sum_u params_u`` within
``[eps, 1 - eps]`` (the paper's projection), so the expected kept size is the target and each layer
finds its own ratio. ``theta`` starts from a metric (FLAP by default, or Wanda-sp: Wanda's
``|W| ||x||`` summed over a unit) mapped from its global rank.

The score is the learned ``theta``: the pipeline's global allocation keeps the most probable units to
the budget, and ``mode='remove'`` cuts the rest (heads per KV group, rounding and refusals as usual).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import default_loss, logits_of, model_device, model_inputs, run_model, to_device
from ..criteria import make_criterion
from ..criteria.base import register
from ..errors import ConfigError, DataRequiredError
from ..evidence import Need, preserved
from ..progress import progress
from ..spec import number
from .criteria import GroupCriterion, as_group_criterion
from .graph import Group
from .units import GroupEvidence

INITS = ("flap", "wanda", "uniform")


def project_to_budget(theta: Tensor, cost: Tensor, budget: float, eps: float = 1e-3) -> Tensor:
    """Euclidean projection of ``theta`` onto ``{eps <= t <= 1 - eps, cost . t = budget}`` (bisection on the
    multiplier ``lam`` of ``clip(theta - lam * cost)``, monotone in ``lam``)."""
    low_total, high_total = float((cost * eps).sum()), float((cost * (1 - eps)).sum())
    if not low_total <= budget <= high_total:
        raise ConfigError(
            f"budget {budget:.4g} is outside what the units can hold ({low_total:.4g} to {high_total:.4g})"
        )
    lo, hi = -1.0, 1.0
    while float((cost * (theta - lo * cost).clamp(eps, 1 - eps)).sum()) < budget:
        lo *= 2
    while float((cost * (theta - hi * cost).clamp(eps, 1 - eps)).sum()) > budget:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if float((cost * (theta - mid * cost).clamp(eps, 1 - eps)).sum()) > budget:
            lo = mid
        else:
            hi = mid
    return (theta - hi * cost).clamp(eps, 1 - eps)


def search_loss(model: nn.Module, batch: Any) -> Tensor:
    """Next-token cross-entropy of a causal LM on a batch of token ids (a tensor, or a dict with input_ids
    and no labels); any other batch: the run's default loss (``(inputs, targets)``, or the model's own)."""
    inputs = model_inputs(batch)
    ids = inputs.get("input_ids") if isinstance(inputs, dict) and "labels" not in inputs else inputs
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32) or isinstance(batch, (list, tuple)):
        return default_loss(model, batch)
    logits = logits_of(run_model(model, batch)).float()
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class _MeanAblation:
    """Forward pre-hooks on the layers that consume units: a dropped unit's input columns become their
    calibration mean. ``masks[group]`` is a float (units,) tensor set before each pass."""

    def __init__(self, ev: GroupEvidence, groups: list[Group]) -> None:
        self.masks: dict[str, Tensor] = {}
        self.handles = []
        for g in groups:
            for view in g.ports:
                module = ev.modules[view.port.module]
                if view.port.role != "in" or view.port.param != "weight" or not isinstance(module, nn.Linear):
                    continue
                stats = ev.evidence.activations.get(f"{view.port.module}.weight")
                mean = stats.input_mean.float() if stats is not None else torch.zeros(module.in_features)
                self.handles.append(module.register_forward_pre_hook(self._hook(g.name, view.index.clone(), mean)))

    def _hook(self, group: str, index: Tensor, mean: Tensor):
        hit = index >= 0

        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            columns = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
            columns[hit.to(x.device)] = self.masks[group].to(x.device, x.dtype)[index[hit].to(x.device)]
            return (x * columns + mean.to(x.device, x.dtype) * (1 - columns), *args[1:])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@register
class Bernoulli(GroupCriterion):
    """Bernoulli masks over heads and neurons learned by a forward-only policy gradient (arXiv:2406.10576)."""

    name = "bernoulli"
    reads = "the Linear layers that consume a unit (its mask is applied to their inputs)"
    needs = frozenset({Need.ACTIVATIONS, Need.DATA_PASSES})
    granularities = ("head", "channel")
    default_allocation = "global"
    default_solver = "bias_compensation"
    default_pattern = "head+channel"

    def __init__(self, steps: int = 60, samples: int = 4, lr: float = 0.05, baseline_decay: float = 0.9,
                 init: str = "flap", init_spread: float = 0.8) -> None:  # fmt: skip
        for key, value, low in (("steps", steps, 0), ("samples", samples, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"method_options.{key} must be an integer >= {low}, got {value!r}")
        number(0.0, float("inf"), low_open=True)("method_options.lr", lr)
        number(0.0, 1.0, high_open=True)("method_options.baseline_decay", baseline_decay)
        number(0.0, 1.0, high_open=True)("method_options.init_spread", init_spread)
        if init not in INITS:
            raise ConfigError(f"method_options.init must be one of {INITS}, got {init!r}")
        self.steps, self.samples, self.lr, self.baseline_decay = steps, samples, lr, baseline_decay
        self.init, self.init_spread = init, init_spread
        self._init = None if init == "uniform" else as_group_criterion(make_criterion(init))

    def _views(self, group: Group, modules: dict[str, nn.Module]):
        return (v for v in group.ports if v.port.role == "in" and v.port.param == "weight"
                and isinstance(modules[v.port.module], nn.Linear))  # fmt: skip

    def targets(self, groups, modules):
        from_init = self._init.targets(groups, modules) if self._init is not None else []
        found = {t.module_name: t for t in from_init}
        for t in as_group_criterion(make_criterion("flap")).targets(groups, modules):  # the means to ablate with
            found.setdefault(t.module_name, t)
        return list(found.values())

    def _initial(self, ev: GroupEvidence, cost: Tensor, budget: float) -> Tensor:
        if self._init is None:
            return project_to_budget(torch.full_like(cost, 0.5), cost, budget)
        scores = self._init.group_scores(ev)
        flat = torch.cat([scores[g.name].double().reshape(-1) for g in ev.groups])
        rank = torch.empty_like(flat)
        rank[torch.argsort(flat, stable=True)] = torch.arange(len(flat), dtype=flat.dtype) / max(len(flat) - 1, 1)
        theta = 0.5 + self.init_spread * (rank - 0.5)  # best unit 0.5 + spread/2, worst 0.5 - spread/2
        return project_to_budget(theta, cost, budget)

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        if ev.sparsity is None:
            raise ConfigError(
                "method 'bernoulli' searches under the run's budget; use it through prune(..., sparsity=)"
            )
        sizes = [g.units for g in ev.groups]
        cost = torch.cat([g.unit_params.double().reshape(-1) for g in ev.groups])
        cost = cost / cost.mean()
        budget = (1 - ev.sparsity) * float(cost.sum())
        theta = self._initial(ev, cost, budget)
        self.initial_ = theta.clone()
        batches = ev.evidence.batches
        if not batches:
            raise DataRequiredError("method 'bernoulli' needs calibration batches")
        loss_fn = ev.evidence.loss_fn or search_loss
        gen = ev.evidence.generator or torch.Generator().manual_seed(0)
        device = model_device(ev.model)
        ablation = _MeanAblation(ev, ev.groups)
        baseline = None
        self.history_: list[float] = []
        params = list(ev.model.parameters())
        flags = [p.requires_grad for p in params]
        try:
            with preserved(ev.model, []), torch.no_grad():
                for p in params:  # no autograd graph through the model: the gradient is REINFORCE's closed form
                    p.requires_grad_(False)
                for step in progress(range(self.steps), "bernoulli search", ev.evidence.show_progress):
                    batch = to_device(batches[step % len(batches)], device)
                    masks = torch.bernoulli(theta.expand(self.samples, -1), generator=gen)
                    losses = torch.empty(self.samples, dtype=torch.float64)
                    for k in range(self.samples):
                        for g, m in zip(ev.groups, masks[k].split(sizes)):
                            ablation.masks[g.name] = m.float()
                        losses[k] = float(loss_fn(ev.model, batch))
                    mean_loss = float(losses.mean())
                    baseline = (
                        mean_loss
                        if baseline is None
                        else self.baseline_decay * baseline + (1 - self.baseline_decay) * mean_loss
                    )
                    score = (masks - theta) / (theta * (1 - theta))  # d log p(m) / d theta
                    grad = ((losses - baseline)[:, None] * score).mean(0)
                    theta = project_to_budget(theta - self.lr * grad / grad.abs().max().clamp_min(1e-12), cost, budget)
                    self.history_.append(mean_loss)
        finally:
            ablation.remove()
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        if not all(math.isfinite(v) for v in self.history_):
            raise ConfigError("the Bernoulli search saw non-finite losses; check the calibration batches")
        self.theta_ = theta
        return {g.name: t for g, t in zip(ev.groups, theta.split(sizes))}
