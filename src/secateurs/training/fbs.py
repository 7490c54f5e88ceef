"""FBS channel gating (Gao et al. 2019, arXiv:1810.05331) trained by the Pruner's drivers.

``Pruner(model, regularizer='fbs', regularizer_options={'density': 0.5, 'strength': 1e-4})`` gates
the ``Conv2d`` layers in scope (not the model's first convolution, whose input is the image) with
:class:`~secateurs.dynamic.FBSConv` on bind, so build the optimizer *after* the Pruner (the saliency
predictors are new parameters). FBS's lasso ``strength * sum |g(x)|`` sits on the saliencies, i.e.
on activations: its gradient can only reach the predictors and the layers before them through the
loss's own backward pass. So each gate adds the lasso's gradient to its saliencies inside that
backward (the loss value itself is untouched), and :meth:`FBSLasso.penalize`, called by
``pruner.regularize()`` between ``backward()`` and ``optimizer.step()``, checks the saliencies are
finite and returns the penalty's value. The plain loop, the Trainer callback and the Lightning
callback therefore all train FBS unchanged. Do not also add ``FBS.penalty()`` to the loss: that
would count the lasso twice. The lasso enters once per backward: with gradient accumulation over k
micro-batches (whose losses a Trainer divides by k) its effective strength is k times ``strength``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..dynamic.fbs import FBS, FBSConv, add_fbs, check_density
from ..errors import ConfigError, NonFiniteError, StateError
from ..scope import Target
from .regularizers import Contribution, Regularizer, register_regularizer


@register_regularizer
class FBSLasso(Regularizer):
    """``regularizer='fbs'``: FBS gates on the convolutions in scope, trained with the saliency lasso.

    Args:
        strength: the lasso's weight (the paper's lambda; 1e-8 .. 1e-4 depending on the loss scale).
        density: the fraction of output channels each gate keeps per input (the winner-take-all's k).
        skip_first: leave the model's first convolution dense.
    """

    name = "fbs"
    replaces_modules = True

    def __init__(
        self,
        strength: float = 1e-4,
        strength_schedule: Mapping[str, Any] | None = None,
        density: float = 0.5,
        skip_first: bool = True,
    ) -> None:
        super().__init__(strength, strength_schedule)
        check_density(density)
        if not isinstance(skip_first, bool):
            raise ConfigError(f"regularizer_options.skip_first must be True or False, got {skip_first!r}")
        self.density, self.skip_first = float(density), skip_first
        self.fbs: FBS | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "density": self.density, "skip_first": self.skip_first}

    def bind(self, model: nn.Module, targets: Sequence[Target], example_inputs: Any = None) -> None:
        gated = {name: m for name, m in model.named_modules() if isinstance(m, FBSConv)}
        if gated:  # bound again, or a model the user gated with add_fbs: train those gates
            densities = {m.density for m in gated.values()}
            if densities != {self.density}:
                raise ConfigError(
                    f"the model is already gated by FBS at density {sorted(densities)}, but "
                    f"regularizer_options.density is {self.density}; pass the gates' density (or "
                    "fbs.set_density() first)"
                )
            self.fbs = FBS(model, gated, self.skip_first)
        else:
            convs = {t.module_name for t in targets if isinstance(t.module, nn.Conv2d) and t.param_name == "weight"}
            if not convs:
                raise ConfigError(
                    "regularizer 'fbs' gates the Conv2d layers in scope, and the scope selects none; widen "
                    "include= (FBS gates the convolutions of nn.Sequential containers)"
                )
            self.fbs = add_fbs(model, self.density, self.skip_first, only=convs)
        self._sync()

    def _sync(self) -> None:
        for layer in self._layers().values():
            layer.lasso = self.current_strength

    def _layers(self) -> dict[str, FBSConv]:
        if self.fbs is None:
            raise StateError("regularizer 'fbs' is not bound to a model; build it through Pruner(regularizer='fbs')")
        return self.fbs.layers

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        """The lasso's value on the last forward; no gradient to write (it entered during backward)."""
        missing = [name for name, layer in self._layers().items() if layer.last_saliency is None]
        if missing:
            raise StateError(f"no training forward has run through {missing[0]} yet; compute the loss first")
        total = 0.0
        for name, layer in self._layers().items():
            s = layer.last_saliency.detach()
            if not bool(torch.isfinite(s).all()):
                raise NonFiniteError(self._diverged_in_backward(f"{name}.saliency"))
            total += float(s.abs().sum(1).mean())
        return strength * total, []

    def penalize(self) -> float:
        value, _ = self.contributions(self.current_strength)
        if not math.isfinite(value):
            raise NonFiniteError(self._diverged_in_backward("the saliencies"))
        return value

    def _diverged_in_backward(self, where: str) -> str:
        """The lasso's gradient entered ``.grad`` during backward, unlike other penalties': say so."""
        return (f"regularizer 'fbs' at step {self.step}: the predicted saliencies of {where} are not finite; "
                "the gradients of this backward are not finite either, so skip optimizer.step() (the weights "
                "and the optimizer are as before it) and lower the learning rate or "
                f"regularizer_options.strength (now {self.current_strength:g})")  # fmt: skip

    def advance(self) -> None:
        super().advance()
        self._sync()  # the schedule's strength for the next backward

    def group_norms(self) -> dict[str, Tensor]:
        """Per gated layer, each output channel's mean saliency on the last batch (0: never selected)."""
        return {
            name: layer.last_saliency.detach().abs().mean(0)
            for name, layer in self._layers().items()
            if layer.last_saliency is not None
        }
