"""Activation sparsity on disk: one safetensors file of plain tensors and JSON metadata, no pickle.

Tensors: ``quantiles`` ``[layers, GRID + 1]``, ``params`` and ``blocks`` ``[layers]``, and for a
greedy allocation ``levels.<block>`` ``[K]`` and ``path.<block>`` ``[K, layers of the block]``.
Metadata ``secateurs.activation_sparsity``: format version, method, allocation, layer names, kinds,
widths and the target in use. The model's weights are saved as usual (their ``state_dict`` is
unchanged); this file only carries what the thresholds are made from. Reading checks every field
before anything is returned, so a bad file never half-installs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..io import atomic_path
from ..loading import read_safetensors
from .calibrate import ALLOCATIONS, GRID, METHODS, Calibration

KEY = "secateurs.activation_sparsity"
VERSION = 1


def write_calibration(calibration: Calibration, sparsity: float, path: str | os.PathLike, overwrite: bool) -> Path:
    tensors = {
        "quantiles": calibration.quantiles.float().contiguous(),
        "params": torch.tensor(calibration.params, dtype=torch.int64),
        "blocks": torch.tensor(calibration.blocks, dtype=torch.int64),
    }
    for block, levels in calibration.levels.items():
        tensors[f"levels.{block}"] = levels.contiguous()
        tensors[f"path.{block}"] = calibration.paths[block].contiguous()
    meta = {
        "version": VERSION,
        "method": calibration.method,
        "allocation": calibration.allocation,
        "layers": calibration.layers,
        "kinds": calibration.kinds,
        "features": calibration.features,
        "sparsity": sparsity,
    }
    with atomic_path(path, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta)})
    return Path(path)


def read_calibration(path: str | os.PathLike) -> tuple[Calibration, float]:
    """The calibration and target saved in ``path``; a :class:`CheckpointError` says what is wrong."""
    tensors, metadata = read_safetensors(path)
    if KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but holds no activation sparsity (no {KEY!r} metadata)")
    try:
        meta = json.loads(metadata[KEY])
        layers, kinds, features = list(meta["layers"]), list(meta["kinds"]), [int(f) for f in meta["features"]]
        method, allocation, sparsity = meta["method"], meta["allocation"], float(meta["sparsity"])
        version = meta["version"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable activation-sparsity metadata ({exc})") from exc
    problems = []
    if version != VERSION:
        problems.append(f"format version {version!r} (this secateurs reads {VERSION})")
    if method not in METHODS or allocation not in ALLOCATIONS:
        problems.append(f"method {method!r} / allocation {allocation!r}")
    quantiles = tensors.get("quantiles")
    n = len(layers)
    if quantiles is None or tuple(quantiles.shape) != (n, GRID + 1) or len(kinds) != n or len(features) != n:
        problems.append(f"quantiles of shape {None if quantiles is None else tuple(quantiles.shape)} for {n} layers")
    elif not bool(torch.isfinite(quantiles).all()) or bool((quantiles.diff(dim=1) < 0).any()):
        problems.append("quantiles that are not finite and non-decreasing")
    blocks, params = tensors.get("blocks"), tensors.get("params")
    if blocks is None or params is None or blocks.numel() != n or params.numel() != n:
        problems.append("missing or mis-sized 'blocks' / 'params'")
    if not 0 <= sparsity < 1:
        problems.append(f"target sparsity {sparsity}")
    if problems:
        raise CheckpointError(f"{path} is not a valid activation-sparsity file: {'; '.join(problems)}")
    calibration = Calibration(method, allocation, layers, kinds, features, blocks.tolist(), params.tolist(),
                              quantiles.float())  # fmt: skip
    if allocation == "greedy":
        _read_paths(calibration, tensors, path)
    return calibration, sparsity


def _read_paths(calibration: Calibration, tensors: dict, path: str | os.PathLike) -> None:
    for block in sorted(set(calibration.blocks)):
        levels, steps = tensors.get(f"levels.{block}"), tensors.get(f"path.{block}")
        width = len(calibration.block_layers(block))
        if levels is None or steps is None or steps.shape != (levels.numel(), width) or levels.numel() < 2:
            raise CheckpointError(f"{path}: the greedy allocation of block {block} is missing or mis-shaped")
        if bool((levels.diff() <= 0).any()) or not bool(((steps >= 0) & (steps < 1)).all()):
            raise CheckpointError(f"{path}: the greedy allocation of block {block} is not an increasing path in [0, 1)")
        calibration.levels[block], calibration.paths[block] = levels.double(), steps.double()
