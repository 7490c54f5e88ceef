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
With a fixed mask (chosen by any criterion, e.g. Wanda) only the OBS update runs; a convolution
is solved over its unfolded input patches, one Hessian per group (OBC, arXiv:2208.11580).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteError
from ..evidence import Evidence, Need, check_hessian_target
from ..hessian import InverseFactor, check_dampening
from ..layout import from_canonical, to_canonical
from ..patterns import NM, Element, Pattern
from ..scope import Target
from ..selection import keep_mask
from ..spec import Spec, integer, option
from .base import Solver, SolveResult, register_solver


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
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Prune ``weight`` ``(out, in)`` with the OBS update; returns ``(new weight, keep mask, loss)``.

    ``loss`` is the OBS estimate ``sum w^2 / (2 [H^-1]_qq)`` of the added squared error.
    Unstructured: ``sparsity`` of every column block is pruned (exact for the layer in total).
    N:M: ``pattern`` is applied along the input dimension, and ``sparsity`` is ignored.
    ``keep`` (bool ``(out, in)``): a fixed mask; only the reconstruction runs (the same column
    sweep with the selection step left out).
    """
    if blocksize < 1:
        raise ConfigError(f"SparseGPT blocksize must be positive, got {blocksize!r}")
    rows, columns = weight.shape
    choose = keep is None
    if choose:
        if pattern is None and (sparsity is None or not 0.0 <= sparsity < 1.0):
            raise ConfigError(f"SparseGPT needs a sparsity in [0, 1) or an N:M pattern, got {sparsity!r}")
        if pattern is not None:
            blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
            if columns % pattern.m:
                raise ConfigError(
                    f"N:M {pattern.spec()} needs the input dimension ({columns}) divisible by {pattern.m}"
                )
        keep = torch.ones(rows, columns, dtype=torch.bool, device=weight.device)
    else:
        keep = keep.to(weight.device, torch.bool)
    nm = pattern if choose else None
    w = weight.detach().float().clone()
    # An input that was always 0 in calibration (a dead ReLU channel) has no Hessian coupling: its
    # weights cost nothing to prune (saliency 0, so an adaptive mask drops them first), their error is
    # not spread to other columns, and where the mask keeps them they stay as they are. (The reference
    # code zeroes them all up front, which prunes more than asked when the mask keeps some.)
    dead = inverse.dead.to(w.device)
    hinv = inverse.factor
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    counts = block_prune_counts(rows, columns, blocksize, sparsity or 0.0) if choose and nm is None else []
    for b, start in enumerate(range(0, columns, blocksize)):
        end = min(start + blocksize, columns)
        w1 = w[:, start:end].clone()
        h1 = hinv[start:end, start:end]
        d = torch.diagonal(h1)
        err = torch.zeros_like(w1)
        if counts:  # adaptive mask selection for the whole block (section 3.4)
            saliency = (w1.square() / d.square()).masked_fill(dead[start:end], 0.0)
            keep[:, start:end] = keep_mask(saliency.reshape(1, -1), counts[b]).reshape(w1.shape)
        for i in range(end - start):
            if nm is not None and i % nm.m == 0:
                group = slice(start + i, start + i + nm.m)
                saliency = w1[:, i : i + nm.m].square() / d[i : i + nm.m].square()
                keep[:, group] = keep_mask(saliency.masked_fill(dead[group], 0.0), nm.m - nm.n)
            pruned = w1[:, i].masked_fill(keep[:, start + i] | dead[start + i], 0.0)
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


@register_solver
class SparseGPTSolver(Solver):
    """OBS reconstruction (SparseGPT, Frantar & Alistarh 2023, arXiv:2301.00774): the surviving weights
    of each row absorb the pruned ones' error; with the ``sparsegpt`` criterion it also chooses the
    mask column block by column block (adaptive selection).

    Options: ``blocksize`` (128 columns per lazy update), ``dampening`` (0.01 x mean diag H),
    ``max_retries`` (5: each failed Cholesky retries with 10x the dampening, and says so).
    """

    name = "sparsegpt"
    needs = frozenset({Need.HESSIAN})
    modes = ("reconstruct",)
    adaptive = True
    patterns = ("element", "n:m")

    def __init__(self, blocksize: int = 128, dampening: float = 0.01, max_retries: int = 5) -> None:
        options = _SparseGPTOptions(blocksize, dampening, max_retries)
        self.blocksize, self.dampening, self.max_retries = options.blocksize, options.dampening, options.max_retries

    def validate(self, targets: Sequence[Target], mode: str) -> None:
        for t in targets:
            check_hessian_target(t)

    def solve(
        self,
        targets: Sequence[Target],
        evidence: Evidence,
        masks: Mapping[str, Tensor] | None,
        sparsities: Mapping[str, float] | None = None,
        pattern: Pattern | None = None,
    ) -> dict[str, SolveResult]:
        nm = pattern if isinstance(pattern, NM) else None
        if masks is None and not isinstance(pattern, (Element, NM)):
            raise ConfigError(f"SparseGPT chooses element or N:M masks, not {pattern.spec() if pattern else None!r}")
        results = {}
        for t in targets:
            factors = evidence.inverse_factors(t, self.dampening, self.max_retries)  # q/k/v: factored once
            w3 = to_canonical(t.parameter.detach(), t.layout)
            out, spatial, inp = w3.shape
            groups = len(factors)
            rows = out // groups
            keep3 = None if masks is None else to_canonical(masks[t.name].to(w3.device), t.layout)
            sparsity = None if sparsities is None else sparsities[t.name]
            new3 = torch.empty_like(w3)
            chosen3 = torch.empty(w3.shape, dtype=torch.bool, device=w3.device)
            dampening, retries = evidence.dampening[t.name]
            info: dict[str, Any] = {"loss": 0.0, "dampening": dampening, "retries": retries}
            for g, factor in enumerate(factors):
                part = slice(g * rows, (g + 1) * rows)
                weight2 = w3[part].reshape(rows, spatial * inp)
                fixed = None if keep3 is None else keep3[part].reshape(rows, spatial * inp)
                new, keep, loss = sparsegpt(weight2, factor, None if nm else sparsity, nm, self.blocksize, fixed)
                new3[part] = new.reshape(rows, spatial, inp)
                chosen3[part] = keep.reshape(rows, spatial, inp)
                info["loss"] += loss
            results[t.name] = SolveResult(
                keep=from_canonical(chosen3, t.layout, t.shape),
                weight=from_canonical(new3, t.layout, t.shape),
                info=info,
            )
        return results


@dataclass(frozen=True)
class _SparseGPTOptions(Spec):
    """Validated SparseGPT options (the paper: 128, 0.01)."""

    _prefix = "solver_options."

    blocksize: int = option(128, check=integer(1))
    dampening: float = option(0.01, check=check_dampening)
    max_retries: int = option(5, check=integer(0))
