"""Forward-only, optimisation-based structural pruning (Gao et al. 2024, arXiv:2406.10576).

Every prunable unit (an attention head, or a whole GQA group with ``structural={'gqa': 'kv_groups'}``;
an MLP neuron) gets a keep probability ``theta``. A step draws ``K`` masks ``m ~ Bernoulli(theta)``,
runs the model on a calibration batch with the dropped units replaced by their calibration mean
(the mean ablation that bias compensation makes permanent), and moves ``theta`` along the policy
gradient (REINFORCE, the paper's eq. 6): ``g = 1/K sum_k (L(m_k) - b) s(m_k)``. No autograd graph is
built through the model: the passes run under ``torch.no_grad`` and the gradient is this closed form.
The step is ``lr * g / max|g|`` (``lr`` is the largest change of a probability per step, whatever the
loss scale); then ``theta`` is projected onto the budget ``sum_u theta_u params_u = (1 - sparsity)
sum_u params_u`` within ``[eps, 1 - eps]`` (the paper's projection), so the expected kept size is the
target and each layer finds its own ratio. ``theta`` starts from a metric (FLAP by default, or Wanda-sp:
Wanda's ``|W| ||x||`` summed over a unit) mapped from its global rank.

Defaults that differ from the paper, because with it the search learned nothing here (bench/RESULTS.md,
issue 15, third pass): ``baseline='leave_one_out'`` (each sample's loss minus the mean of the step's
other samples on the same batch; the paper's moving average lets the batch-to-batch loss swings
through), ``estimator='standardised'`` (``s = (m - theta) / sqrt(theta (1 - theta))``, the authors'
released code, instead of the score's ``1/(theta (1 - theta))``), ``init_spread=5`` with ``eps=0`` (only
a band of units near the budget's threshold is uncertain), and ``eval_every=25``: the deterministic mask
that ``mode='remove'`` would build is measured on all calibration batches and the best one no larger
than the initial mask (in kept parameters) is kept.

The score is the learned ``theta``: the pipeline's global allocation keeps the most probable units to
the budget, and ``mode='remove'`` cuts the rest (heads per KV group, rounding and refusals as usual).

Other options: ``estimator='score'|'natural'``, ``update='sgd'|'adam'|'rms_normalised'``. With
``pattern='layer'`` the same search runs over whole blocks (a dropped block is the identity;
initialised from ShortGPT's block influence) and the least probable blocks are deleted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..adam import adam_direction
from ..batches import default_loss, logits_of, model_device, model_inputs, run_model, to_device
from ..criteria import make_criterion
from ..criteria.base import register
from ..errors import ConfigError, DataRequiredError, SecateursWarning
from ..evidence import Evidence, Need, preserved
from ..progress import progress
from ..selection import keep_mask
from ..spec import number
from .criteria import GroupCriterion, as_group_criterion
from .graph import Group
from .layers import block_influence
from .units import GroupEvidence

INITS = ("flap", "wanda", "uniform")
BASELINES = ("moving_average", "leave_one_out")
ESTIMATORS = ("score", "natural", "standardised")
UPDATES = ("max_normalised", "sgd", "adam", "rms_normalised")


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


class _BlockSkip:
    """Forward hooks on whole blocks: a block whose mask is 0 returns its input hidden state (the identity
    its removal from the residual stack leaves), in the structure of its output."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.mask: Tensor | None = None
        self.handles = [b.register_forward_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)]

    def set(self, mask: Tensor) -> None:
        self.mask = mask

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self.mask is None or bool(self.mask[i]):
                return output
            x = args[0] if args else kwargs["hidden_states"]
            if isinstance(output, Tensor):
                return x
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
                return type(output)((x, *output[1:]))
            raise ConfigError(f"block {i} returns {type(output).__name__}; Bernoulli block masks need a hidden state")

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
    granularities = ("head", "channel", "layer")
    default_allocation = "global"
    default_solver = "bias_compensation"
    default_pattern = "head+channel"
    #: ``monitor(step, mask, apply)``, called after each deterministic measurement (benchmarks use it to
    #: read a held-out loss of the same mask while the ablation hooks are in place)
    monitor: Callable[[int, Tensor, Callable[[Tensor], None]], None] | None = None

    def __init__(self, steps: int = 200, samples: int = 4, lr: float = 0.05, baseline_decay: float = 0.9,
                 init: str = "flap", init_spread: float = 5.0, baseline: str = "leave_one_out",
                 estimator: str = "standardised", update: str = "max_normalised", eps: float = 0.0,
                 eval_every: int = 25) -> None:  # fmt: skip
        for key, value, low in (("steps", steps, 0), ("samples", samples, 2), ("eval_every", eval_every, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"method_options.{key} must be an integer >= {low}, got {value!r}")
        number(0.0, float("inf"), low_open=True)("method_options.lr", lr)
        number(0.0, 1.0, high_open=True)("method_options.baseline_decay", baseline_decay)
        number(0.0, 1000.0, low_open=True)("method_options.init_spread", init_spread)
        number(0.0, 0.1)("method_options.eps", eps)
        if init not in INITS:
            raise ConfigError(f"method_options.init must be one of {INITS}, got {init!r}")
        if baseline not in BASELINES:
            raise ConfigError(f"method_options.baseline must be one of {BASELINES}, got {baseline!r}")
        if estimator not in ESTIMATORS:
            raise ConfigError(f"method_options.estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if update not in UPDATES:
            raise ConfigError(f"method_options.update must be one of {UPDATES}, got {update!r}")
        self.baseline, self.estimator, self.update = baseline, estimator, update
        self.eps, self.eval_every = eps, eval_every
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
            return project_to_budget(torch.full_like(cost, 0.5), cost, budget, self.eps)
        scores = self._init.group_scores(ev)
        flat = torch.cat([scores[g.name].double().reshape(-1) for g in ev.groups])
        return project_to_budget(self._from_ranks(flat), cost, budget, self.eps)

    def _gradient(self, masks: Tensor, losses: Tensor, theta: Tensor, moving: float) -> Tensor:
        """REINFORCE over the ``K`` samples of one step. ``moving_average`` subtracts the running mean loss
        (the paper); ``leave_one_out`` subtracts, per sample, the mean loss of the step's other samples on the
        same batch, so the difference between calibration batches cancels. ``score`` is the plain
        ``d log p(m) / d theta``; ``standardised`` divides ``m - theta`` by the Bernoulli standard deviation
        ``sqrt(theta (1 - theta))`` (the form of the authors' released code); ``natural`` multiplies the score
        by the Fisher inverse ``theta (1 - theta)`` (``m - theta``), which does not blow up near 0 or 1. A
        probability at exactly 0 or 1 draws no other value, so its term is 0."""
        if self.baseline == "leave_one_out":
            centred = (losses - losses.mean()) * (len(losses) / (len(losses) - 1))  # L_k - mean of the others
        else:
            centred = losses - moving
        score = masks - theta
        spread = theta * (1 - theta)
        if self.estimator == "score":
            score = score / spread.clamp_min(1e-12)
        elif self.estimator == "standardised":
            score = score / spread.sqrt().clamp_min(1e-6)
        return (centred[:, None] * score).mean(0)

    def _chosen(self, ev: GroupEvidence, theta: Tensor, sizes: list[int]) -> Tensor:
        """The 0/1 mask ``mode='remove'`` would cut for scores ``theta``: the run's own allocation and rounding
        (``ev.decide``)."""
        removed = ev.decide({g.name: t for g, t in zip(ev.groups, theta.split(sizes))})
        parts = []
        for g, n in zip(ev.groups, sizes):
            part = torch.ones(n, dtype=theta.dtype)
            gone = removed.get(g.name)
            if gone is not None and gone.numel():
                part[gone.to(torch.long)] = 0.0
            parts.append(part)
        return torch.cat(parts)

    def group_scores(self, ev: GroupEvidence) -> dict[str, Tensor]:
        if ev.sparsity is None:
            raise ConfigError(
                "method 'bernoulli' searches under the run's budget; use it through prune(..., sparsity=)"
            )
        sizes = [g.units for g in ev.groups]
        cost = torch.cat([g.unit_params.double().reshape(-1) for g in ev.groups])
        cost = cost / cost.mean()
        budget = (1 - ev.sparsity) * float(cost.sum())
        ablation = _MeanAblation(ev, ev.groups)

        def apply(mask: Tensor) -> None:
            for g, m in zip(ev.groups, mask.split(sizes)):
                ablation.masks[g.name] = m.float()

        chosen = None
        if self.eval_every > 0 and ev.solver == "bias_compensation" and ev.decide is not None:
            chosen = lambda t: self._chosen(ev, t, sizes)  # noqa: E731
        elif self.eval_every > 0:  # mean ablation is the model bias compensation builds, not another solver's
            warnings.warn(
                f"method 'bernoulli' keeps the best measured mask only with solver='bias_compensation' (its "
                f"mean-ablated search is that model); with solver={ev.solver!r} it returns the last probabilities",
                SecateursWarning,
                stacklevel=2,
            )
        try:
            theta = self._search(ev.model, ev.evidence, self._initial(ev, cost, budget), cost, budget, apply, chosen)
        finally:
            ablation.remove()
        return {g.name: t for g, t in zip(ev.groups, theta.split(sizes))}

    def block_scores(
        self, model: nn.Module, blocks: Sequence[nn.Module], evidence: Evidence, removing: int | None = None
    ) -> Tensor:
        """``pattern='layer'``: one keep probability per whole block, searched the same way. A dropped block
        passes its input through (the identity that removing it from the residual stack leaves); the budget
        keeps ``len(blocks) - removing`` blocks in expectation. Initialised from ShortGPT's block influence
        ranks (``init='uniform'``: all equal)."""
        if removing is None:
            raise ConfigError(
                "method 'bernoulli' searches under the run's budget; use it through prune(..., sparsity=)"
            )
        cost = torch.ones(len(blocks), dtype=torch.float64)
        budget = float(len(blocks) - removing)
        if self._init is None:
            theta = project_to_budget(torch.full_like(cost, 0.5), cost, budget, self.eps)
        else:
            influence = block_influence(model, blocks, evidence.batches, evidence.show_progress).double()
            theta = project_to_budget(self._from_ranks(influence), cost, budget, self.eps)

        def chosen(t: Tensor) -> Tensor:  # the pipeline deletes the ``removing`` least probable blocks
            return keep_mask(t.reshape(1, -1), removing).reshape(-1).to(t.dtype)

        skip = _BlockSkip(blocks)
        try:
            return self._search(model, evidence, theta, cost, budget, skip.set, chosen)
        finally:
            skip.remove()

    def _from_ranks(self, scores: Tensor) -> Tensor:
        """Scores (higher = keep) to probabilities linear in their rank, ``0.5 -+ init_spread / 2``. A spread
        above 1 (beyond the paper) saturates all but a band of ``1 / init_spread`` of the units around the
        budget's threshold once projected: the search then explores only the uncertain units."""
        rank = torch.empty_like(scores)
        rank[torch.argsort(scores, stable=True)] = torch.arange(len(scores), dtype=scores.dtype) / max(
            len(scores) - 1, 1
        )
        return 0.5 + self.init_spread * (rank - 0.5)

    def _step(self, theta: Tensor, grad: Tensor, step: int, state: dict) -> Tensor:
        """One move of ``theta`` down ``grad``. ``max_normalised``: ``lr * g / max|g|`` (the largest change
        is ``lr``); ``sgd``: ``lr_t * g`` (the authors' code: plain descent on the probabilities); ``adam``:
        Adam's per-coordinate normalised step (beyond the paper). ``sgd`` and ``adam`` decay ``lr`` on a
        cosine to 0 over ``steps`` (the authors' default schedule)."""
        if self.update == "max_normalised":
            return theta - self.lr * grad / grad.abs().max().clamp_min(1e-12)
        lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / max(self.steps, 1)))
        if self.update == "sgd":
            return theta - lr * grad
        if self.update == "rms_normalised":
            moving = grad != 0
            rms = grad[moving].pow(2).mean().sqrt() if bool(moving.any()) else grad.new_tensor(1.0)
            return theta - lr * grad / rms.clamp_min(1e-12)
        return theta - lr * adam_direction(state, grad, 1e-12)

    def _search(
        self, model: nn.Module, evidence: Evidence, theta: Tensor, cost: Tensor, budget: float,
        apply: Callable[[Tensor], None], chosen: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """The forward-only policy-gradient loop from ``theta``; ``apply(mask)`` sets one sample's mask.

        With ``eval_every > 0`` (beyond the paper, which keeps its last probabilities) the deterministic
        mask ``chosen(theta)`` (the units ``mode='remove'`` would keep) is measured on all calibration
        batches at the start, every ``eval_every`` steps and at the end, and the probabilities whose mask
        had the lowest calibration loss among those no larger than the initial mask (kept cost, ``kept_``)
        are returned: the result is never worse on the calibration data than the initialisation, and never
        larger. ``trace_`` records (step, mean sampled loss, deterministic loss)."""
        self.initial_ = theta.clone()
        batches = evidence.batches
        if not batches:
            raise DataRequiredError("method 'bernoulli' needs calibration batches")
        loss_fn = evidence.loss_fn or search_loss
        gen = evidence.generator or torch.Generator().manual_seed(0)
        device = model_device(model)
        baseline = None
        self.history_: list[float] = []
        self.trace_: list[tuple[int, float, float]] = []
        self.kept_: list[float] = []  # per measured mask: its kept cost (in the search's units), the size rule's
        tracking = self.eval_every > 0 and chosen is not None
        best: tuple[float, Tensor] | None = None
        state: dict = {}
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]

        def measure(step: int, theta: Tensor) -> tuple[float, Tensor] | None:
            mask = chosen(theta)
            apply(mask)
            loss = sum(float(loss_fn(model, to_device(b, device))) for b in batches) / len(batches)
            kept = float((mask.to(cost.dtype) * cost).sum())
            self.trace_.append((step, self.history_[-1] if self.history_ else float("nan"), loss))
            self.kept_.append(kept)
            if self.monitor is not None:
                self.monitor(step, mask, apply)
            if best is None:
                return loss, theta.clone()
            # only a mask no larger than the initial one may replace it: removal rounds whole units (a GQA
            # group of heads is large), so masks land at slightly different sizes, and a larger mask has a
            # lower loss for its size alone; comparing losses across sizes would quietly overspend the budget
            fits = kept <= self.kept_[0] * (1 + 1e-9)
            return (loss, theta.clone()) if fits and loss < best[0] else best

        try:
            with preserved(model, []), torch.no_grad():
                for p in params:  # no autograd graph through the model: the gradient is REINFORCE's closed form
                    p.requires_grad_(False)
                if tracking:
                    best = measure(0, theta)
                for step in progress(range(self.steps), "bernoulli search", evidence.show_progress):
                    batch = to_device(batches[step % len(batches)], device)
                    masks = torch.bernoulli(theta.expand(self.samples, -1), generator=gen)
                    losses = torch.empty(self.samples, dtype=torch.float64)
                    for k in range(self.samples):
                        apply(masks[k])
                        losses[k] = float(loss_fn(model, batch))
                    mean_loss = float(losses.mean())
                    baseline = (
                        mean_loss
                        if baseline is None
                        else self.baseline_decay * baseline + (1 - self.baseline_decay) * mean_loss
                    )
                    grad = self._gradient(masks, losses, theta, baseline)
                    theta = project_to_budget(self._step(theta, grad, step, state), cost, budget, self.eps)
                    self.history_.append(mean_loss)
                    if tracking and ((step + 1) % self.eval_every == 0 or step + 1 == self.steps):
                        best = measure(step + 1, theta)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        if not all(math.isfinite(v) for v in self.history_) or not all(math.isfinite(t[2]) for t in self.trace_):
            raise ConfigError("the Bernoulli search saw non-finite losses; check the calibration batches")
        self.theta_ = theta
        self.best_loss_ = None
        if best is not None:
            self.best_loss_ = best[0]
            theta = best[1]
        return theta
