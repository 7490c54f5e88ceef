"""Training-time penalties, the seam that structured sparsity learning plugs into.

A :class:`Regularizer` is bound to a model (:meth:`Regularizer.bind`, which validates and resolves
the tensors it acts on) when the pruner is built, and bound again after every step that replaces
parameters by smaller tensors (``mode='remove'``, ``event.reshaped``), so it never penalises tensors
the model no longer holds. It is driven by :class:`secateurs.Pruner`:

- ``pruner.regularize()`` between ``loss.backward()`` and ``optimizer.step()`` adds the penalty's
  (sub)gradient to ``.grad`` and returns the penalty's value (for logging);
- ``pruner.step()`` after ``optimizer.step()`` calls :meth:`Regularizer.proximal`, for penalties
  whose proximal operator produces exact zeros.

Register your own with ``@register_regularizer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..masking import current_mask
from ..registry import Registry
from ..scope import Target
from ..spec import is_number

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")  # base set below, once the class exists


class Regularizer:
    """Base class: override :meth:`bind` (what it acts on) and :meth:`penalize`."""

    name: ClassVar[str]

    def __init__(self, strength: float = 1e-4) -> None:
        if not is_number(strength) or not strength >= 0:
            raise ConfigError(f"regularizer_options.strength must be a number >= 0, got {strength!r}")
        self.strength = float(strength)
        self._tensors: list[tuple[Tensor, Tensor | None]] = []

    def options(self) -> dict[str, Any]:
        return {"strength": self.strength}

    def bind(self, model: nn.Module, targets: Sequence[Target]) -> None:
        """Resolve and validate what the penalty acts on: before training starts, and again after each
        step that replaced the model's parameters by new tensors (structural removal). Resolve the
        tensors here, afresh each time; anything kept per tensor starts over."""
        raise NotImplementedError

    def penalize(self) -> float:
        """Add the penalty's gradient to ``.grad``; return its value."""
        raise NotImplementedError

    def proximal(self) -> None:
        """After the optimizer step: the penalty's proximal step (default: none)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength!r})"


def _l1_step(tensors: Sequence[tuple[Tensor, Tensor | None]], strength: float) -> float:
    """Subgradient of ``strength * sum |w|`` over the entries still alive."""
    total = 0.0
    with torch.no_grad():
        for tensor, alive in tensors:
            sign = tensor.sign() if alive is None else tensor.sign() * alive
            if tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
            tensor.grad.add_(sign, alpha=strength)
            total += float(tensor.abs().sum() if alive is None else (tensor.abs() * alive).sum())
    return strength * total


REGULARIZERS.base = Regularizer


@REGULARIZERS.register
class L1(Regularizer):
    """L1 on the weights in scope (masked entries excluded): drives unimportant weights toward zero
    before magnitude pruning (Han et al. 2015, arXiv:1506.02626)."""

    name = "l1"

    def bind(self, model: nn.Module, targets: Sequence[Target]) -> None:
        if not targets:
            raise ConfigError("regularizer 'l1' acts on the weights in scope, and the scope selects none")
        self._targets = list(targets)

    def penalize(self) -> float:
        tensors = []
        for t in self._targets:
            mask = current_mask(t)
            tensors.append((t.parameter, None if mask is None else mask.to(t.parameter.dtype)))
        return _l1_step(tensors, self.strength)


@REGULARIZERS.register
class BNScaleL1(Regularizer):
    """Network slimming (Liu et al. 2017, arXiv:1708.06519): L1 on every BatchNorm scale, so that
    unimportant channels' scales go to zero during training; then ``method='bn_scale'`` with
    ``mode='remove'`` takes them out (the paper's strength is 1e-4 to 1e-5)."""

    name = "bn_l1"

    def bind(self, model: nn.Module, targets: Sequence[Target]) -> None:
        scales = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
        if not scales:
            raise ConfigError("regularizer 'bn_l1' penalises BatchNorm scales, and the model has no affine BatchNorm")
        self._tensors = [(w, None) for w in scales]

    def penalize(self) -> float:
        return _l1_step(self._tensors, self.strength)


def register_regularizer(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator: make a regularizer available by its ``name`` (``regularizer='name'``)."""
    return REGULARIZERS.register(cls)


def make_regularizer(value: str | Regularizer | None, options: Mapping[str, Any] | None = None) -> Regularizer | None:
    if value is None:
        if options:
            raise ConfigError("regularizer_options were given without a regularizer")
        return None
    return REGULARIZERS.build(value, options, "regularizer_options")
