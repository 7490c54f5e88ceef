"""Training-time penalties, the seam that structured sparsity learning plugs into.

A :class:`Regularizer` is bound to a model (:meth:`Regularizer.bind`, which validates and resolves
the tensors it acts on) when the pruner is built, and bound again after every step that replaces
parameters by smaller tensors (``mode='remove'``, ``event.reshaped``), so it never penalises tensors
the model no longer holds. It is driven by :class:`secateurs.Pruner`:

- ``pruner.regularize()`` between ``loss.backward()`` and ``optimizer.step()`` adds the penalty's
  (sub)gradient to ``.grad`` and returns the penalty's value (for logging). Every contribution is
  computed and checked to be finite before the first ``.grad`` is touched: a penalty that would
  make training diverge stops with a :class:`~secateurs.errors.NonFiniteError` naming the tensor
  and the step, and the model, its gradients and the optimizer are left as they were;
- ``pruner.step()`` after ``optimizer.step()`` calls :meth:`Regularizer.proximal`, for penalties
  whose proximal operator produces exact zeros, then :meth:`Regularizer.advance` (the step count
  that the strength schedule reads).

The strength can follow a schedule (``strength_schedule={'kind': 'linear', 'start': 0, 'end':
1000}``: zero before ``start``, ramped to ``strength`` at ``end``; ``'cubic'`` ramps as GMP's
schedule does), e.g. the KL warm-up of sparse variational dropout. :meth:`Regularizer.report`
says how many of the penalised groups are at or near zero, to watch during training.

Register your own with ``@register_regularizer``. This module holds the base and the elementwise
and norm-scale penalties; group lasso (:mod:`.group_lasso`), L0 gates and sparse variational
dropout (:mod:`.gates`) and movement scores (:mod:`.movement`) register from their own modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, NonFiniteError
from ..masking import current_mask
from ..registry import Registry
from ..scope import Target
from ..spec import is_number

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")  # base set below, once the class exists

#: a penalty's contribution: (qualified tensor name, the tensor, the gradient to add to its .grad)
Contribution = tuple[str, Tensor, Tensor]

_RAMPS = ("constant", "linear", "cubic")


def check_strength_schedule(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate ``{'kind': 'linear'|'cubic'|'constant', 'start': int, 'end': int}``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"regularizer_options.strength_schedule must be a dict, got {value!r}")
    unknown = set(value) - {"kind", "start", "end"}
    if unknown:
        raise ConfigError(f"regularizer_options.strength_schedule has unknown keys {sorted(unknown)}; "
                          "allowed: kind, start, end")  # fmt: skip
    kind = value.get("kind", "linear")
    if kind not in _RAMPS:
        raise ConfigError(f"regularizer_options.strength_schedule.kind must be one of {list(_RAMPS)}, got {kind!r}")
    start, end = value.get("start", 0), value.get("end", 0)
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
        raise ConfigError(
            f"regularizer_options.strength_schedule needs integers 0 <= start <= end, got {start!r}, {end!r}"
        )
    return {"kind": kind, "start": start, "end": end}


def ramp(schedule: Mapping[str, Any] | None, step: int) -> float:
    """Fraction of the full strength at ``step`` (1 without a schedule)."""
    if schedule is None or schedule["kind"] == "constant":
        return 1.0
    start, end = schedule["start"], schedule["end"]
    if step < start:
        return 0.0
    if step >= end:
        return 1.0
    t = (step - start) / (end - start)
    return t if schedule["kind"] == "linear" else 1.0 - (1.0 - t) ** 3


@dataclass
class RegularizationReport:
    """How many penalised groups (weights, units, scales or gates) are at or near zero now."""

    regularizer: str
    step: int
    strength: float
    groups: int
    zero: int
    near_zero: int
    tolerance: float
    per_tensor: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (groups, zero, near)

    def __str__(self) -> str:
        pct = 100.0 * self.zero / max(self.groups, 1)
        return (f"{self.regularizer} @ step {self.step} (strength {self.strength:.3g}): {self.zero}/{self.groups} "
                f"groups exactly zero ({pct:.1f}%), {self.near_zero} below {self.tolerance:g}")  # fmt: skip


def count_near_zero(name: str, norms: Tensor, tolerance: float, report: RegularizationReport) -> None:
    """Add one tensor's group norms (or gate values) to ``report``."""
    norms = norms.detach().reshape(-1).float()
    zero, near = int((norms == 0).sum()), int((norms.abs() <= tolerance).sum())
    report.groups += norms.numel()
    report.zero += zero
    report.near_zero += near
    report.per_tensor[name] = (norms.numel(), zero, near)


