"""ALPS: prune and reconstruct one layer by ADMM with a penalty schedule, then conjugate gradients.

Meng, Behdin, Wang & Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models", arXiv:2406.07831. For a layer ``Y = W X`` with Hessian
``H = 2 X X^T / n`` (shared with SparseGPT: :mod:`secateurs.hessian`, same dampening), ALPS solves

    min_W  (W - W^) H (W - W^)^T   subject to   W in the support set (k nonzeros, or N:M)

by the operator splitting ``W = D`` (section 3.1). With a dual ``V`` and penalty ``rho``:

    W <- (W^ H - V + rho D) (H + rho I)^-1     (the smooth part, a linear solve)
    D <- P(W + V / rho)                        (projection: keep the k largest |.|, or N of every M)
    V <- V + rho (W - D)

``H`` is scaled to a unit diagonal first (``S^-1 H S^-1``, ``S = sqrt(diag H)``, the weights by
``S``), so one penalty schedule fits every layer, and eigendecomposed once: ``(H + rho I)^-1 =
Q diag(1 / (lambda + rho)) Q^T`` for every ``rho`` (section 3.2). ``rho`` grows as the support settles
(every ``update_every`` iterations: x1.3 when more than 10% of the kept entries changed, x1.2 above
0.5%, x1.1 otherwise), so the iterates are driven onto a fixed support (theorem 1); the run stops when
the support no longer changes. If the first checks see no change at all, ``rho`` started too stiff
and is divided by 5 (as the authors' code does; at most 3 times, then the start is taken as
settled). Finally the kept weights are refined by preconditioned conjugate gradients on the final
support (section 3.3), preconditioned by ``diag(H)`` (the unit-diagonal scaling above is exactly that
Jacobi preconditioner, applied symmetrically).

Unstructured supports are chosen over the whole layer (the paper's projection); N:M ones per group
of M inputs. Given a fixed mask (chosen by another criterion: Wanda, magnitude, ...), the support is
kept and only the conjugate-gradient solve on it runs: the best weights for that mask. If the ADMM
hits ``max_iterations`` before its support settles, the projection of its last iterate is still a
valid mask of exactly the requested size; the result says ``converged: False`` and how much of the
support changed over the last check, and the pipeline's report carries it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteError
from ..evidence import Evidence, Need, check_hessian_target
from ..hessian import EigenFactor, check_dampening
from ..layout import from_canonical, to_canonical
from ..patterns import NM, Element, Pattern
from ..scope import Target
from ..selection import keep_mask
from ..spec import Spec, integer, number, option
from .base import Solver, SolveResult, register_solver

#: the authors' schedule: (fraction of kept entries whose support changed, factor on rho)
RHO_STEPS = ((0.1, 1.3), (0.005, 1.2), (0.0, 1.1))
RHO_MAX = 1e6
#: times rho may be divided by 5 when the starting support does not move at all
RELAXATIONS = 3


@dataclass
class ALPSResult:
    """One weight matrix pruned by :func:`alps` (canonical ``(rows, columns)``)."""

    weight: Tensor
    keep: Tensor
    loss: float  # 1/2 (W - W^) H (W - W^)^T summed over rows, H dampened (comparable to SparseGPT's estimate)
    iterations: int  # ADMM iterations run (0: a fixed mask, only the CG solve)
    converged: bool  # the support settled before max_iterations (True for a fixed mask)
    support_change: float  # fraction of the kept entries whose support changed at the last check
    rho: float  # the final penalty
    cg_iterations: int
    cg_residual: float  # max over rows of ||residual on the support|| / ||W^ H on the support||


def _project(z: Tensor, prune: int, nm: NM | None, dead: Tensor) -> Tensor:
    """Keep-mask of the support set nearest to ``z``: the largest ``|z|`` over the whole matrix (``prune``
    entries removed), or per group of M consecutive inputs for N:M. Dead inputs go first."""
    score = z.square().masked_fill(dead, -1.0)
    if nm is None:
        return keep_mask(score.reshape(1, -1), prune).reshape(z.shape)
    return keep_mask(score.reshape(-1, nm.m), nm.m - nm.n).reshape(z.shape)


def _conjugate_gradients(
    h: Tensor, target: Tensor, w: Tensor, keep: Tensor, iterations: int, tolerance: float
) -> tuple[Tensor, int, float]:
    """Solve ``W H = W^ H`` on the support ``keep`` (every row its own system, batched), from ``w``.
    ``h`` has a unit diagonal, so the Jacobi preconditioner is the identity here."""
    mask = keep.to(w.dtype)
    w = w * mask
    residual = (target - w @ h) * mask
    norms = (target * mask).norm(dim=1).clamp(min=1e-30)
    direction = residual.clone()
    rz = residual.square().sum(1)
    done = 0
    for step in range(1, iterations + 1):
        done = step
        hp = (direction @ h) * mask
        curvature = (direction * hp).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp(min=1e-30), torch.zeros_like(rz))
        w = w + alpha.unsqueeze(1) * direction
        residual = residual - alpha.unsqueeze(1) * hp
        rz_next = residual.square().sum(1)
        if bool((rz_next.sqrt() <= tolerance * norms).all()):
            rz = rz_next
            break
        beta = torch.where(rz > 0, rz_next / rz.clamp(min=1e-30), torch.zeros_like(rz))
        direction = residual + beta.unsqueeze(1) * direction
        rz = rz_next
    return w, done, float((rz.sqrt() / norms).max()) if iterations else math.nan


def alps(
    weight: Tensor,
    factor: EigenFactor,
    sparsity: float | None = None,
    pattern: NM | None = None,
    keep: Tensor | None = None,
    options: ALPSOptions | None = None,
) -> ALPSResult:
    """Prune ``weight`` ``(rows, columns)`` with ALPS; see the module docstring.

    Unstructured: exactly ``round(sparsity * numel)`` entries are pruned; N:M: ``pattern`` along the
    columns (``sparsity`` ignored). ``keep`` (bool ``(rows, columns)``): a fixed support; only the
    conjugate-gradient solve on it runs.
    """
    o = options or ALPSOptions()
    rows, columns = weight.shape
    device = weight.device
    h = factor.hessian.to(device)
    scale = factor.scale.to(device)
    dead = factor.dead.to(device).unsqueeze(0).expand(rows, columns)
    w0 = weight.detach().float() * scale  # the weights in the unit-diagonal coordinates
    target = w0 @ h  # W^ H, the right-hand side of every solve
    iterations, converged, change, rho = 0, True, 0.0, o.rho
    if keep is not None:
        mask = keep.to(device, torch.bool)
        w = w0
    else:
        if pattern is None:
            if sparsity is None or not 0.0 <= sparsity < 1.0:
                raise ConfigError(f"ALPS needs a sparsity in [0, 1) or an N:M pattern, got {sparsity!r}")
            prune = round(sparsity * rows * columns)
        else:
            if columns % pattern.m:
                raise ConfigError(
                    f"N:M {pattern.spec()} needs the input dimension ({columns}) divisible by {pattern.m}"
                )
            prune = rows * columns // pattern.m * (pattern.m - pattern.n)
        kept = max(rows * columns - prune, 1)
        mask = _project(w0, prune, pattern, dead)
        d = w0 * mask
        v = torch.zeros_like(w0)
        w = w0
        inverse = factor.penalized_inverse(rho).to(device)
        previous, settled, converged, relaxed = mask, False, prune == 0, 0
        for step in range(1, 0 if converged else o.max_iterations + 1):
            iterations = step
            w = (target - v + rho * d) @ inverse
            z = w + v / rho
            mask = _project(z, prune, pattern, dead)
            d = z * mask
            v = v + rho * (w - d)
            if step % o.update_every:
                continue
            changed = int((mask != previous).sum())
            previous = mask
            change = changed / kept
            if changed == 0 and (settled or relaxed == RELAXATIONS):  # settled (or the start was already stable)
                converged = True
                break
            if changed == 0:  # no entry moved from the magnitude start: rho began too stiff
                rho /= 5.0
                relaxed += 1
            else:
                settled = True
                rho *= next(f for threshold, f in RHO_STEPS if change > threshold)
                if iterations >= o.switch_iteration and change < o.tolerance:
                    converged = True
                    break
            rho = min(rho, RHO_MAX)
            inverse = factor.penalized_inverse(rho).to(device)
        mask = _project(w, prune, pattern, dead)  # the ADMM's weights, onto the nearest support
    w, cg_done, cg_residual = _conjugate_gradients(
        h, target, w, mask, o.cg_iterations if keep is None else o.cg_iterations_fixed, o.cg_tolerance
    )
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError("ALPS produced NaN/Inf weights; the Hessian is ill-conditioned, raise dampening")
    delta = w - w0
    loss = float(((delta @ h) * delta).sum().double()) / 2
    new = (w / scale).masked_fill(~mask, 0.0)
    return ALPSResult(new.to(weight.dtype), mask, loss, iterations, converged, change, rho, cg_done, cg_residual)


@register_solver
class ALPSSolver(Solver):
    """ADMM with a penalty schedule, then conjugate gradients on the support (ALPS, Meng et al. 2024,
    arXiv:2406.07831). Chooses element or N:M masks itself (``prune(model, "alps", ...)``, or
    ``solver="alps"`` with the ``sparsegpt`` criterion), or finds the best weights for a mask another
    criterion chose (``prune(model, "wanda", 0.5, mode="reconstruct", solver="alps")``).

    Options: ``rho`` (0.1, the initial penalty, on the unit-diagonal Hessian), ``max_iterations`` (300),
    ``update_every`` (3), ``switch_iteration`` (30: after it, a support change below ``tolerance``
    (3e-4) ends the ADMM), ``cg_iterations`` (10 after ADMM), ``cg_iterations_fixed`` (100 for a given
    mask), ``cg_tolerance`` (1e-4), ``dampening`` (0.01 x mean diag H, as SparseGPT).
    """

    name = "alps"
    needs = frozenset({Need.HESSIAN})
    modes = ("reconstruct",)
    adaptive = True
    patterns = ("element", "n:m")

    def __init__(
        self, rho: float = 0.1, max_iterations: int = 300, update_every: int = 3, switch_iteration: int = 30,
        tolerance: float = 3e-4, cg_iterations: int = 10, cg_iterations_fixed: int = 100, cg_tolerance: float = 1e-4,
        dampening: float = 0.01,
    ) -> None:  # fmt: skip
        options = ALPSOptions(rho, max_iterations, update_every, switch_iteration, tolerance, cg_iterations,
                              cg_iterations_fixed, cg_tolerance, dampening)  # fmt: skip
        for name in ALPSOptions.field_names():
            setattr(self, name, getattr(options, name))
        self._options = options

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
            raise ConfigError(f"ALPS chooses element or N:M masks, not {pattern.spec() if pattern else None!r}")
        results = {}
        for t in targets:
            factors = evidence.eigen_factors(t, self._options.dampening)  # q/k/v: decomposed once
            w3 = to_canonical(t.parameter.detach(), t.layout)
            out, spatial, inp = w3.shape
            rows = out // len(factors)
            keep3 = None if masks is None else to_canonical(masks[t.name].to(w3.device), t.layout)
            sparsity = None if sparsities is None else sparsities[t.name]
            new3 = torch.empty_like(w3)
            chosen3 = torch.empty(w3.shape, dtype=torch.bool, device=w3.device)
            info: dict[str, Any] = {"loss": 0.0, "dampening": self._options.dampening, "retries": 0,
                                    "iterations": 0, "converged": True, "support_change": 0.0,
                                    "cg_iterations": 0, "cg_residual": 0.0}  # fmt: skip
            for g, factor in enumerate(factors):
                part = slice(g * rows, (g + 1) * rows)
                fixed = None if keep3 is None else keep3[part].reshape(rows, spatial * inp)
                r = alps(w3[part].reshape(rows, spatial * inp), factor, None if nm else sparsity, nm, fixed,
                         self._options)  # fmt: skip
                new3[part] = r.weight.reshape(rows, spatial, inp)
                chosen3[part] = r.keep.reshape(rows, spatial, inp)
                info["loss"] += r.loss
                info["iterations"] = max(info["iterations"], r.iterations)
                info["converged"] = info["converged"] and r.converged
                info["support_change"] = max(info["support_change"], r.support_change)
                info["cg_iterations"] = max(info["cg_iterations"], r.cg_iterations)
                info["cg_residual"] = max(info["cg_residual"], r.cg_residual)
            results[t.name] = SolveResult(
                keep=from_canonical(chosen3, t.layout, t.shape),
                weight=from_canonical(new3, t.layout, t.shape),
                info=info,
            )
        return results


@dataclass(frozen=True)
class ALPSOptions(Spec):
    """Validated ALPS options (the authors' defaults)."""

    _prefix = "solver_options."

    rho: float = option(0.1, check=number(0.0, float("inf"), low_open=True, high_open=True))
    max_iterations: int = option(300, check=integer(1))
    update_every: int = option(3, check=integer(1))
    switch_iteration: int = option(30, check=integer(0))
    tolerance: float = option(3e-4, check=number(0.0, 1.0))
    cg_iterations: int = option(10, check=integer(0))
    cg_iterations_fixed: int = option(100, check=integer(0))
    cg_tolerance: float = option(1e-4, check=number(0.0, 1.0, low_open=True))
    dampening: float = option(0.01, check=check_dampening)
