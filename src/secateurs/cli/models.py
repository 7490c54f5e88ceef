"""How the CLI names a model: ``package.module:factory`` or a Hugging Face directory / hub id."""

from __future__ import annotations

import importlib
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ..errors import ConfigError
from ..hf import is_hf_directory, load_hf_model


def is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def load_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model ``spec`` names; load ``weights`` (safetensors, strict) if given."""
    if is_factory(spec):
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import model factory {spec!r}: {exc}") from exc
        model = factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    elif is_hf_directory(spec) or not Path(spec).exists():
        model = load_hf_model(spec)
    else:
        raise ConfigError(f"{spec!r} is neither 'package.module:factory' nor a model directory with config.json")
    if weights is not None:
        state = load_file(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"weights {weights} do not fit {spec}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model