class Regularizer:
    """Base class: override :meth:`bind` (what it acts on) and :meth:`contributions` (or, for a penalty
    that writes gradients itself, :meth:`penalize`); :meth:`proximal` and :meth:`group_norms` optional."""

    name: ClassVar[str]
    #: binding replaces modules of the model (FBS wraps convolutions): the Pruner may then not also prune,
    #: since its targets were resolved against the modules before they were wrapped
    replaces_modules: ClassVar[bool] = False

    def __init__(self, strength: float = 1e-4, strength_schedule: Mapping[str, Any] | None = None) -> None:
        if not is_number(strength) or not strength >= 0 or not math.isfinite(strength):
            raise ConfigError(f"regularizer_options.strength must be a finite number >= 0, got {strength!r}")
        self.strength = float(strength)
        self.strength_schedule = check_strength_schedule(strength_schedule)
        self.step = 0
        self._tensors: list[tuple[Tensor, Tensor | None]] = []

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strength": self.strength}
        if self.strength_schedule is not None:
            out["strength_schedule"] = dict(self.strength_schedule)
        return out

    @property
    def current_strength(self) -> float:
        """The strength at the current step (the schedule's ramp times ``strength``)."""
        return self.strength * ramp(self.strength_schedule, self.step)

    def bind(self, model: nn.Module, targets: Sequence[Target], example_inputs: Any = None) -> None:
        """Resolve and validate what the penalty acts on: before training starts, and again after each
        step that replaced the model's parameters by new tensors (structural removal). Resolve the
        tensors here, afresh each time; anything kept per tensor starts over. ``example_inputs`` is
        the pruner's (penalties over the dependency graph's groups trace the model with it)."""
        raise NotImplementedError

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        """The penalty's value at ``strength`` and the gradient it adds to each tensor (nothing written)."""
        raise NotImplementedError

    def penalize(self) -> float:
        """Add the penalty's gradient to ``.grad``; return its value. All contributions are checked to
        be finite (and to leave a finite ``.grad``) before any is written."""
        value, parts = self.contributions(self.current_strength)
        for name, _, grad in parts:  # name the first tensor the penalty would send off to inf / NaN
            if not bool(torch.isfinite(grad).all()):
                raise NonFiniteError(self._diverged("the penalty's gradient is not finite", name))
        if not math.isfinite(value):
            bad = [name for name, tensor, _ in parts if not bool(torch.isfinite(tensor).all())]
            bad += [name for name, norms in self.group_norms().items() if not bool(torch.isfinite(norms).all())]
            raise NonFiniteError(self._diverged(f"the penalty's value is {value}", bad[0] if bad else "its tensors"))
        for name, tensor, _ in parts:
            if tensor.grad is not None and not bool(torch.isfinite(tensor.grad).all()):
                raise NonFiniteError(self._diverged("the loss's gradient (before the penalty) is not finite", name))
        with torch.no_grad():
            for _, tensor, grad in parts:
                if tensor.grad is None:
                    tensor.grad = grad.detach().clone()
                else:
                    tensor.grad.add_(grad)
        return value

    def _diverged(self, what: str, name: str) -> str:
        return (f"regularizer {self.name!r} at step {self.step}: {what} on {name} (nothing was written: "
                f"the model, its gradients and the optimizer are as before this call); lower "
                f"regularizer_options.strength (now {self.current_strength:g}) or the learning rate, or "
                "ramp the strength in with strength_schedule")  # fmt: skip

    def proximal(self) -> None:
        """After the optimizer step: the penalty's proximal step (default: none)."""

    def advance(self) -> None:
        """One training step done (the strength schedule's clock)."""
        self.step += 1

    def group_norms(self) -> dict[str, Tensor]:
        """Per penalised tensor, the quantity that reaching zero means "prunable" (default: |w|)."""
        return {f"#{i}": t.detach().abs() for i, (t, _) in enumerate(self._tensors)}

    def report(self, tolerance: float = 1e-3) -> RegularizationReport:
        """How many penalised groups are exactly zero, and how many within ``tolerance`` of it."""
        out = RegularizationReport(self.name, self.step, self.current_strength, 0, 0, 0, tolerance)
        for name, norms in self.group_norms().items():
            count_near_zero(name, norms, tolerance, out)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


def l1_contributions(tensors: Sequence[tuple[str, Tensor, Tensor | None]], strength: float) -> tuple[float, list]:
    """Subgradient of ``strength * sum |w|`` over the entries still alive."""
    total, parts = 0.0, []
    with torch.no_grad():
        for name, tensor, alive in tensors:
            sign = tensor.sign() if alive is None else tensor.sign() * alive
            parts.append((name, tensor, sign * strength))
            total += float(tensor.abs().sum() if alive is None else (tensor.abs() * alive).sum())
    return strength * total, parts


