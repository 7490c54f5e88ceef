"""Torch run-time modes a pruning run must neutralise or refuse before it starts.

Under ``torch.inference_mode()`` every tensor created is an *inference tensor*: autograd refuses
to save it for backward. A prune run inside that mode would return normally and leave masks,
cut weights and compensated biases that make the first training step fail ("Inference tensors
cannot be saved for backward"), and gradient criteria would fail with an error that never
mentions the mode. So the front doors run outside inference mode, and weights that are
themselves inference tensors (a model built inside the mode) are refused for gradient criteria.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from .errors import StateError

F = TypeVar("F", bound=Callable[..., Any])


def outside_inference_mode(fn: F) -> F:
    """Run ``fn`` with inference mode off (a no-op outside it), so what it creates stays trainable."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def refuse_inference_weights(targets: Sequence[Any], method: str, needs_gradients: bool) -> None:
    """Gradients cannot flow into inference tensors: say so, naming the weight, before any pass."""
    if not needs_gradients:
        return
    frozen = [t.name for t in targets if t.parameter.is_inference()]
    if frozen:
        raise StateError(
            f"method {method!r} needs gradients, but weight {frozen[0]} (and {len(frozen) - 1} more) was created "
            "inside torch.inference_mode(), so autograd cannot use it: build or load the model outside "
            "inference mode (torch.no_grad() is fine for evaluation), or use a method without gradients"
        )
