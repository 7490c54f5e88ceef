"""Movement pruning during fine-tuning (Sanh, Wolf & Rush 2020, arXiv:2005.07683), hard and soft.

- **Hard** (``method='movement', regularizer='movement'``, a cubic schedule): the regularizer
  accumulates ``S += -W * dL/dW'`` at every ``pruner.regularize()`` (after ``backward()``, before the
  optimizer changes ``W``), where ``W' = W * M`` is the masked weight the layer computes with: the
  paper's straight-through estimator, which gives every score the gradient of the masked weight,
  so a pruned weight's score keeps moving. The ``movement`` criterion keeps the top-v of ``S`` at
  each scheduled step, chosen afresh from all weights (a pruned weight whose score rose comes back,
  with the value it had when it was pruned: its own gradient is zero under the mask, as the paper's
  ``dL/dW = M * dL/dW'``).
- **Soft** (``regularizer='soft_movement'``): each weight gets a learned score ``S`` and the layer
  computes with ``W * 1[S > 0]``, the gradient reaching ``S`` through the straight-through
  estimator (``dL/dS = dL/dW' * W``, the paper's eq. 5); the penalty ``strength * sum sigmoid(S)``
  (the paper's L1 on the scores' sigmoid) pushes scores below the threshold. The sparsity is not
  set but comes from the strength, which the paper ramps in with a cubic schedule
  (``strength_schedule={'kind': 'cubic', ...}``). The paper trains the scores with their own,
  much larger learning rate (1e-2 against 3e-5 for the weights): give them their own optimizer
  parameter group (:meth:`SoftMovement.score_parameters`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from ..adam import adam_direction
from ..criteria.movement import accumulate, movement_scores, reset_scores
from ..errors import ConfigError
from ..masking import Gate, current_mask
from ..scope import Target
from ..spec import is_number
from .gates import _GateRegularizer
from .regularizers import Contribution, Regularizer, register_regularizer


@register_regularizer
class MovementScores(Regularizer):
    """Accumulates hard movement pruning's scores ``S = -sum_t W * dL/dW`` for the weights in scope;
    adds no gradient (``strength`` is unused). Pair it with ``method='movement'``."""

    name = "movement"
    UPDATES = ("sum", "adam")

    def __init__(self, strength: float = 0.0, strength_schedule: Mapping[str, Any] | None = None,
                 score_update: str = "sum") -> None:  # fmt: skip
        """``score_update='sum'``: ``S`` is the raw sum of ``-W * dL/dW'`` (the paper's eq., SGD on the
        scores); ``'adam'``: ``S`` takes Adam's normalised steps on ``dL/dS = W * dL/dW'`` (betas 0.9, 0.999),
        as the authors' released code trains its scores, so each score's steps are scaled by its own
        history and large weights do not fill both ends of the ranking. The ranking does not depend on the
        scores' learning rate (they all start at 0), so there is none to set."""
        super().__init__(strength, strength_schedule)
        if score_update not in self.UPDATES:
            raise ConfigError(f"regularizer_options.score_update must be one of {self.UPDATES}, got {score_update!r}")
        self.score_update = score_update
        self._adam: dict[str, dict] = {}  # per target: Adam's moments (adam_direction's state)

    def options(self) -> dict[str, Any]:
        extra = {"score_update": self.score_update} if self.score_update != "sum" else {}
        return {**super().options(), **extra}

    def bind(self, model: nn.Module, targets: Sequence[Target], example_inputs: Any = None) -> None:
        if not targets:
            raise ConfigError("regularizer 'movement' scores the weights in scope, and the scope selects none")
        for handle in getattr(self, "_handles", []):  # bound again (after a removal step): hook afresh
            handle.remove()
        self._adam = {}
        for handle in getattr(self, "_watched", {}).values():
            handle.remove()
        self._targets = list(targets)
        self._masked_grads: dict[str, Tensor] = {}
        self._watched = WeakIdKeyDictionary()  # the parametrization lists already hooked
        self._handles = [module.register_forward_pre_hook(self._watch(t.name, param))
                         for t in self._targets for _, module, param in t.users]  # fmt: skip

    def _watch(self, name: str, param: str) -> Any:
        """Before each forward of a holder: if its weight is masked now, make the masked weight ``W'``
        it computes with report its gradient (the straight-through ``dL/dW'``)."""

        def pre_hook(module: nn.Module, args: Any) -> None:
            if not parametrize.is_parametrized(module, param):
                return
            chain = module.parametrizations[param]
            if chain not in self._watched:
                self._watched[chain] = chain.register_forward_hook(self._capture(name))

        return pre_hook

    def _capture(self, name: str) -> Any:
        def forward_hook(chain: nn.Module, args: Any, masked: Tensor) -> None:
            if masked.requires_grad:
                masked.register_hook(lambda grad: self._add_masked_grad(name, grad))

        return forward_hook

    def _add_masked_grad(self, name: str, grad: Tensor) -> None:
        seen = self._masked_grads.get(name)
        self._masked_grads[name] = grad.detach().clone() if seen is None else seen + grad.detach()

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        return 0.0, []

    def penalize(self) -> float:
        with torch.no_grad():
            for t in self._targets:
                w = t.parameter
                # dL/dW' when the weight is masked (dL/dW is zero where the mask is), else dL/dW itself
                grad = self._masked_grads.pop(t.name, None)
                if grad is None:
                    grad = w.grad
                if grad is not None:
                    accumulate(w, -self._step(t.name, w.detach() * grad))
        self._masked_grads.clear()
        return 0.0

    def _step(self, name: str, grad: Tensor) -> Tensor:
        """The descent step on ``S`` for ``dL/dS = grad``: the gradient itself, or Adam's normalised step."""
        if self.score_update == "sum":
            return grad
        return adam_direction(self._adam.setdefault(name, {}), grad.float(), 1e-8)

    def reset(self) -> None:
        """Forget the accumulated scores (and Adam's moments)."""
        self._adam.clear()
        for t in self._targets:
            reset_scores(t.parameter)

    def group_norms(self) -> dict[str, Tensor]:
        out = {}
        for t in self._targets:
            mask = current_mask(t)
            w = t.parameter.detach().abs()
            out[t.name] = w if mask is None else torch.where(mask, w, 0.0)
        return out

    def scores(self) -> dict[str, Tensor | None]:
        return {t.name: movement_scores(t.parameter) for t in self._targets}