def soft_threshold_(tensor: Tensor, amount: float) -> None:
    """The L1 proximal operator in place: shrink toward zero by ``amount``, exact zeros below it."""
    with torch.no_grad():
        tensor.copy_(tensor.sign() * (tensor.abs() - amount).clamp_min(0.0))


def check_proximal_lr(value: Any) -> float | None:
    if value is None:
        return None
    if not is_number(value) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"regularizer_options.proximal_lr must be a finite number > 0 (the optimizer's learning "
                          f"rate), got {value!r}")  # fmt: skip
    return float(value)


REGULARIZERS.base = Regularizer


@REGULARIZERS.register
class L1(Regularizer):
    """L1 on the weights in scope (masked entries excluded): drives unimportant weights toward zero
    before magnitude pruning (Han et al. 2015, arXiv:1506.02626)."""

    name = "l1"

    def bind(self, model: nn.Module, targets: Sequence[Target], example_inputs: Any = None) -> None:
        if not targets:
            raise ConfigError("regularizer 'l1' acts on the weights in scope, and the scope selects none")
        self._targets = list(targets)

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        tensors = []
        for t in self._targets:
            mask = current_mask(t)
            tensors.append((t.name, t.parameter, None if mask is None else mask.to(t.parameter.dtype)))
        return l1_contributions(tensors, strength)

    def group_norms(self) -> dict[str, Tensor]:
        return {t.name: t.parameter.detach().abs() for t in self._targets}


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@REGULARIZERS.register
class BNScaleL1(Regularizer):
    """Network slimming (Liu et al. 2017, arXiv:1708.06519): L1 on every BatchNorm scale (and, with
    ``layernorm=True``, LayerNorm / GroupNorm scales), so that unimportant channels' scales go to zero
    during training; then ``method='bn_scale'`` with ``mode='remove'`` takes them out (the paper's
    strength is 1e-4 to 1e-5). With ``proximal_lr`` (the optimizer's learning rate) the penalty is
    applied as its proximal step after each optimizer step (soft thresholding), which gives exact
    zeros instead of scales that oscillate around zero. It acts on every such norm of the model."""

    name = "bn_l1"

    def __init__(self, strength: float = 1e-4, strength_schedule: Mapping[str, Any] | None = None,
                 layernorm: bool = False, proximal_lr: float | None = None) -> None:  # fmt: skip
        super().__init__(strength, strength_schedule)
        if not isinstance(layernorm, bool):
            raise ConfigError(f"regularizer_options.layernorm must be True or False, got {layernorm!r}")
        self.layernorm = layernorm
        self.proximal_lr = check_proximal_lr(proximal_lr)
        self._named: list[tuple[str, Tensor]] = []

    def options(self) -> dict[str, Any]:
        out = super().options()
        if self.layernorm:
            out["layernorm"] = True
        if self.proximal_lr is not None:
            out["proximal_lr"] = self.proximal_lr
        return out

    def bind(self, model: nn.Module, targets: Sequence[Target], example_inputs: Any = None) -> None:
        kinds = _NORMS if self.layernorm else (nn.modules.batchnorm._BatchNorm,)
        self._named = [(f"{n}.weight" if n else "weight", m.weight) for n, m in model.named_modules()
                       if isinstance(m, kinds) and getattr(m, "weight", None) is not None]  # fmt: skip
        if not self._named:
            what = "BatchNorm, LayerNorm or GroupNorm" if self.layernorm else "affine BatchNorm"
            raise ConfigError(
                f"regularizer 'bn_l1' penalises norm scales, and the model has no {what}"
                + ("" if self.layernorm else " (regularizer_options={'layernorm': True} adds LayerNorm)")
            )
        self._tensors = [(w, None) for _, w in self._named]

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        if self.proximal_lr is not None:  # the penalty acts through proximal(); its value is still reported
            return strength * sum(float(w.detach().abs().sum()) for _, w in self._named), []
        return l1_contributions([(n, w, None) for n, w in self._named], strength)

    def proximal(self) -> None:
        if self.proximal_lr is not None:
            for _, w in self._named:
                soft_threshold_(w, self.proximal_lr * self.current_strength)

    def group_norms(self) -> dict[str, Tensor]:
        return {n: w.detach().abs() for n, w in self._named}


def register_regularizer(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator: make a regularizer available by its ``name`` (``regularizer='name'``)."""
    return REGULARIZERS.register(cls)


def make_regularizer(value: str | Regularizer | None, options: Mapping[str, Any] | None = None) -> Regularizer | None:
    if value is None:
        if options:
            raise ConfigError("regularizer_options were given without a regularizer")
        return None
    return REGULARIZERS.build(value, options, "regularizer_options")
