"""A minimal supervised loop: enough for the demo, CLI and benchmarks, not a framework."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..batches import default_loss, model_device, run_model, to_device
from ..errors import ConfigError
from ..progress import progress

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def adam(lr: float = 1e-3, weight_decay: float = 0.0) -> OptimizerFactory:
    return lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def train(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int,
    optimizer: OptimizerFactory | None = None,
    pruner: Any = None,
    show_progress: bool = False,
    lr_factor: Callable[[int], float] | None = None,
) -> list[float]:
    """Train for ``steps`` optimizer steps, cycling over ``batches``.

    With a ``pruner``, ``pruner.regularize()`` runs between ``backward()`` and the optimizer step when it
    has a regularizer, and ``pruner.step()`` after every optimizer step; when it
    rewinds the weights (lottery tickets) the optimizer is rebuilt, as in Frankle &
    Carbin (2019), so no stale momentum leaks into the rewound network; likewise when a
    ``mode='remove'`` pruner replaces the parameters by smaller ones.

    ``lr_factor(step)`` multiplies every parameter group's learning rate at each step (e.g. the
    linear decay to zero of Molchanov et al. 2017's sparse VD runs); None keeps it constant.
    """
    make_optimizer = optimizer or adam()
    opt = make_optimizer(model.parameters())
    base_lrs = [g["lr"] for g in opt.param_groups]
    device = model_device(model)
    regularizing = getattr(getattr(pruner, "config", None), "regularizer_", None) is not None  # a secateurs Pruner
    losses = []
    model.train()
    cycle = itertools.cycle(batches)
    for step in progress(range(steps), "training", show_progress):
        if lr_factor is not None:
            factor = lr_factor(step)
            if not (math.isfinite(factor) and factor >= 0):
                raise ConfigError(f"lr_factor({step}) must be a finite number >= 0, got {factor!r}")
            for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
        batch = to_device(next(cycle), device)
        opt.zero_grad(set_to_none=True)
        loss = default_loss(model, batch)
        loss.backward()
        if regularizing:
            pruner.regularize()
        opt.step()
        losses.append(float(loss.detach()))
        if pruner is not None:
            event = pruner.step()
            if event.rewound or event.reshaped:  # fresh start, or new (smaller) parameter tensors
                opt = make_optimizer(model.parameters())
                base_lrs = [g["lr"] for g in opt.param_groups]
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Any]) -> float:
    """Top-1 accuracy over ``(inputs, integer targets)`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct = total = 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = run_model(model, batch, "an evaluation batch")
        correct += int((logits.argmax(-1) == batch[1]).sum())
        total += int(batch[1].numel())
    model.train(was_training)
    return correct / max(total, 1)
