"""How calibration batches are fed to a model and turned into a loss.

Accepted batch shapes, so users rarely need a custom function:

- a tensor: the model's input;
- a tuple/list ``(inputs, targets)``: ``model(inputs)``, cross-entropy against integer
  targets, mean squared error against float ones;
- a mapping: ``model(**batch)``; the loss is the model's own ``loss`` output
  (Hugging Face models compute it when the batch holds ``labels``).

Anything else: pass ``loss_fn(model, batch) -> scalar``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DataRequiredError

LossFn = Callable[[nn.Module, Any], Tensor]


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` to ``device``, keeping its structure."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_inputs(batch: Any) -> Any:
    """The part of a batch the model consumes (drops targets)."""
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    return batch


def first_sample(inputs: Any) -> Any:
    """The first sample of a batch, batch dimension kept (reports count MACs per sample)."""
    if isinstance(inputs, Tensor):
        return inputs[:1]
    if isinstance(inputs, Mapping):
        return {k: first_sample(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(first_sample(v) for v in inputs)
    return inputs


def run_model(model: nn.Module, batch: Any) -> Any:
    """Forward one batch, following the conventions in this module's docstring."""
    inputs = model_inputs(batch)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def logits_of(output: Any) -> Tensor:
    """The main tensor of a model output (HF ``ModelOutput``, tuple or tensor)."""
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is None and isinstance(output, Mapping):
            value = output.get(key)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise DataRequiredError(f"cannot find a tensor in the model output of type {type(output).__name__}")


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """The loss for one batch when the user gave no ``loss_fn``."""
    output = run_model(model, batch)
    if isinstance(model_inputs(batch), Mapping):
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if loss is None:
            raise DataRequiredError(
                "the model returned no loss for a dict batch; add 'labels' to the batch or pass "
                "loss_fn=lambda model, batch: ..."
            )
        return loss
    if not (isinstance(batch, (list, tuple)) and len(batch) >= 2):
        raise DataRequiredError(
            "a gradient criterion needs a loss, but the batches hold no targets; pass "
            "(inputs, targets) batches or loss_fn=lambda model, batch: ..."
        )
    logits, targets = logits_of(output), batch[1]
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.mse_loss(logits, targets)


def take(batches: Iterable[Any] | None, limit: int | None) -> list[Any]:
    """Materialise at most ``limit`` batches (so several passes see the same data)."""
    if batches is None:
        return []
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]
    return list(islice(batches, limit)) if limit is not None else list(batches)
