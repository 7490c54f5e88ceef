"""SparseGPT: prune and reconstruct one layer by approximate Optimal Brain Surgeon.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", arXiv:2301.00774. For a layer ``Y = W X`` the loss of a pruned ``W^`` is
``||W X - W^ X||^2``, whose Hessian is ``H = 2 X X^T`` (the same for every output row).
Columns are processed left to right; pruning weight ``w_q`` costs ``w_q^2 / [H^-1]_qq`` (OBS
saliency) and the remaining weights of its row absorb the error through
``delta = -(w_q / [H^-1]_qq) * H^-1_{q,:}`` (the paper's eq. 3), using the rows of the upper
Cholesky factor of ``H^-1`` so no inverse is updated (section 3.2). Updates are applied
lazily, ``blocksize`` columns at a time (section 3.3), and the mask of each column block is
chosen adaptively at its start from the saliencies of the current, already updated weights
(section 3.4); for N:M the mask of every M columns is chosen when the first of them is reached.

This is the ``reconstruct`` application mode: surviving weights change, pruned ones become 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteError, SecateursError
from ..patterns import NM
from ..selection import check_finite, keep_mask


class CholeskyError(SecateursError, ArithmeticError):
    """H + damping stayed non positive-definite after every retry with more damping."""


class HessianAccumulator:
    """``H = (2 / n) * sum_k x_k x_k^T`` over the n calibration positions seen.

    The sum is accumulated unscaled in float32 (one ``addmm`` per batch) and divided once at
    the end; rescaling a running mean after every batch, as the reference code does, costs
    an extra pass over H per batch for no accuracy that matters at calibration sizes.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        self._sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.positions = 0

    def add(self, inputs: Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        self._sum.addmm_(x.t(), x)
        self.positions += x.shape[0]

    @property
    def hessian(self) -> Tensor:
        return self._sum * (2.0 / max(self.positions, 1))


@dataclass
class InverseFactor:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` and how it was obtained."""

    factor: Tensor  # (I, I) upper triangular
    dead: Tensor  # (I,) bool: inputs that were always zero in calibration
    dampening: float  # lambda as a fraction of mean(diag H) that finally worked
    retries: int  # how many times dampening had to be raised


def inverse_factor(hessian: Tensor, dampening: float = 0.01, max_retries: int = 5) -> InverseFactor:
    """Damp ``H`` by ``dampening * mean(diag H)`` and factor its inverse.

    If a Cholesky factorisation fails (H is singular or badly conditioned, e.g. too few
    calibration tokens for the layer width), the dampening is multiplied by 10 and the
    factorisation retried, up to ``max_retries`` times; the result records it. Never falls back
    to another criterion: after the last retry it raises :class:`CholeskyError`.
    """
    if not dampening > 0:
        raise ConfigError(f"SparseGPT dampening must be positive, got {dampening!r} (the paper uses 0.01)")
    check_finite(hessian, "the SparseGPT Hessian")
    h = hessian.clone()
    diagonal = torch.diagonal(h)
    dead = diagonal == 0
    diagonal[dead] = 1.0  # an input that was always 0 says nothing; its weights are pruned first
    mean_diagonal = float(diagonal.mean())
    lam = dampening
    for retry in range(max_retries + 1):
        damped = h + lam * mean_diagonal * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return InverseFactor(upper, dead, lam, retry)
        lam *= 10.0
    raise CholeskyError(
        f"the SparseGPT Hessian ({h.shape[0]}x{h.shape[0]}) is not positive definite even with dampening "
        f"{lam / 10:g} x mean(diag H) after {max_retries} retries; use more calibration tokens "
        "(--nsamples/--seqlen), or check the calibration activations for NaN/overflow"
    )


def block_prune_counts(rows: int, columns: int, blocksize: int, sparsity: float) -> list[int]:
    """Weights to prune in each column block so the layer total is exactly round(sparsity * numel):
    block b gets round(s * end_b) - round(s * start_b) (cumulative rounding)."""
    counts = []
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        counts.append(round(sparsity * rows * end) - round(sparsity * rows * start))
    return counts


def sparsegpt(
    weight: Tensor,
    inverse: InverseFactor,
    sparsity: float | None = None,
    pattern: NM | None = None,
    blocksize: int = 128,
) -> tuple[Tensor, Tensor, float]:
    """Prune ``weight`` ``(out, in)`` with the OBS update; returns ``(new weight, keep mask, loss)``.

    ``loss`` is the OBS estimate ``sum w^2 / (2 [H^-1]_qq)`` of the added squared error.
    Unstructured: ``sparsity`` of every column block is pruned (exact for the layer in total).
    N:M: ``pattern`` is applied along the input dimension, and ``sparsity`` is ignored.
    """
    if pattern is None and (sparsity is None or not 0.0 <= sparsity < 1.0):
        raise ConfigError(f"SparseGPT needs a sparsity in [0, 1) or an N:M pattern, got {sparsity!r}")
    if blocksize < 1:
        raise ConfigError(f"SparseGPT blocksize must be positive, got {blocksize!r}")
    rows, columns = weight.shape
    if pattern is not None:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
        if columns % pattern.m:
            raise ConfigError(f"N:M {pattern.spec()} needs the input dimension ({columns}) divisible by {pattern.m}")
    w = weight.detach().float().clone()
    w[:, inverse.dead] = 0.0
    hinv = inverse.factor
    keep = torch.ones(rows, columns, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    counts = block_prune_counts(rows, columns, blocksize, sparsity or 0.0)
    for b, start in enumerate(range(0, columns, blocksize)):
        end = min(start + blocksize, columns)
        w1 = w[:, start:end].clone()
        h1 = hinv[start:end, start:end]
        d = torch.diagonal(h1)
        err = torch.zeros_like(w1)
        if pattern is None:  # adaptive mask selection for the whole block (section 3.4)
            saliency = w1.square() / d.square()
            keep[:, start:end] = keep_mask(saliency.reshape(1, -1), counts[b]).reshape(w1.shape)
        for i in range(end - start):
            if pattern is not None and i % pattern.m == 0:
                saliency = w1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                keep[:, start + i : start + i + pattern.m] = keep_mask(saliency, pattern.m - pattern.n)
            column = w1[:, i]
            pruned = column.masked_fill(keep[:, start + i], 0.0)
            loss += (pruned.double() / d[i].double()).square().sum() / 2  # stays on the device: no sync per column
            e = pruned / d[i]
            # eq. 3 within the block: the remaining columns absorb the error of column i
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err[:, i] = e
        w1.masked_fill_(~keep[:, start:end], 0.0)
        w[:, start:end] = w1
        # lazy batch update (section 3.3): the columns right of the block, all at once
        w[:, end:] -= err @ hinv[start:end, end:]
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("SparseGPT produced NaN/Inf weights; the Hessian is ill-conditioned, raise dampening")
    return w.to(weight.dtype), keep, float(loss)
