"""Parameter sensitivity: per-weight saliency estimates, their distributions, and a check against measurement.

The estimates are the library's own criteria, so what is shown is exactly what a prune would rank by:

- ``obd``: Optimal Brain Damage with the diagonal empirical Fisher, ``0.5 * F_ii * w_i^2`` (LeCun et al.
  1990; Theis et al. 2018, arXiv:1801.05787);
- ``taylor``: first-order Taylor, per batch ``|sum w * dL/dw|`` over a unit (Molchanov et al.,
  arXiv:1611.06440);
- ``sparsegpt``: the OBS saliency ``w^2 / [H^-1]_ii`` with the layer Hessian ``X^T X`` (Hassibi & Stork
  1993; SparseGPT, arXiv:2301.00774). It predicts the layer's output error, not the loss, so it is
  comparable within a layer rather than across layers;
- ``taylor2``: the second-order Taylor expansion of the loss change from zeroing a group,
  ``sum(0.5 * F_ii * w_i^2 - w_i * mean(g_i))`` (OBD plus the first-order term, which does not vanish
  on calibration data the model was not trained to the minimum of); signed, unlike the others;
- ``magnitude``: ``|w|``, the baseline every estimate should beat.

:func:`saliency_check` zeroes small random groups of weights one at a time (each in a
:func:`secateurs.trial`), measures the loss change, and reports the Spearman rank correlation of
each estimate's group sum with it, over all groups and averaged within layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import default_loss, take
from ..config import PruneConfig
from ..errors import ConfigError
from ..layout import from_canonical
from ..pipeline import Data, score_targets
from ..progress import progress as progress_bar
from ..scope import ScopeSpec, Target, resolve
from ..trials import trial

ESTIMATORS = ("obd", "taylor", "taylor2", "sparsegpt", "magnitude")


def _targets(model: nn.Module, scope: Any) -> list[Target]:
    return resolve(model, ScopeSpec.from_value(scope))


def saliency(
    model: nn.Module,
    calibration: Iterable[Any],
    estimators: Sequence[str] = ESTIMATORS,
    *,
    scope: Any = None,
    loss_fn: Callable | None = None,
) -> dict[str, dict[str, Tensor]]:
    """``{estimator: {weight name: per-weight saliency (the weight's shape)}}``; the model is not changed.
    The per-batch Taylor estimate is reported per weight as the mean over batches of ``|w * g|``."""
    raw = _raw(model, take(calibration, None), estimators, scope, loss_fn)
    return {e: {n: (s.abs().mean(0) if e == "taylor" else s) for n, s in per.items()} for e, per in raw.items()}


def _raw(
    model: nn.Module, batches: list[Any], estimators: Sequence[str], scope: Any, loss_fn: Callable | None
) -> dict[str, dict[str, Tensor]]:
    """Per estimator and weight, in the weight's shape; Taylor keeps its batch dimension (signed)."""
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad:
        raise ConfigError(f"saliency estimators are {', '.join(ESTIMATORS)}; got {bad[0]!r}")
    targets = _targets(model, scope)
    wanted = set(estimators) | ({"obd", "taylor"} if "taylor2" in estimators else set())
    out: dict[str, dict[str, Tensor]] = {}
    for name in [e for e in ESTIMATORS if e in wanted and e != "taylor2"]:
        config = PruneConfig(method=name, sparsity=0.5, scope=scope)
        data = Data.from_user(config, batches, loss_fn, None, False)
        scores = score_targets(model, targets, config, data)
        out[name] = {}
        for t in targets:
            s = scores[t.name].detach().double()
            if config.criterion_.signed:
                out[name][t.name] = torch.stack([from_canonical(b, t.layout, t.shape) for b in s]).cpu()
            else:
                out[name][t.name] = from_canonical(s, t.layout, t.shape).cpu()
    if "taylor2" in estimators:
        out["taylor2"] = {n: out["obd"][n] - out["taylor"][n].mean(0) for n in out["obd"]}
    return {e: out[e] for e in estimators}


def summary(saliencies: dict[str, dict[str, Tensor]]) -> list[dict[str, Any]]:
    """Per estimator and tensor: the distribution's quantiles (log10 where positive) and its total."""
    rows = []
    for estimator, per_tensor in saliencies.items():
        for name, s in per_tensor.items():
            flat = s.reshape(-1).double()
            q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            rows.append(
                {
                    "estimator": estimator,
                    "tensor": name,
                    "p10": q[0],
                    "median": q[1],
                    "p90": q[2],
                    "total": float(flat.sum()),
                    "numel": flat.numel(),
                }
            )
    return rows


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 3:
        raise ConfigError("Spearman's correlation needs two sequences of equal length, at least 3")
    ra, rb = _ranks(torch.tensor(list(a), dtype=torch.float64)), _ranks(torch.tensor(list(b), dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):  # ties share their average rank
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _group(estimate: Tensor, indices: list[int], estimator: str) -> float:
    """An estimate for a group of weights: the sum (Taylor: the batch mean of the absolute per-batch sum)."""
    if estimator == "taylor":
        return float(estimate.reshape(estimate.shape[0], -1)[:, indices].sum(1).abs().mean())
    return float(estimate.reshape(-1)[indices].sum())


@dataclass
class SaliencyCheck:
    """Predicted (an estimate summed over a group) against measured loss change, per zeroed group."""

    groups: list[tuple[str, list[int]]]  # (weight name, flat indices)
    measured: list[float]
    predicted: dict[str, list[float]]
    spearman: dict[str, float] = field(default_factory=dict)  # over every group
    spearman_within_layers: dict[str, float] = field(default_factory=dict)  # mean over layers

    def table(self) -> str:
        lines = [f"{'estimator':<10}  {'Spearman (all groups)':>22}  {'mean within layers':>19}"]
        for name in self.predicted:
            lines.append(f"{name:<10}  {self.spearman[name]:>22.3f}  {self.spearman_within_layers[name]:>19.3f}")
        return "\n".join(lines)


def _loss(model: nn.Module, batches: list[Any], loss_fn: Callable | None) -> float:
    with torch.no_grad():
        return math.fsum(float((loss_fn or default_loss)(model, b)) for b in batches) / len(batches)


def saliency_check(
    model: nn.Module,
    calibration: Iterable[Any],
    estimators: Sequence[str] = ESTIMATORS,
    *,
    evaluation: Iterable[Any] | None = None,
    groups_per_layer: int = 24,
    group_size: int = 4,
    seed: int = 0,
    scope: Any = None,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> SaliencyCheck:
    """Zero ``groups_per_layer`` random groups of ``group_size`` weights per layer, one at a time, measure the
    loss change on ``evaluation`` (default: the calibration batches), and correlate each estimate with it."""
    batches = take(calibration, None)
    evaluation = take(evaluation, None) if evaluation is not None else batches
    if not evaluation:
        raise ConfigError("saliency_check measures loss changes: pass calibration (or evaluation) batches")
    estimates = _raw(model, batches, estimators, scope, loss_fn)
    targets = _targets(model, scope)
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for t in targets:
        for _ in range(groups_per_layer):
            groups.append((t, torch.randperm(t.numel, generator=generator)[:group_size].tolist()))
    was_training = model.training
    model.eval()
    try:
        dense = _loss(model, evaluation, loss_fn)
        measured = []
        for t, indices in progress_bar(groups, "saliency check groups", progress):
            with trial(model), torch.no_grad():
                t.parameter.view(-1)[indices] = 0
                measured.append(_loss(model, evaluation, loss_fn) - dense)
    finally:
        model.train(was_training)
    predicted = {e: [_group(estimates[e][t.name], idx, e) for t, idx in groups] for e in estimators}
    check = SaliencyCheck([(t.name, idx) for t, idx in groups], measured, predicted)
    for e in estimators:
        check.spearman[e] = spearman(predicted[e], measured)
        within = []
        for t in targets:
            rows = [i for i, (g, _) in enumerate(groups) if g is t]
            if len(rows) >= 3:
                within.append(spearman([predicted[e][i] for i in rows], [measured[i] for i in rows]))
        within = [w for w in within if math.isfinite(w)]
        check.spearman_within_layers[e] = sum(within) / len(within) if within else float("nan")
    return check
