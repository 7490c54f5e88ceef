"""Evidence: what criteria need, gathered once with hooks and handed over.

A criterion declares its needs (:class:`Need`); the engine calls :func:`gather`,
which runs the calibration batches through the model at most twice (one
forward-only pass for activations, one forward-backward pass for gradients).
Nothing about the model is changed: buffers (BatchNorm running statistics),
``.grad`` fields, ``requires_grad`` flags, the training mode and the RNG state
are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .batches import LossFn, default_loss, model_device, run_model, to_device
from .errors import DataRequiredError
from .layout import Layout
from .progress import progress
from .scope import Target


class Need(str, Enum):
    ACTIVATIONS = "activations"  # input/output statistics of each target
    GRADIENTS = "gradients"  # loss gradients accumulated over the calibration batches
    BATCH_GRADIENTS = "batch_gradients"  # ... and kept per batch (memory: one copy per batch)
    DATA_PASSES = "data_passes"  # the criterion runs its own passes over calibration data
    INPUT_SHAPE = "input_shape"  # data-free passes that still need an input shape (SynFlow)


@dataclass
class ActivationStats:
    """Running sums over every position a target saw (tokens, pixels, samples)."""

    input_sq_sum: Tensor | None  # (in_channels,): sum of x_j^2
    output_abs_sum: Tensor  # (out_channels,): sum of |y_i|
    output_nonpositive: Tensor  # (out_channels,): count of y_i <= 0, i.e. zero after ReLU
    positions: int = 0
    input_sum: Tensor | None = None  # (in_channels,): sum of x_j, for input means and variances (FLAP)
    input_positions: int = 0

    @property
    def input_mean(self) -> Tensor:
        if self.input_sum is None:
            raise DataRequiredError("this layer takes integer inputs (an Embedding); it has no input statistics")
        return self.input_sum / max(self.input_positions, 1)

    @property
    def input_variance(self) -> Tensor:
        """Unbiased variance of each input channel over all calibration positions."""
        n = max(self.input_positions, 2)
        return ((self.input_sq_sum - self.input_sum.square() / n) / (n - 1)).clamp_min(0.0)

    @property
    def input_norm(self) -> Tensor:
        """Wanda's ||X_j||_2 per input channel, over all calibration positions."""
        if self.input_sq_sum is None:
            raise DataRequiredError("this layer takes integer inputs (an Embedding); it has no input norms")
        return self.input_sq_sum.sqrt()

    @property
    def output_mean_abs(self) -> Tensor:
        return self.output_abs_sum / max(self.positions, 1)

    @property
    def apoz(self) -> Tensor:
        """Average percentage of zeros after ReLU (Hu et al. 2016, arXiv:1607.03250)."""
        return self.output_nonpositive / max(self.positions, 1)


@dataclass
class GradientStats:
    grad_sum: Tensor
    abs_sum: Tensor
    sq_sum: Tensor
    batches: int = 0
    per_batch: list[Tensor] = field(default_factory=list)  # only with Need.BATCH_GRADIENTS

    @property
    def mean(self) -> Tensor:
        return self.grad_sum / max(self.batches, 1)

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / max(self.batches, 1)

    @property
    def fisher(self) -> Tensor:
        """Empirical diagonal Fisher: mean of squared batch gradients."""
        return self.sq_sum / max(self.batches, 1)


@dataclass
class Evidence:
    """Everything a criterion may read. Criteria never reach back into the engine."""

    model: nn.Module
    targets: Sequence[Target]
    batches: list[Any] = field(default_factory=list)
    loss_fn: LossFn | None = None  # the user's; None means batches.default_loss
    example_inputs: Any = None
    generator: torch.Generator | None = None
    activations: dict[str, ActivationStats] = field(default_factory=dict)
    gradients: dict[str, GradientStats] = field(default_factory=dict)
    show_progress: bool = True


def _channels_last(x: Tensor, layout: Layout) -> Tensor:
    """Rows are positions, columns are channels."""
    if layout is Layout.CONV:
        return x.transpose(0, 1).reshape(x.shape[1], -1).t()
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def preserved(model: nn.Module, targets: Sequence[Target]) -> Iterator[None]:
    """Run passes without leaving a trace on the model."""
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    flags = {t.parameter: t.parameter.requires_grad for t in targets}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g
        for p, flag in flags.items():
            p.requires_grad_(flag)
        torch.set_rng_state(rng)


def _gather_activations(evidence: Evidence) -> None:
    stats: dict[str, ActivationStats] = {}

    def hook_for(target: Target):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            y = _channels_last(output.detach().float(), target.layout)
            s = stats.get(target.name)
            if s is None:
                s = stats[target.name] = ActivationStats(
                    None, torch.zeros(y.shape[1], dtype=torch.float64), torch.zeros(y.shape[1], dtype=torch.float64)
                )
            if target.layout is not Layout.EMBEDDING:
                x = _channels_last(args[0].detach().float(), target.layout)
                sq = x.square().sum(0).double()
                s.input_sq_sum = sq if s.input_sq_sum is None else s.input_sq_sum + sq.to(s.input_sq_sum.device)
                total = x.sum(0).double()
                s.input_sum = total if s.input_sum is None else s.input_sum + total.to(s.input_sum.device)
                s.input_positions += x.shape[0]
            s.output_abs_sum = s.output_abs_sum.to(y.device) + y.abs().sum(0).double()
            s.output_nonpositive = s.output_nonpositive.to(y.device) + (y <= 0).sum(0).double()
            s.positions += y.shape[0]

        return hook

    handles = [t.module.register_forward_hook(hook_for(t)) for t in evidence.targets]
    device = model_device(evidence.model)
    try:
        with torch.no_grad():
            for batch in progress(evidence.batches, "activations", evidence.show_progress):
                run_model(evidence.model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
    evidence.activations = stats


def _gather_gradients(evidence: Evidence, keep_batches: bool) -> None:
    loss_fn = evidence.loss_fn or default_loss
    model, device = evidence.model, model_device(evidence.model)
    params = {t.name: t.parameter for t in evidence.targets}
    for p in params.values():
        p.requires_grad_(True)
    stats = {
        name: GradientStats(
            torch.zeros_like(p, dtype=torch.float64),
            torch.zeros_like(p, dtype=torch.float64),
            torch.zeros_like(p, dtype=torch.float64),
        )
        for name, p in params.items()
    }
    with torch.enable_grad():
        for batch in progress(evidence.batches, "gradients", evidence.show_progress):
            for p in model.parameters():
                p.grad = None
            loss = loss_fn(model, to_device(batch, device))
            loss.backward()
            for name, p in params.items():
                g = p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                s = stats[name]
                s.grad_sum += g
                s.abs_sum += g.abs()
                s.sq_sum += g.square()
                s.batches += 1
                if keep_batches:
                    s.per_batch.append(g.float())
    evidence.gradients = stats


def gather(evidence: Evidence, needs: frozenset[Need]) -> None:
    """Fill ``evidence`` with what ``needs`` asks for (validation happens in the engine)."""
    if Need.ACTIVATIONS in needs:
        _gather_activations(evidence)
    if needs & {Need.GRADIENTS, Need.BATCH_GRADIENTS}:
        _gather_gradients(evidence, keep_batches=Need.BATCH_GRADIENTS in needs)
