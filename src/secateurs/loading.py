"""Reading tensor files safely, and checking a state dict fits a model before any of it is written.

``torch.nn.Module.load_state_dict`` copies every tensor that fits and only then reports the
ones that do not (a shape mismatch even with ``strict=False``), so a failed load leaves a
half-overwritten model. Every loader here checks names and shapes against the model first
and writes second (ARCHITECTURE invariant 8).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .errors import CheckpointError


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or non-safetensors file (a pickle)
    is a :class:`CheckpointError` naming it. Nothing is ever unpickled."""
    return read_safetensors(path)[0]


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata, in one read (errors as :func:`load_safetensors`)."""
    try:
        with safe_open(str(path), framework="pt") as f:  # what safetensors' load_file does, metadata kept
            names = list(f.keys())  # a safe_open handle is not iterable
            return {name: f.get_tensor(name) for name in names}, f.metadata() or {}
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist") from exc
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated, corrupted, or a pickle "
            "(.bin/.pt: convert it with safetensors.torch.save_file(torch.load(f, weights_only=True), ...))"
        ) from exc


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_state_fits(model: nn.Module, state: Mapping[str, Tensor], what: str, shape_hint: str = "") -> None:
    """Refuse, before anything is written, a state dict whose names or shapes do not match ``model``.
    A missing entry is fine when it is tied to one that is given (a tied LM head saved once).
    ``shape_hint`` ends the message when shapes differ (what the caller knows such a file usually is)."""
    own = model.state_dict(keep_vars=True)
    unexpected = sorted(set(state) - set(own))
    given = {id(own[k]) for k in state if k in own}
    missing = sorted(k for k in own if k not in state and id(own[k]) not in given)
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {_describe(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_describe(wrong)}")
    if problems:
        raise CheckpointError(
            f"{what} does not fit {type(model).__name__} ({'; '.join(problems)}); nothing was loaded. "
            "Is it from a different architecture or size?" + (f" {shape_hint}" if wrong and shape_hint else "")
        )


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], what: str, shape_hint: str = "") -> None:
    """Check ``state`` against ``model`` (:func:`check_state_fits`), then load it."""
    check_state_fits(model, state, what, shape_hint)
    model.load_state_dict(state, strict=False)  # strict already checked; tied entries may be absent
