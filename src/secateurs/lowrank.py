"""Low-rank factorisation: a Linear layer ``W`` (out x in) becomes two, ``up @ down`` of rank ``r``.

Two ways to choose the rank-``r`` factors:

- ``method='svd'``: the truncated SVD of ``W`` (Eckart-Young: the best rank-``r`` weight in
  Frobenius norm, blind to what the layer's inputs look like);
- ``method='whitened'``: activation-aware, as SVD-LLM (Wang et al. 2024, arXiv:2403.07378; ASVD,
  Yuan et al. 2023, arXiv:2312.05821 scales by activations in the same spirit). With the
  calibration inputs' second moment ``X X^T = S S^T`` (Cholesky, the layer Hessian of
  :mod:`secateurs.hessian` gathered by the evidence system), the SVD of ``W S`` truncated to rank ``r``
  and mapped back by ``S^-1`` minimises ``||(W - W') X||_F`` over rank-``r`` ``W'``: the loss of
  each dropped singular value is exactly its square (SVD-LLM, theorem 3.2).

A rank ``r`` stores ``r (in + out)`` weights instead of ``in * out``, so only
``r < in * out / (in + out)`` (the break-even rank) saves anything; a rank at or above it is refused.
The factored layer is :class:`LowRankLinear` (``down``: in -> r, no bias; ``up``: r -> out, with
the original bias). Save it for plain ``from_pretrained`` with
:func:`secateurs.export.variable.save_pretrained_variable`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import ConfigError, DataRequiredError, ScopeError, choices
from .evidence import Evidence, Need, gather, preserved
from .hessian import CholeskyError, check_dampening
from .layout import Layout
from .scope import ScopeSpec, Target, resolve

METHODS = ("svd", "whitened")


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``rank`` Linear layer in two (state-dict keys ``down.weight``,
    ``up.weight``, ``up.bias``; the self-contained modeling file saved beside HF weights defines the same)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory: Any) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, **factory)
        self.up = nn.Linear(rank, out_features, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> Tensor:
        """The dense ``out x in`` weight this pair computes (for inspection; not a parameter)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias


def break_even_rank(in_features: int, out_features: int) -> float:
    """``in * out / (in + out)``: a rank below this stores fewer weights than the dense layer."""
    return in_features * out_features / (in_features + out_features)


def check_rank(name: str, rank: int, in_features: int, out_features: int) -> None:
    """Refuse a rank that saves nothing (or is not a positive integer), naming the break-even rank."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank for {name!r} must be a positive integer, got {rank!r}")
    even = break_even_rank(in_features, out_features)
    if rank >= even:
        most = math.ceil(even) - 1
        raise ConfigError(
            f"rank {rank} for {name!r} ({out_features}x{in_features}) saves nothing: two factors store "
            f"{rank * (in_features + out_features):,} weights vs {in_features * out_features:,} dense; the break-even "
            f"rank is {even:.1f}, so use rank <= {most} (or leave {name!r} out of the scope)"
        )


def rank_for_ratio(ratio: float, in_features: int, out_features: int) -> int:
    """The rank whose two factors keep ``ratio`` of the layer's ``in * out`` weights (rounded down, at least 1)."""
    return max(1, math.floor(ratio * break_even_rank(in_features, out_features)))


@dataclass
class Factors:
    """``W ~= up @ down`` and what the truncation lost."""

    down: Tensor  # (rank, in)
    up: Tensor  # (out, rank)
    singular_values: Tensor  # all of them (of W, or of W S when whitened), descending
    rank: int

    @property
    def dropped_energy(self) -> float:
        """Sum of the squared dropped singular values: ``||W - W'||_F^2`` (plain) or ``||(W - W') S||_F^2``."""
        return float(self.singular_values[self.rank :].double().square().sum())


