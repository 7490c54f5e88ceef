"""The layer-wise Hessian ``H = 2 X X^T / n`` and its dampened inverse, shared by every solver and
by the OBS saliency criterion (one accumulator per shared input, one dampening policy).

For a layer ``Y = W X`` the reconstruction loss ``||W X - W' X||^2`` has Hessian ``2 X X^T`` in each
output row (OBC, Frantar et al. 2022, arXiv:2208.11580; SparseGPT, arXiv:2301.00774). ``X`` holds
one column per calibration position: tokens for a Linear layer, and for a convolution the
unfolded input patches (OBC, section 4), so a conv is solved like a Linear layer over
``in_channels x kernel`` columns; a grouped conv has one Hessian per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SecateursError
from .selection import check_finite
from .spec import number

#: the dampening ``lambda`` of ``H + lambda * mean(diag H) * I``: every option that sets it is checked here
check_dampening = number(
    0.0, float("inf"), low_open=True, high_open=True, hint=" (a fraction of mean diag(H); SparseGPT uses 0.01)"
)


class CholeskyError(SecateursError, ArithmeticError):
    """H + damping stayed non positive-definite after every retry with more damping."""


class HessianAccumulator:
    """``H = (2 / n) * sum_k x_k x_k^T`` over the n calibration positions seen (per group).

    The sum is accumulated unscaled in float32 (one ``addmm`` per batch) and divided once at
    the end; rescaling a running mean after every batch, as the reference code does, costs
    an extra pass over H per batch for no accuracy that matters at calibration sizes.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None, groups: int = 1) -> None:
        shape = (columns, columns) if groups == 1 else (groups, columns, columns)
        self._sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.groups = groups
        self.positions = 0

    def add(self, inputs: Tensor) -> None:
        """``inputs``: ``(..., columns)``, or ``(positions, groups, columns)`` for a grouped layer."""
        if self.groups == 1:
            x = inputs.reshape(-1, inputs.shape[-1]).float()
            self._sum.addmm_(x.t(), x)
        else:
            x = inputs.float().transpose(0, 1)  # (groups, positions, columns)
            self._sum.baddbmm_(x.transpose(1, 2), x)
            x = x[0]
        self.positions += x.shape[0]

    @property
    def hessian(self) -> Tensor:
        return self._sum * (2.0 / max(self.positions, 1))

    @property
    def state(self) -> tuple[Tensor, int]:
        """The unscaled sum and the positions it holds (what another process continues from)."""
        return self._sum, self.positions

    def continue_from(self, total: Tensor, positions: int) -> None:
        """Start from another accumulator's state: adding the next batches here gives, bit for bit, the sums one
        accumulator fed every batch in order would hold (distributed ranks hand the sums on in rank order)."""
        self._sum.copy_(total)
        self.positions = positions


@dataclass
class InverseFactor:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` and how it was obtained."""

    factor: Tensor  # (I, I) upper triangular
    dead: Tensor  # (I,) bool: inputs that were always zero in calibration
    dampening: float  # lambda as a fraction of mean(diag H) that finally worked
    retries: int  # how many times dampening had to be raised


def _prepared(hessian: Tensor, dampening: float) -> tuple[Tensor, Tensor, float]:
    """``(H with dead inputs' diagonal set to 1, dead, mean diag)``: the one dampening policy's starting point."""
    check_dampening("dampening", dampening)
    check_finite(hessian, "the layer Hessian")
    h = hessian.clone()
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0  # an input that was always 0 says nothing; SparseGPT prunes its weights first
    return h, dead, float(diagonal.mean())


def dampen(hessian: Tensor, dampening: float) -> tuple[Tensor, Tensor]:
    """``(H + dampening * mean(diag H) * I, dead inputs)``: the dampening every solver applies."""
    h, dead, mean_diagonal = _prepared(hessian, dampening)
    h.diagonal().add_(dampening * mean_diagonal)
    return h, dead


@dataclass
class EigenFactor:
    """The dampened Hessian scaled to a unit diagonal, ``S^-1 (H + lambda I) S^-1 = Q diag(values) Q^T``
    with ``S = sqrt(diag(H + lambda I))``, factored once so that ``(H_s + rho I)^-1`` costs one product
    for every penalty ``rho`` an ADMM solver tries (ALPS, arXiv:2406.07831, section 3)."""

    hessian: Tensor  # (I, I) the scaled, dampened Hessian (unit diagonal), float32
    vectors: Tensor  # (I, I) Q, float32
    values: Tensor  # (I,) eigenvalues (>= 0)
    scale: Tensor  # (I,) S, float32
    dead: Tensor  # (I,) bool: inputs that were always zero in calibration
    dampening: float

    def penalized_inverse(self, rho: float) -> Tensor:
        """``(H_s + rho I)^-1 = Q diag(1 / (values + rho)) Q^T`` (float32)."""
        inv = (1.0 / (self.values + rho)).to(self.vectors.dtype)
        return (self.vectors * inv) @ self.vectors.t()


def eigen_factor(hessian: Tensor, dampening: float = 0.01) -> EigenFactor:
    """Dampen ``H`` as SparseGPT does (:func:`dampen`), scale it to a unit diagonal (the Jacobi
    preconditioner applied once, symmetrically) and eigendecompose it."""
    damped, dead = dampen(hessian, dampening)
    scale = torch.diagonal(damped).sqrt()
    scaled = damped / scale.unsqueeze(1) / scale.unsqueeze(0)
    scaled = (scaled + scaled.t()) / 2
    # float32 suffices: the unit diagonal and the dampening bound the condition number, and every ADMM penalty
    # rho adds to the spectrum (the ADMM iterates are float32 too); float64 took 2-3x longer on CPU
    values, vectors = torch.linalg.eigh(scaled.float())
    if not bool(torch.isfinite(values).all()):
        raise CholeskyError(
            f"the eigendecomposition of the layer Hessian ({scaled.shape[0]}x{scaled.shape[0]}) is not finite; "
            "check the calibration activations for NaN/overflow"
        )
    return EigenFactor(scaled.float(), vectors.float(), values.clamp(min=0.0), scale.float(), dead, dampening)


def inverse_factor(hessian: Tensor, dampening: float = 0.01, max_retries: int = 5) -> InverseFactor:
    """Damp ``H`` by ``dampening * mean(diag H)`` and factor its inverse.

    If a Cholesky factorisation fails (H is singular or badly conditioned, e.g. too few
    calibration tokens for the layer width), the dampening is multiplied by 10 and the
    factorisation retried, up to ``max_retries`` times; the result records it. Never falls back
    to another criterion: after the last retry it raises :class:`CholeskyError`.
    """
    h, dead, mean_diagonal = _prepared(hessian, dampening)
    lam = dampening
    for retry in range(max_retries + 1):
        # H + lambda * mean(diag H) * I, without materialising I: at most three n x n matrices alive at once
        # (a block's largest Hessian dominates the peak memory of out-of-core pruning)
        damped = h.clone()
        damped.diagonal().add_(lam * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return InverseFactor(upper, dead, lam, retry)
        lam *= 10.0
    raise CholeskyError(
        f"the layer Hessian ({h.shape[0]}x{h.shape[0]}) is not positive definite even with dampening "
        f"{lam / 10:g} x mean(diag H) after {max_retries} retries; use more calibration data "
        "(--nsamples/--seqlen), or check the calibration activations for NaN/overflow"
    )
