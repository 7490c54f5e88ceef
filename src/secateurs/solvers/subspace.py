"""Subspace node pruning's reconstruction (Offergeld, van Gerven, Ahmad 2024, arXiv:2405.17506).

When units (MLP neurons, conv channels) are removed, the layer that consumes them still receives the
part of the removed activations that the kept ones predict linearly. With the calibration covariance
``C`` of the consumer's input channels and their mean ``mu``, the least-squares prediction of the removed
channels ``R`` from the kept ones ``K`` is ``x_R ~= P^T x_K + c`` with ``P = C_KK^-1 C_KR`` and
``c = mu_R - P^T mu_K``; folding it into the consumer gives ``W_K' = W_K + W_R P^T`` and
``b' = b + W_R c`` (section 3.2 of the paper: the contribution of the removed nodes is recovered in
the next layer). For a convolution ``x`` is a channel at one position, so the same ``P`` folds into
every kernel offset (positions where padding reads zeros are not corrected, as in bias compensation).

The covariance comes from the shared Hessian accumulator (``H = 2 E[x x^T]``; a conv's Hessian columns
are ``(kernel offset, channel)``, and the centre offset's block is the channels' second moment) and the
mean from the activation statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..criteria.activation import activation_stats
from ..errors import ConfigError
from ..evidence import Evidence, Need, check_hessian_target
from ..hessian import check_dampening
from ..layout import Layout, from_canonical, to_canonical
from ..patterns import Pattern
from ..scope import Target
from .base import Solver, SolveResult, register_solver


def channel_moments(target: Target, evidence: Evidence) -> tuple[Tensor, Tensor]:
    """``(covariance (I, I), mean (I,))`` of the target's input channels over the calibration positions."""
    hessian = evidence.hessian(target).hessian.double().cpu()
    if hessian.ndim == 3:
        raise ConfigError(f"{target.module_name!r} is a grouped convolution; subspace reconstruction needs one input")
    _, spatial, inputs = target.canonical_shape
    # a conv: the centre kernel offset of a 'same' convolution reads every pixel once and never the
    # padding (the other offsets read zeros at the border, which would bias the channel moments)
    centre = spatial // 2
    second = (hessian / 2).reshape(spatial, inputs, spatial, inputs)[centre, :, centre, :]
    mean = activation_stats(evidence, target).input_mean.double().cpu().reshape(-1)
    if mean.numel() != inputs:
        raise ConfigError(f"{target.module_name!r}: {mean.numel()} input means for {inputs} input channels")
    return second - torch.outer(mean, mean), mean


def least_squares_fold(
    weight3: Tensor, covariance: Tensor, mean: Tensor, kept: Tensor, dampening: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """``(new canonical weight (O, S, I) with removed columns 0, bias delta (O,))`` of the fold above.

    ``kept``: bool (I,). ``dampening`` (a fraction of the mean diagonal of ``C_KK``) keeps the solve
    defined when kept channels are collinear or dead."""
    removed = ~kept
    w = weight3.double()
    new = w.clone()
    new[:, :, removed] = 0.0
    if not bool(removed.any()) or not bool(kept.any()):
        return new, torch.zeros(w.shape[0], dtype=torch.float64)
    c_kk = covariance[kept][:, kept]
    c_kr = covariance[kept][:, removed]
    scale = float(torch.diagonal(c_kk).mean().clamp_min(1e-30))
    eye = torch.eye(c_kk.shape[0], dtype=c_kk.dtype)
    p = torch.linalg.solve(c_kk + dampening * scale * eye, c_kr)  # (K, R)
    c = mean[removed] - p.T @ mean[kept]
    w_r = w[:, :, removed]  # (O, S, R)
    new[:, :, kept] += torch.einsum("osr,kr->osk", w_r, p)
    return new, torch.einsum("osr,r->o", w_r, c)


@register_solver
class SubspaceReconstruction(Solver):
    """Least-squares reconstruction of removed input channels in the consuming layer (arXiv:2405.17506)."""

    name = "subspace_reconstruction"
    needs = frozenset({Need.HESSIAN, Need.ACTIVATIONS})
    modes = ("reconstruct", "remove")

    def __init__(self, dampening: float = 1e-6) -> None:
        check_dampening("dampening", dampening)
        self.dampening = dampening

    def validate(self, targets: Sequence[Target], mode: str) -> None:
        for t in targets:
            check_hessian_target(t)
            if t.layout not in (Layout.LINEAR, Layout.TRANSPOSED, Layout.CONV):
                raise ConfigError(f"{t.module_name!r} is not a Linear or Conv layer; exclude it from the scope")
            if getattr(t.module, "groups", 1) != 1:
                raise ConfigError(
                    f"{t.module_name!r} is a grouped convolution; subspace reconstruction folds across channels: "
                    "exclude it, or use solver='bias_compensation'"
                )
            if mode == "reconstruct" and getattr(t.module, "bias", None) is None:
                raise ConfigError(f"{t.module_name!r} has no bias to fold the mean into; exclude it from the scope")

    def solve(
        self,
        targets: Sequence[Target],
        evidence: Evidence,
        masks: Mapping[str, Tensor] | None,
        sparsities: Mapping[str, float] | None = None,
        pattern: Pattern | None = None,
    ) -> dict[str, SolveResult]:
        if masks is None:
            raise ConfigError("subspace reconstruction does not choose masks; use method='subspace' to choose them")
        results = {}
        for t in targets:
            keep = masks[t.name].to(t.parameter.device, torch.bool)
            keep3 = to_canonical(keep.cpu(), t.layout)
            kept = keep3.all(dim=0).all(dim=0)  # an input channel stays if every weight reading it stays
            if not bool((keep3 == kept).all()):
                raise ConfigError(
                    f"subspace reconstruction removes whole input channels; the mask of {t.name} is not one "
                    "(use pattern='channel' with mode='remove', or a column pattern)"
                )
            covariance, mean = channel_moments(t, evidence)
            w3 = to_canonical(t.parameter.detach().cpu(), t.layout)
            new3, delta = least_squares_fold(w3, covariance, mean, kept, self.dampening)
            weight = from_canonical(new3, t.layout, t.shape).to(t.parameter.device, t.parameter.dtype)
            results[t.name] = SolveResult(
                keep, weight, delta.to(t.parameter.device), info={"removed": int((~kept).sum())}
            )
        return results