def svd_factors(weight: Tensor, rank: int, whitening: Tensor | None = None) -> Factors:
    """Rank-``rank`` factors of ``weight`` (out x in), in float64.

    ``whitening``: a lower-triangular ``S`` with ``S S^T`` the inputs' second moment; then the SVD is of
    ``W S`` and ``down = sqrt(Sigma_r) V_r^T S^-1`` (SVD-LLM, arXiv:2403.07378, eq. 4). The singular values
    are split evenly between the two factors (sqrt each), which keeps both well scaled."""
    w = weight.detach().double()
    target = w if whitening is None else w @ whitening.double()
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]
    if whitening is not None:  # down S = sqrt(Sigma_r) V_r^T  =>  down = sqrt(Sigma_r) V_r^T S^-1
        down = torch.linalg.solve_triangular(whitening.double(), down, upper=False, left=False)
    return Factors(down, u[:, :rank] * root[None, :], s, rank)


def whitening_factor(hessian: Tensor, dampening: float = 0.01, max_retries: int = 5) -> tuple[Tensor, float]:
    """Lower Cholesky factor ``S`` of ``H + lambda mean(diag H) I`` (``H`` ~ ``X X^T``) and the ``lambda`` used.

    Raised tenfold on failure, as :func:`secateurs.hessian.inverse_factor` does; never falls back to the
    plain SVD silently (:class:`~secateurs.hessian.CholeskyError` after the last retry)."""
    check_dampening("dampening", dampening)
    h = hessian.double()
    scale = float(torch.diagonal(h).mean().clamp_min(1e-12))
    lam = dampening
    for _ in range(max_retries + 1):
        lower, info = torch.linalg.cholesky_ex(h + lam * scale * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        if int(info) == 0:
            return lower, lam
        lam *= 10.0
    raise CholeskyError(
        f"the input second moment ({h.shape[0]}x{h.shape[0]}) is not positive definite even with dampening "
        f"{lam / 10:g}; use more calibration data, or method='svd'"
    )


@dataclass
class LayerFactorisation:
    name: str
    in_features: int
    out_features: int
    rank: int
    params_before: int  # weights only (the bias is kept as is)
    params_after: int
    dropped_energy: float = 0.0  # sum of squared dropped singular values (of W, or W S when whitened)
    dampening: float | None = None  # whitened: the lambda its Cholesky took


@dataclass
class LowRankReport:
    method: str
    layers: list[LayerFactorisation] = field(default_factory=list)
    params_before: int = 0  # the whole model
    params_after: int = 0

    def summary(self) -> str:
        saved = 1 - self.params_after / max(self.params_before, 1)
        return (
            f"low-rank ({self.method}): {len(self.layers)} layers factored; params "
            f"{self.params_before:,} -> {self.params_after:,} ({saved:.1%} fewer)"
        )


def _targets(model: nn.Module, scope: Any) -> list[Target]:
    spec = ScopeSpec.from_value(scope if scope is not None else {"types": ["Linear", "Conv1D"]})
    targets = [t for t in resolve(model, spec) if t.layout in (Layout.LINEAR, Layout.TRANSPOSED)]
    if not targets:
        raise ScopeError(f"no Linear (or transformers Conv1D) layer of {type(model).__name__} is in the scope {spec}")
    for t in targets:
        if t.tied:
            raise ScopeError(f"{t.name} is shared with {t.tied_names}; a tied weight cannot be factored: exclude it")
        if parametrize.is_parametrized(t.module):
            raise ScopeError(f"{t.module_name!r} is masked (parametrized); bake or unmask it before factoring")
    return targets


def _ranks(targets: Sequence[Target], rank: int | Mapping[str, int] | None, ratio: float | None) -> dict[str, int]:
    if (rank is None) == (ratio is None):
        raise ConfigError("give exactly one of rank= (an int, or a dict module name -> int) and ratio= (0 < ratio < 1)")
    out: dict[str, int] = {}
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise ConfigError(f"ratio is the fraction of each layer's weights to keep, 0 < ratio < 1; got {ratio!r}")
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - {t.module_name for t in targets})
        if unknown:
            raise ConfigError(f"rank names {unknown}, which are not factorable layers in the scope")
    for t in targets:
        o, _, i = t.canonical_shape
        if ratio is not None:
            r = rank_for_ratio(float(ratio), i, o)
        elif isinstance(rank, Mapping):
            if t.module_name not in rank:
                continue
            r = rank[t.module_name]
        else:
            r = rank
        check_rank(t.module_name, r, i, o)
        out[t.module_name] = r
    return out