class _StraightThrough(torch.autograd.Function):
    """``1[S > 0]`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, scores: Tensor) -> Tensor:  # type: ignore[override]
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class MovementScoreGate(Gate):
    """Soft movement pruning's gate: ``W * 1[S > 0]`` with learned scores ``S`` (straight-through)."""

    def __init__(self, weight: Tensor, initial_score: float = 1.0) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.full_like(weight.detach(), initial_score))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * _StraightThrough.apply(self.scores).to(weight.dtype)

    def keep(self) -> Tensor:
        return self.scores.detach() > 0


@register_regularizer
class SoftMovement(_GateRegularizer):
    """Soft movement pruning (Sanh et al. 2020): learned scores, threshold 0, ``strength * sum sigmoid(S)``.

    Args:
        strength: the penalty's weight (the paper's lambda_mvp; it sets the final sparsity).
        initial_score: every score starts here (> 0: every weight kept at the start).
    """

    name = "soft_movement"
    kind = MovementScoreGate

    def __init__(self, strength: float = 1e-4, strength_schedule: Mapping[str, Any] | None = None,
                 initial_score: float = 1.0) -> None:  # fmt: skip
        super().__init__(strength, strength_schedule)
        if not is_number(initial_score) or not initial_score > 0:
            raise ConfigError(f"regularizer_options.initial_score must be > 0 (every weight kept at first), "
                              f"got {initial_score!r}")  # fmt: skip
        self.initial_score = float(initial_score)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "initial_score": self.initial_score}

    def make_gate(self, target: Target) -> Gate:
        return MovementScoreGate(target.parameter, self.initial_score)

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        with torch.enable_grad():
            value = sum(torch.sigmoid(g.scores).sum() for _, g in self._gated)
            return self._autograd(strength, value, [(f"{t.name}.scores", g.scores) for t, g in self._gated])

    def score_parameters(self) -> list[nn.Parameter]:
        """The learned scores, to give them their own learning rate (the paper: 1e-2, weights 3e-5)."""
        return [g.scores for _, g in self._gated]

    def group_norms(self) -> dict[str, Tensor]:
        return {t.name: torch.where(g.keep(), t.parameter.detach().abs(), 0.0) for t, g in self._gated}
