"""Hugging Face loading, kept optional: transformers is imported only when used."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import SecateursError


class ModelLoadError(SecateursError, OSError):
    """A model could not be loaded (missing files, no network for a hub id, no transformers)."""


def is_hf_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def load_hf_model(name_or_path: str, causal: bool | None = None, **kwargs: Any) -> nn.Module:
    """Load a local directory or hub id. ``causal=None`` picks the head from the config's
    ``architectures`` (a ``*ForCausalLM`` gets its LM head, anything else the bare encoder)."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError("loading Hugging Face models needs transformers: pip install 'secateurs[hf]'") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        if causal is None:
            causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        return auto.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        local = Path(name_or_path).exists()
        hint = (
            f"{name_or_path} exists but is not a loadable model directory (is config.json there?)"
            if local
            else f"{name_or_path!r} is not a local directory, and the Hugging Face hub could not be reached "
            "(offline?); download the model elsewhere and pass its local directory"
        )
        raise ModelLoadError(f"cannot load {name_or_path!r}: {hint}. ({exc})") from exc


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in a model directory (or a hub id); a typed error that says what to pass."""
    from .errors import ConfigError

    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError("loading tokenizers needs transformers: pip install 'secateurs[hf]'") from exc
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path!r}; pass --tokenizer DIR ({exc})") from exc