def _dense_weight(target: Target) -> Tensor:
    w = target.parameter.detach()
    return w.t() if target.layout is Layout.TRANSPOSED else w  # Conv1D stores (in, out)


def factorize(
    model: nn.Module,
    rank: int | Mapping[str, int] | None = None,
    *,
    ratio: float | None = None,
    method: str = "whitened",
    calibration: Sequence[Any] | None = None,
    scope: Any = None,
    dampening: float = 0.01,
) -> LowRankReport:
    """Replace every Linear (and transformers ``Conv1D``) in ``scope`` by a :class:`LowRankLinear`, in place.

    Args:
        rank: one rank for every layer, or a dict module name -> rank (the layers it names only).
        ratio: instead of ``rank``: the fraction of each layer's weights its factors keep (0 < ratio < 1).
        method: ``'whitened'`` (activation-aware, needs ``calibration``) or ``'svd'`` (plain truncated SVD).
        calibration: model input batches (whitened only).
        scope: which layers (a :class:`~secateurs.ScopeSpec`, its dict, or include globs); by default every
            Linear and Conv1D except the first and last layer of the model (the LM head).
        dampening: added to ``X X^T`` as a fraction of its mean diagonal before the Cholesky.

    Everything is computed and checked before a single module is replaced; a refusal leaves the model
    as it was. Returns a :class:`LowRankReport` (parameters before and after, rank per layer).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown low-rank method {method!r}; valid: {choices(METHODS)}")
    check_dampening("dampening", dampening)
    targets = _targets(model, scope)
    ranks = _ranks(targets, rank, ratio)
    targets = [t for t in targets if t.module_name in ranks]
    whitening = _whitening(model, targets, calibration, dampening) if method == "whitened" else {}
    params_before = sum(p.numel() for p in model.parameters())
    report = LowRankReport(method, params_before=params_before)
    replacements = {}
    for t in targets:
        w = _dense_weight(t)
        o, i = w.shape
        lower, lam = whitening.get(t.module_name, (None, None))
        factors = svd_factors(w, ranks[t.module_name], lower)
        replacements[t.module_name] = _low_rank_module(t, factors)
        layer = LayerFactorisation(t.module_name, i, o, factors.rank, i * o, factors.rank * (i + o))
        layer.dropped_energy, layer.dampening = factors.dropped_energy, lam
        report.layers.append(layer)
    for name, module in replacements.items():  # commit: nothing above mutated the model
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def _whitening(
    model: nn.Module, targets: Sequence[Target], calibration: Sequence[Any] | None, dampening: float
) -> dict[str, tuple[Tensor, float]]:
    if not calibration:
        raise DataRequiredError(
            "method='whitened' reads the layers' inputs: pass calibration=[batch, ...] (or method='svd')"
        )
    evidence = Evidence(model, list(targets), batches=list(calibration), show_progress=False)
    with preserved(model, targets):
        gather(evidence, frozenset({Need.HESSIAN}))
    out = {}
    for t in targets:
        out[t.module_name] = whitening_factor(evidence.hessian(t).hessian, dampening)
    return out


def _low_rank_module(target: Target, factors: Factors) -> LowRankLinear:
    w = target.parameter
    o, i = factors.up.shape[0], factors.down.shape[1]
    bias = getattr(target.module, "bias", None)
    module = LowRankLinear(i, o, factors.rank, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        module.down.weight.copy_(factors.down)
        module.up.weight.copy_(factors.up)
        if bias is not None:
            module.up.bias.copy_(bias.detach())
    module.train(target.module.training)
    return module
