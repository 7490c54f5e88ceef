"""Gradient criteria: gradient magnitude, first-order Taylor, SNIP and GraSP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batches import logits_of, model_device, run_model, to_device
from ..errors import ConfigError, DataRequiredError
from ..evidence import Evidence, Need
from ..layout import to_canonical
from ..progress import progress
from ..scope import Target
from .base import Criterion, grad3, register, weight3


@register
class Gradient(Criterion):
    """Mean |dL/dw| over the calibration batches."""

    name = "gradient"
    needs = frozenset({Need.GRADIENTS})

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        return grad3(evidence, target, "mean_abs")


@register
class Taylor(Criterion):
    """First-order Taylor estimate of the loss change from removing weights (Molchanov et
    al. 2017, arXiv:1611.06440): for a unit (a weight, a block, a filter), the mean over
    batches of ``|sum of w * dL/dw|`` over its weights. The sum comes before the absolute
    value, as in the paper's filter criterion, so opposite contributions cancel as they do
    in the loss; the absolute value comes before the batch mean, so a converged network,
    whose mean gradient is near zero, is still ranked by how much each unit moves the loss.
    Keeps one gradient per calibration batch."""

    name = "taylor"
    needs = frozenset({Need.GRADIENTS, Need.BATCH_GRADIENTS})
    signed = True

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        stats = evidence.gradients.get(target.name)
        if stats is None or not stats.per_batch:
            raise DataRequiredError(f"no per-batch gradients were gathered for {target.name}")
        w = weight3(target)
        return torch.stack([w * to_canonical(g, target.layout) for g in stats.per_batch])


@register
class SNIP(Criterion):
    """Connection sensitivity |g * w| / sum |g * w| at initialisation, ranked globally
    (Lee et al. 2019, arXiv:1810.02340)."""

    name = "snip"
    needs = frozenset({Need.GRADIENTS})
    default_allocation = "global"

    def scores(self, evidence: Evidence) -> dict[str, Tensor]:
        raw = {t.name: (weight3(t).double() * grad3(evidence, t, "grad_sum")).abs() for t in evidence.targets}
        total = sum(float(s.sum()) for s in raw.values())
        return {name: s / total if total > 0 else s for name, s in raw.items()}


@register
class GraSP(Criterion):
    """Gradient Signal Preservation (Wang et al. 2020, arXiv:2002.07376): the score
    ``-w * Hg`` estimates how removing w changes the gradient norm; the paper removes
    the highest scores, so importance here is ``w * Hg``. Logits are divided by a
    temperature (200 in the paper) so the Hessian-gradient product is informative
    at initialisation. With a custom ``loss_fn`` the temperature is not applied."""

    name = "grasp"
    needs = frozenset({Need.DATA_PASSES})
    default_allocation = "global"
    scores_embeddings = False

    def __init__(self, temperature: float = 200.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"GraSP temperature must be positive, got {temperature!r}")
        self.temperature = temperature

    def _loss(self, evidence: Evidence, batch) -> Tensor:
        if evidence.loss_fn is not None:
            return evidence.loss_fn(evidence.model, batch)
        if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
            raise DataRequiredError("GraSP needs (inputs, targets) batches or a loss_fn")
        logits = logits_of(run_model(evidence.model, batch)) / self.temperature
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    def scores(self, evidence: Evidence) -> dict[str, Tensor]:
        if not evidence.batches:
            raise DataRequiredError("GraSP needs calibration batches")
        params = [t.parameter for t in evidence.targets]
        for p in params:
            p.requires_grad_(True)
        device = model_device(evidence.model)
        batches = [to_device(b, device) for b in evidence.batches]
        with torch.enable_grad():
            # pass 1: g = dL/dw, treated as a constant
            g = [torch.zeros_like(p) for p in params]
            for batch in progress(batches, "GraSP gradient", evidence.show_progress):
                for acc, d in zip(g, torch.autograd.grad(self._loss(evidence, batch), params, allow_unused=True)):
                    if d is not None:
                        acc += d
            # pass 2: Hg = d(g_const . dL/dw)/dw
            hg = [torch.zeros_like(p) for p in params]
            for batch in progress(batches, "GraSP Hessian-gradient", evidence.show_progress):
                grads = torch.autograd.grad(self._loss(evidence, batch), params, create_graph=True, allow_unused=True)
                inner = sum((d * c).sum() for d, c in zip(grads, g) if d is not None)
                for acc, d in zip(hg, torch.autograd.grad(inner, params, allow_unused=True)):
                    if d is not None:
                        acc += d
        return {
            t.name: weight3(t).double() * to_canonical(h.detach().double(), t.layout)
            for t, h in zip(evidence.targets, hg)
        }
