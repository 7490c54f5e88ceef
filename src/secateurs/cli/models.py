"""How the CLI names a model: ``package.module:factory`` or a Hugging Face directory / hub id."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..hf import is_hf_directory, load_hf_model
from ..loading import load_safetensors, load_state_strict


def is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def call_factory(spec: str, flag: str) -> Any:
    """Import ``package.module:function`` and call it; every way that fails is a one-line error."""
    if not is_factory(spec):
        raise ConfigError(f"{flag} must be 'package.module:function', got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # whatever the user's module raises on import (a syntax error, a missing package)
        raise ConfigError(f"{flag} {spec!r} cannot be imported: {type(exc).__name__}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"{flag} {spec!r} is a {type(factory).__name__}, not a function")
    return factory()


def input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 3,32,32``: positive integers separated by commas (an argparse ``type``)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, e.g. 3,32,32; got {text!r}")
    return shape


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model ``spec`` names; load ``weights`` (safetensors, strict) if given."""
    if is_factory(spec):
        model = call_factory(spec, "the model")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    elif is_hf_directory(spec) or not Path(spec).exists():
        model = load_hf_model(spec)
    else:
        raise ConfigError(f"{spec!r} is neither 'package.module:factory' nor a model directory with config.json")
    if weights is not None:
        load_state_strict(model, load_safetensors(weights), f"weights {weights}")
    return model
