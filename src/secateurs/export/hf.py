"""Save a pruned Hugging Face model: compressed (the default) and/or ``save_pretrained`` (dense with zeros).

A saved directory holds the config (and the tokenizer, when given) and, by format:

- ``'compressed'`` (default): ``sparse.safetensors``, the compressed checkpoint
  (:mod:`secateurs.export.compressed`), smaller than the dense model; load it with
  :func:`load_sparse` (plain ``from_pretrained`` finds no weights in it);
- ``'hf'``: ``model.safetensors`` from ``save_pretrained``, which plain ``from_pretrained`` loads;
- ``'both'``: the two, for readers of either kind (larger than the input model).

Writing both by default made every output larger than the model it came from. The directory is
written atomically and an existing one is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError, choices
from ..hf import build_from_config, load_hf_model, require_transformers
from ..io import atomic_dir
from ..patterns import NM
from ..structural.plan import PLAN_FILE, load_structured
from .compressed import CompressedSize, load_compressed_into, save_compressed

SPARSE_FILE = "sparse.safetensors"
FORMATS = ("hf", "compressed", "both")
DEFAULT_FORMAT = "compressed"


@dataclass
class SavedModel:
    path: str
    dense_bytes: int  # the weights stored dense (save_pretrained's safetensors, or what it would be)
    compressed: CompressedSize | None

    def summary(self) -> str:
        if self.compressed is None:
            return f"wrote {self.path} (dense weights {self.dense_bytes / 2**20:.2f} MiB)"
        c = self.compressed
        return (
            f"wrote {self.path}: compressed checkpoint {c.file_bytes / 2**20:.2f} MiB vs dense "
            f"{c.dense_bytes / 2**20:.2f} MiB ({c.ratio:.2f}x smaller; formats {c.formats})"
        )

    def moved_to(self, path: str | os.PathLike) -> SavedModel:
        """The same files, named where their staging directory was moved (an atomic write's final path)."""
        if self.compressed is not None:
            self.compressed.path = str(Path(path) / SPARSE_FILE)
        return SavedModel(str(path), self.dense_bytes, self.compressed)


def save_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    format: str = DEFAULT_FORMAT,
    pattern: NM | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> SavedModel:
    """Write ``model`` (already baked: zeros in the weights) to the directory ``path``, atomically.

    ``format``: ``'compressed'`` (config + compressed checkpoint, the default), ``'hf'``
    (save_pretrained only: plain ``from_pretrained`` loads it) or ``'both'``. ``extra_files`` maps
    file names to text (report, recipe).
    """
    check_format(model, format)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        saved = write_sparse(model, tmp, tokenizer, format, pattern)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return saved.moved_to(path)


def check_format(model: nn.Module, format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; valid: {choices(FORMATS)}")
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"{type(model).__name__} has no save_pretrained(); save it with save_compressed()")


def write_sparse(
    model: nn.Module, directory: Path, tokenizer: Any = None, format: str = DEFAULT_FORMAT, pattern: NM | None = None
) -> SavedModel:
    """The files of :func:`save_sparse`, written into an existing (temporary) ``directory``."""
    check_format(model, format)
    compressed = None
    if format in ("hf", "both"):
        model.save_pretrained(directory)
    else:  # what save_pretrained writes, minus the weights
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(directory)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(directory)
    if format in ("compressed", "both"):
        compressed = save_compressed(model, directory / SPARSE_FILE, pattern)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    dense = sum(f.stat().st_size for f in directory.glob("model*.safetensors"))
    if compressed is not None:
        dense = dense or compressed.dense_bytes
    return SavedModel(str(directory), dense, compressed)


def load_sparse(path: str | os.PathLike, prefer: str = "auto", **kwargs: Any) -> nn.Module:
    """Load a directory written by :func:`save_sparse` (or any HF model directory).

    ``prefer='compressed'`` reads ``sparse.safetensors`` even when dense weights are there
    too; ``'auto'`` uses the dense weights when present (faster) and the compressed ones
    otherwise.
    """
    path = Path(path)
    if (path / PLAN_FILE).is_file():  # structurally pruned (FLAP, ShortGPT ...)
        return load_structured(path)
    sparse = path / SPARSE_FILE
    has_dense = any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    if sparse.is_file() and (prefer == "compressed" or not has_dense):
        config = require_transformers().AutoConfig.from_pretrained(path)
        model = build_from_config(config)
        load_compressed_into(model, sparse)
        return model.eval()
    return load_hf_model(str(path), **kwargs)
