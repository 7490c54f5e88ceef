"""Hugging Face loading, kept optional: transformers is imported only when used."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError, SecateursError


class ModelLoadError(SecateursError, OSError):
    """A model could not be loaded (missing files, no network for a hub id, no transformers)."""


def is_hf_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError("loading Hugging Face models needs transformers: pip install 'secateurs[hf]'") from exc
    return transformers


def looks_local(name_or_path: str) -> bool:
    """Is this meant as a local path rather than a hub id (``org/name``)? A hub id has at most one
    slash and does not start with ``/``, ``.`` or ``~``; ``a/b`` where ``a`` is a local directory
    is a path too. A missing local path is reported at once, without asking the hub."""
    text = str(name_or_path)
    if text.startswith(("/", ".", "~")) or text.endswith(("/", os.sep)) or text.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in text:
        return True
    first, _, rest = text.partition("/")
    return bool(rest) and Path(first).is_dir()


def model_class(config: Any, causal: bool | None = None) -> Any:
    """The class ``config`` was saved from (its ``architectures``), so a GPT-2 directory loads as
    ``GPT2LMHeadModel`` with its LM head, a BERT MLM as ``BertForMaskedLM``. Without
    ``architectures``: ``AutoModelForCausalLM`` when ``causal`` is true, else ``AutoModel``."""
    transformers = require_transformers()
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            if causal and not _is_causal_lm_class(cls):
                continue
            return cls
    if names and causal is None:
        raise ModelLoadError(
            f"the config names architecture(s) {names}, which transformers {transformers.__version__} does not "
            "have; upgrade transformers (loading a bare model instead would silently drop its head)"
        )
    if causal:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _is_causal_lm_class(cls: type) -> bool:
    return cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))


def build_from_config(config: Any, causal: bool | None = None) -> nn.Module:
    """A freshly initialised model of ``config``'s own class (see :func:`model_class`)."""
    cls = model_class(config, causal)
    return cls(config) if issubclass(cls, nn.Module) else cls.from_config(config)  # an Auto class


def load_hf_model(name_or_path: str, causal: bool | None = None, **kwargs: Any) -> nn.Module:
    """Load a local directory or hub id, as the class its config names (:func:`model_class`):
    ``causal=True`` insists on a language-model head, ``None`` takes what the config says."""
    transformers = require_transformers()
    if not Path(name_or_path).exists() and looks_local(name_or_path):
        raise ModelLoadError(f"no model directory {name_or_path!r}: that path does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except OSError as exc:
        raise _load_error(name_or_path, exc) from exc
    except ValueError as exc:  # e.g. a config.json without (or with an unknown) model_type
        raise ModelLoadError(f"cannot read the config of {name_or_path!r}: {exc}") from exc
    cls = model_class(config, causal)
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        raise _load_error(name_or_path, exc) from exc


def _load_error(name_or_path: str, exc: OSError) -> ModelLoadError:
    local = Path(name_or_path).exists()
    hint = (
        f"{name_or_path} exists but is not a loadable model directory (is config.json there, and the weights?)"
        if local
        else f"{name_or_path!r} is not a local directory, and the Hugging Face hub could not be reached "
        "(offline?); download the model elsewhere and pass its local directory"
    )
    return ModelLoadError(f"cannot load {name_or_path!r}: {hint}. ({' '.join(str(exc).split())})")


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in a model directory (or a hub id); a typed error that says what to pass."""
    transformers = require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path!r}; pass --tokenizer DIR ({exc})") from exc
