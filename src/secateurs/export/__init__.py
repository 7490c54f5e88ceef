"""Export: compressed sparse checkpoints and Hugging Face directories of pruned models."""

from __future__ import annotations

from .compressed import CompressedSize, load_compressed, load_compressed_into, save_compressed
from .hf import DEFAULT_FORMAT, SPARSE_FILE, SavedModel, load_sparse, save_sparse

__all__ = [
    "DEFAULT_FORMAT",
    "SPARSE_FILE",
    "CompressedSize",
    "SavedModel",
    "load_compressed",
    "load_compressed_into",
    "load_sparse",
    "save_compressed",
    "save_sparse",
]
