"""A safetensors checkpoint read lazily, and the model's skeleton with its blocks left on disk.

Out-of-core pruning (:mod:`secateurs.outofcore`) reads a model larger than memory through these: the headers
say which file holds each tensor and its size, the skeleton holds every weight on the meta device except the
embeddings, final norm and LM head, and :func:`onload` reads one block's tensors when its turn comes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import find_blocks
from .distributed import fingerprint
from .errors import CheckpointError, ConfigError

INDEX = "model.safetensors.index.json"


# -- the checkpoint on disk -----------------------------------------------------------------------------
class Checkpoint:
    """A safetensors checkpoint read lazily: which file holds each tensor, and its size, from the headers."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        single = self.directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index with a weight_map ({exc})") from exc
        elif single.is_file():
            weight_map = dict.fromkeys(_header(single), "model.safetensors")
        else:
            raise ConfigError(
                f"{self.directory} holds no safetensors checkpoint (model.safetensors or {INDEX}); out-of-core "
                "pruning reads safetensors only (convert a .bin checkpoint with "
                "save_pretrained(safe_serialization=True))"
            )
        self.files: dict[str, str] = dict(weight_map)
        self.nbytes: dict[str, int] = {}
        self.shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in sorted(set(self.files.values())):
            for name, entry in _header(self.directory / file).items():
                start, end = entry["data_offsets"]
                self.nbytes[name] = end - start
                self.shapes[name] = (entry["dtype"], tuple(entry["shape"]))

    def read(self, names: list[str], device: torch.device) -> dict[str, Tensor]:
        """The named tensors, copied out of the memory-mapped files (closed again afterwards: pages of a
        file left mapped would count as resident memory)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, members in by_file.items():
            with safe_open(str(self.directory / file), framework="pt", device="cpu") as handle:
                for name in members:
                    out[name] = handle.get_tensor(name).to(device)
        return out

    def fingerprint(self) -> str:
        shapes = {k: [dtype, list(shape)] for k, (dtype, shape) in sorted(self.shapes.items())}
        files = {f: _stat(self.directory / f) for f in sorted(set(self.files.values()))}
        return fingerprint({"shapes": shapes, "files": files})


def _stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


# -- the skeleton --------------------------------------------------------------------------------------
def skeleton(directory: Path, checkpoint: Checkpoint, blocks_name: str | None) -> tuple[nn.Module, str, list]:
    """The model with every weight on the meta device except those outside the blocks, read from disk."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    container, blocks = find_blocks(model, blocks_name)
    outside = [n for n in checkpoint.files if not n.startswith(container + ".")]
    for name, value in checkpoint.read(outside, torch.device("cpu")).items():
        set_module_tensor_to_device(model, name, "cpu", value=value)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    meta = [n for n, t in model.state_dict().items() if t.is_meta and not n.startswith(container + ".")]
    if meta:
        raise ConfigError(f"the checkpoint in {directory} lacks {', '.join(meta[:5])}; is it a complete model?")
    return model, container, blocks


def onload(model: nn.Module, prefix: str, checkpoint: Checkpoint, device: torch.device) -> None:
    """Read every tensor whose name starts with ``prefix`` (one block) from disk into the skeleton."""
    from accelerate.utils import set_module_tensor_to_device

    names = [n for n in checkpoint.files if n.startswith(prefix)]
    for name, value in checkpoint.read(names, device).items():
        set_module_tensor_to_device(model, name, device, value=value)
    left = [n for n, t in model.state_dict().items() if n.startswith(prefix) and t.is_meta]
    if left:
        raise ConfigError(f"the checkpoint has no {', '.join(left[:5])}; is it a complete model?")


__all__ = ["INDEX", "Checkpoint", "onload", "skeleton"]
