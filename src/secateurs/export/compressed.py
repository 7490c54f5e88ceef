"""A compressed sparse checkpoint that loads back bit-exact into the dense model.

One safetensors file. Each pruned weight is stored in the cheapest of three formats:

- ``bitmask``: one bit per entry (row-major, packed) plus the surviving values in order --
  ``numel / 8 + nnz * itemsize`` bytes, the natural format of unstructured sparsity;
- ``n:m``: along the input dimension (the axis sparse tensor cores group), exactly N values
  of every M plus their positions in ``ceil(log2 M)`` bits each -- ``numel * N / M`` values and
  an index stream of ``numel * N / M * log2(M) / 8`` bytes;
- ``dense``, when neither is smaller (and for every other tensor: norms, embeddings, biases).

"Nonzero" means "bits not all zero", so ``-0.0`` is kept as a value and the round trip is exact
to the bit. Tensors that share storage (tied embeddings) are stored once and aliased. Every
tensor's SHA-256 is saved with it and checked on load, after the header was checked against
the stored parts (:mod:`.integrity`), so a corrupted file is refused, never loaded as other weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io import atomic_path
from ..layout import Layout, canonical_shape, from_canonical, layout_of, to_canonical
from ..loading import check_state_fits, load_state_strict
from ..patterns import NM
from .integrity import MAX_NM_M, Header, digest, index_bits

FORMAT = "secateurs.sparse"
VERSION = "2"  # 2: a sha256 per tensor; version 1 files (no checksums) still load
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class CompressedSize:
    """Bytes of a compressed checkpoint against the same tensors stored dense."""

    path: str
    file_bytes: int
    dense_bytes: int
    formats: dict[str, int]  # format -> number of tensors

    @property
    def ratio(self) -> float:
        """Dense size / compressed size (higher is better)."""
        return self.dense_bytes / max(self.file_bytes, 1)


def bits_nonzero(tensor: Tensor) -> Tensor:
    """True where the entry's bits are not all zero (so -0.0 counts as a value)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()]) != 0


def _pack(bits: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(bits.reshape(-1).cpu().numpy().astype(np.uint8), bitorder="little"))


def _unpack(packed: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool))


def _encode_bitmask(tensor: Tensor) -> dict[str, Tensor]:
    keep = bits_nonzero(tensor)
    return {"bitmask": _pack(keep), "values": tensor.reshape(-1)[keep.reshape(-1)].contiguous()}


def _decode_bitmask(keep: Tensor, values: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """The dense tensor from its unpacked keep-bits (flat) and the kept values."""
    out = torch.zeros(keep.numel(), dtype=dtype)
    out[keep] = values
    return out.reshape(shape)


def _nm_groups(tensor: Tensor, layout: Layout, m: int) -> Tensor:
    """``(groups, m)`` view of the canonical weight along its input dimension."""
    return to_canonical(tensor, layout).reshape(-1, m)


def _encode_nm(tensor: Tensor, layout: Layout, pattern: NM) -> dict[str, Tensor] | None:
    """Values and packed indices, or None when ``tensor`` is not N:M along its input dim."""
    if to_canonical(tensor, layout).shape[2] % pattern.m:
        return None
    groups = _nm_groups(tensor, layout, pattern.m)
    keep = bits_nonzero(groups)
    if not bool((keep.sum(1) <= pattern.n).all()):
        return None
    # exactly N positions per group: the nonzeros first, padded with (exactly +0.0) zeros
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, : pattern.n]
    index = torch.sort(order, dim=1).values
    values = torch.gather(groups, 1, index)
    k = index_bits(pattern.m)
    bits = (index.reshape(-1, 1) >> torch.arange(k)) & 1
    return {"values": values.reshape(-1).contiguous(), "indices": _pack(bits.bool())}


def _decode_nm(parts: dict[str, Tensor], meta: dict, dtype: torch.dtype) -> Tensor | None:
    """The dense tensor, or None when an index points outside its group of M (a corrupted file)."""
    n, m, shape = meta["n"], meta["m"], meta["shape"]
    layout = Layout(meta["layout"])
    values = parts["values"].reshape(-1, n)
    k = index_bits(m)
    bits = _unpack(parts["indices"], values.numel() * k).reshape(-1, k).long()
    index = (bits << torch.arange(k)).sum(1).reshape(-1, n)
    if index.numel() and int(index.max()) >= m:
        return None
    groups = torch.zeros(values.shape[0], m, dtype=dtype).scatter_(1, index, values)
    return from_canonical(groups.reshape(canonical_shape(torch.Size(shape), layout)), layout, torch.Size(shape))


def _layouts(model: nn.Module) -> dict[str, Layout]:
    out = {}
    for name, module in model.named_modules():
        layout = layout_of(module)
        if layout in (Layout.LINEAR, Layout.TRANSPOSED) and getattr(module, "weight", None) is not None:
            out[f"{name}.weight" if name else "weight"] = layout
    return out


