"""How the CLI names a model: ``package.module:factory`` or a Hugging Face directory / hub id.

A ``module:function`` is imported as ``python -m`` imports: the current folder comes first, so
``secateurs prune my_models:resnet`` finds ``./my_models.py`` without ``PYTHONPATH=.``.
A structurally pruned output (a folder with ``pruning_plan.json``) is rebuilt by replaying its
plan, so ``--weights pruned/`` (or ``pruned/model.safetensors``) fits the factory's model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

PLAN_FILE = "pruning_plan.json"  # secateurs.structural.plan.PLAN_FILE, named here without importing torch


def is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


@contextlib.contextmanager
def _current_folder_importable() -> Iterator[None]:
    """The current folder first on ``sys.path`` while the user's code is imported and called, as
    ``python -m`` does (a console script's ``sys.path[0]`` is its own bin folder instead)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def call_object(spec: str, what: str) -> Any:
    """Import ``module:function`` (current folder first) and call it with no arguments. ``what`` names
    the flag in every error (``--data``, ``the model``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{what} must be 'package.module:function', got {spec!r}")
    with _current_folder_importable():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # whatever the user's module raises on import (missing, a syntax error, ...)
            raise ConfigError(
                f"{what} {spec!r} cannot be imported: {type(exc).__name__}: {exc}. Modules are looked up in the "
                f"current folder ({os.getcwd()}) first, then on the Python path (install the package or set PYTHONPATH)"
            ) from exc
        function = getattr(module, attr, None)
        if not callable(function):
            public = sorted(n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n]))
            raise ConfigError(f"{what} {spec!r}: {module_name} has no function {attr!r}; it has: {public[:20]}")
        return function()


def input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 3,32,32``: positive integers separated by commas (an argparse ``type``)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 3,32,32; got {text!r}")
    return shape


def sparsity_list(text: str) -> list[float]:
    """``--grid`` / ``--levels 0.25,0.4,0.5``: numbers separated by commas (an argparse ``type``; the
    range is checked by whatever uses them, with its own message)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sparsities separated by commas, e.g. 0.3,0.5,0.7; got {text!r}"
        ) from None


def plan_directory(weights: str | os.PathLike) -> Path | None:
    """The structural output folder ``weights`` names (the folder, or its ``model.safetensors``), if any."""
    path = Path(weights)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / PLAN_FILE).is_file() else None


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model ``spec`` names; load ``weights`` (safetensors, strict; or a structural output folder)."""
    from torch import nn

    from ..hf import is_hf_directory

    if is_factory(spec):
        model = call_object(spec, "the model")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        _refuse_plain_plan(spec)
        if Path(spec).exists() and not is_hf_directory(spec):  # a file, or a folder without config.json
            raise ConfigError(f"{spec!r} is neither 'package.module:factory' nor a model directory with config.json")
        from ..export import load_sparse  # dense, compressed-only or structurally pruned directories

        model = load_sparse(spec)
    if weights is None:
        return model
    folder = plan_directory(weights)
    if folder is not None:
        from ..structural import load_structured

        return load_structured(folder, model)  # every module, size and weight is checked before anything changes
    return _load_weights(model, weights)


def _refuse_plain_plan(spec: str) -> None:
    """A structural output of a plain PyTorch model needs the code that builds the unpruned model."""
    plan = Path(spec) / PLAN_FILE
    if not plan.is_file():
        return
    try:
        base = json.loads(plan.read_text()).get("base", {})
    except (OSError, ValueError, AttributeError):
        return  # unreadable: the plan loader names the problem
    if "hf_class" not in base:
        raise ConfigError(
            f"{spec} holds a structurally pruned plain PyTorch model; name the factory of the unpruned model and "
            f"pass this folder as its weights: secateurs ... package.module:factory --weights {spec}"
        )


def _load_weights(model: nn.Module, weights: str) -> nn.Module:
    """Strict, and checked before any tensor is copied: a size mismatch is named, not a 40-line traceback."""
    from ..loading import load_safetensors, load_state_strict

    hint = ("A structurally pruned model (mode remove) is loaded from its output folder, which holds "
            "pruning_plan.json: pass --weights thatfolder/")  # fmt: skip
    load_state_strict(model, load_safetensors(weights), f"--weights {weights}", shape_hint=hint)
    return model
