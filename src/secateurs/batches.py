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

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataRequiredError, SecateursError

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


def describe(inputs: Any) -> str:
    """A short description of a batch for error messages: types, shapes and dtypes, never values."""
    if isinstance(inputs, Tensor):
        return f"Tensor{list(inputs.shape)} {str(inputs.dtype).removeprefix('torch.')}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(inputs.items())[:6]) + "}"
    if isinstance(inputs, (list, tuple)):
        return f"{type(inputs).__name__}(" + ", ".join(describe(v) for v in inputs[:4]) + ")"
    return type(inputs).__name__


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The embedding that reads token ids: the HF model's own, or the model's only Embedding."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Embedding):
            return found
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0] if len(embeddings) == 1 else None


def check_token_ids(model: nn.Module, inputs: Any, what: str) -> None:
    """Token ids outside the input embedding give an IndexError deep in the model: say which."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or not ids.numel():
        return
    embedding = _input_embedding(model)
    if embedding is None:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= embedding.num_embeddings:
        raise DataRequiredError(
            f"{what} holds token ids {low}..{high}, but the model's input embedding has "
            f"{embedding.num_embeddings} entries (ids 0..{embedding.num_embeddings - 1}); was it tokenized with "
            "another tokenizer?"
        )


def run_model(model: nn.Module, batch: Any, what: str | None = "a calibration batch") -> Any:
    """Forward one batch, following the conventions in this module's docstring. The model failing on
    the batch is a :class:`DataRequiredError` that describes the batch (the cause is chained);
    ``what=None`` lets the model's own error through (the structural forward check names the module)."""
    inputs = model_inputs(batch)

    def forward() -> Any:
        return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)

    if what is None:
        return forward()
    check_token_ids(model, inputs, what)
    with blaming_inputs(inputs, what):
        return forward()


@contextlib.contextmanager
def blaming_inputs(inputs: Any, what: str) -> Iterator[None]:
    """The model failing inside the block on ``inputs`` is a :class:`DataRequiredError` that describes
    them (the cause is chained); our own errors and running out of memory pass through."""
    try:
        yield
    except (SecateursError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, IndexError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DataRequiredError(
            f"the model fails on {what} ({describe(inputs)}): {type(exc).__name__}: {' '.join(str(exc).split())}. "
            "Pass what model(...) accepts: a tensor, (inputs, targets), or a dict of keyword arguments"
        ) from exc


def check_inputs(model: nn.Module, example_inputs: Any, what: str = "example_inputs") -> None:
    """Run ``example_inputs`` once, in eval mode without gradients, before anything is pruned: the
    report runs them afterwards, when a bad shape could no longer leave the model untouched."""
    if example_inputs is None:
        return
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            run_model(model, to_device(example_inputs, model_device(model)), what)
    finally:
        for module, training in modes.items():
            module.training = training


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


def checked_loss(loss_fn: LossFn | None) -> LossFn | None:
    """The user's ``loss_fn``, refused up front if it cannot be called, and checked at every call: a loss
    that is not one number would fail inside ``backward()`` with a message that never names it."""
    if loss_fn is None:
        return None
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function loss_fn(model, batch) -> scalar tensor, got {loss_fn!r}")
    return CheckedLoss(loss_fn)


class CheckedLoss:
    """A user's loss function whose every result is checked to be one number. A class, not a closure,
    so that a :class:`~secateurs.Pruner` holding it still pickles (the function by reference)."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        loss = self.loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise DataRequiredError(
                f"loss_fn(model, batch) must return a scalar tensor, but it returned {describe(loss)}; "
                "reduce it (e.g. .mean()), and note the model comes first, then the batch"
            )
        return loss


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
    if not isinstance(targets, Tensor):
        raise DataRequiredError(f"batch targets must be a tensor, got {describe(targets)}")
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        classes = logits.shape[-1]
        bad = targets[(targets != -100) & ((targets < 0) | (targets >= classes))]  # -100: cross-entropy's ignore
        if bad.numel():
            raise DataRequiredError(
                f"batch targets hold class {int(bad[0])}, but the model outputs {classes} classes (0..{classes - 1})"
            )
        return F.cross_entropy(logits.reshape(-1, classes), targets.reshape(-1))
    if targets.shape != logits.shape:
        raise DataRequiredError(
            f"float batch targets of shape {list(targets.shape)} do not match the model output {list(logits.shape)}"
        )
    return F.mse_loss(logits, targets)


def take(batches: Iterable[Any] | None, limit: int | None) -> list[Any]:
    """Materialise at most ``limit`` batches (so several passes see the same data)."""
    if batches is None:
        return []
    if isinstance(batches, (str, bytes, os.PathLike)):
        raise DataRequiredError(
            f"calibration is a {type(batches).__name__} ({str(batches)[:40]!r}), which would be read one "
            "character at a time: pass an iterable of batches (a DataLoader, a list of tensors or "
            "(inputs, targets)); for text, prune with secateurs.llm and a tokenizer"
        )
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]
    if not isinstance(batches, Iterable):
        raise DataRequiredError(f"calibration must be an iterable of batches, got {type(batches).__name__}")
    return list(islice(batches, limit)) if limit is not None else list(batches)