def _nbytes(parts: dict[str, Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts.values())


def _encode(tensor: Tensor, layout: Layout | None, pattern: NM | None) -> tuple[dict, dict[str, Tensor]]:
    meta = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."), "sha256": digest(tensor)}
    dense_bytes = tensor.numel() * tensor.element_size()
    if layout is not None and tensor.ndim == 2 and tensor.is_floating_point():
        nm = pattern is not None and pattern.m <= MAX_NM_M
        parts = _encode_nm(tensor, layout, pattern) if nm else None
        if parts is not None and _nbytes(parts) < dense_bytes:
            return {**meta, "format": "n:m", "n": pattern.n, "m": pattern.m, "layout": layout.value}, parts
        parts = _encode_bitmask(tensor)
        if _nbytes(parts) < dense_bytes:
            return {**meta, "format": "bitmask"}, parts
    return {**meta, "format": "dense"}, {"dense": tensor.contiguous()}


def save_compressed(
    model: nn.Module, path: str | os.PathLike, pattern: NM | None = None, overwrite: bool = False
) -> CompressedSize:
    """Write ``model.state_dict()`` to ``path`` compressed; N:M weights use ``pattern``'s format."""
    state = model.state_dict()
    layouts = _layouts(model)
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    dense_bytes = 0
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        dense_bytes += tensor.numel() * tensor.element_size()
        meta, parts = _encode(tensor, layouts.get(name), pattern)
        entries[name] = meta
        for part, value in parts.items():
            tensors[f"{name}::{part}"] = value
    metadata = {"format": FORMAT, "version": VERSION, "tensors": json.dumps(entries), "aliases": json.dumps(aliases)}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    formats: dict[str, int] = {}
    for meta in entries.values():
        formats[meta["format"]] = formats.get(meta["format"], 0) + 1
    return CompressedSize(str(path), Path(path).stat().st_size, dense_bytes, formats)


def _open(path: str | os.PathLike) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist") from exc
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc


def _header(f: Any, path: str | os.PathLike) -> Header:
    metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a secateurs compressed checkpoint (format={metadata.get('format')!r})")
    version = metadata.get("version")
    if version not in ("1", VERSION):
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this secateurs reads 1 and {VERSION}")
    try:
        entries, aliases = json.loads(metadata["tensors"]), json.loads(metadata.get("aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has unreadable checkpoint metadata ({exc}); nothing was loaded") from exc
    return Header(f, str(path), entries, aliases, checksums=version != "1")


def _decode(f: Any, header: Header, name: str) -> Tensor:
    meta = header.entries[name]
    dtype = getattr(torch, meta["dtype"])  # one of integrity.DTYPES, checked
    fmt = meta["format"]
    if fmt == "dense":
        tensor = f.get_tensor(f"{name}::dense")
    elif fmt == "bitmask":
        keep = _unpack(f.get_tensor(f"{name}::bitmask"), math.prod(meta["shape"]))  # unpacked once
        values = f.get_tensor(f"{name}::values")
        kept = int(keep.sum())
        if kept != values.numel():
            header.fail(name, f"has {kept} bits set but {values.numel()} values")
        tensor = _decode_bitmask(keep, values, meta["shape"], dtype)
    else:
        tensor = _decode_nm({p: f.get_tensor(f"{name}::{p}") for p in ("values", "indices")}, meta, dtype)
        if tensor is None:
            header.fail(name, f"has an N:M index outside its group of {meta['m']}")
    header.verify(name, tensor)
    return tensor


def _read(path: str | os.PathLike, before_decoding: Any = None) -> dict[str, Tensor]:
    """Check the header, let ``before_decoding(entries, aliases)`` refuse it, then decode and verify."""
    try:
        with _open(path) as f:
            header = _header(f, path)
            if before_decoding is not None:
                before_decoding(header.entries, header.aliases)
            state = {name: _decode(f, header, name) for name in header.entries}
    except SafetensorError as exc:  # a payload past the end of a truncated file
        raise CheckpointError(f"{path} is truncated or corrupted ({exc}); nothing was loaded") from exc
    for alias, target in header.aliases.items():
        state[alias] = state[target]
    return state


def load_compressed(path: str | os.PathLike) -> dict[str, Tensor]:
    """The dense state dict stored in a compressed checkpoint (aliases included), every tensor
    checked against its saved checksum. A corrupted file is a :class:`CheckpointError`."""
    return _read(path)


def load_compressed_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a compressed checkpoint into ``model``, all or nothing: names and shapes are checked
    against the model before decoding, and the decoded tensors before the model is written."""
    what = f"compressed checkpoint {path}"

    def fits(entries: dict[str, dict], aliases: dict[str, str]) -> None:
        # stand-ins of the right shape without memory (stride 0): nothing is allocated before the check
        shapes = {name: torch.empty(()).expand(meta["shape"]) for name, meta in entries.items()}
        shapes.update({alias: shapes[target] for alias, target in aliases.items()})
        check_state_fits(model, shapes, what)

    load_state_strict(model, _read(path, fits), what)
