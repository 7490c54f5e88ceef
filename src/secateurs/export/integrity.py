"""Trusting nothing a compressed checkpoint says: its header is checked before anything is allocated,
and every decoded tensor is checked against the hash saved with it.

A checkpoint's metadata decides how much memory decoding takes (a ``shape``), how bytes are read
(a ``dtype``) and where values go (N:M indices). A crafted or corrupted header could make the
loader allocate terabytes, read values as another type, or scatter out of bounds; a flipped byte
in a payload would load as a different weight. So every entry is checked against the stored
parts' own sizes, which the file's length bounds, and decoded tensors are compared with their
SHA-256 (computed on save from the exact bytes), before any model sees them.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..layout import Layout, canonical_shape

# dtype name in our metadata -> (torch dtype, safetensors' name for it)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float64": (torch.float64, "F64"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
    "int8": (torch.int8, "I8"),
    "int16": (torch.int16, "I16"),
    "int32": (torch.int32, "I32"),
    "int64": (torch.int64, "I64"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
FORMATS = ("dense", "bitmask", "n:m")
MAX_NM_M = 256  # N:M index fields up to 8 bits; the encoder uses plain bitmasks beyond
_MAX_DIMS = 8
_HEX64 = re.compile(r"[0-9a-f]{64}")


def digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (shape and dtype are checked separately)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


class Header:
    """The validated entries and aliases of a checkpoint open as ``f`` (a ``safe_open`` handle)."""

    def __init__(self, f: Any, path: str, entries: Any, aliases: Any, checksums: bool) -> None:
        self.path = path
        self._f = f
        self._keys = set(f.keys())
        self.checksums = checksums
        if not isinstance(entries, dict) or not isinstance(aliases, dict):
            self.fail("", "its 'tensors' and 'aliases' metadata must be JSON objects")
        self.entries: dict[str, dict] = entries
        self.aliases: dict[str, str] = aliases
        referenced = set()
        for name, meta in entries.items():
            referenced |= self._check_entry(name, meta)
        extra = sorted(self._keys - referenced)
        if extra:
            self.fail(extra[0], "is a stored tensor no entry refers to")
        for alias, target in aliases.items():
            if not isinstance(alias, str) or not isinstance(target, str) or target not in entries or alias in entries:
                self.fail(str(alias), f"is an alias of {target!r}, which is not a stored tensor")

    def fail(self, name: str, problem: str) -> None:
        where = f"tensor {name!r} " if name else ""
        raise CheckpointError(
            f"{self.path} is corrupted or was not written by secateurs: {where}{problem}; nothing was loaded"
        )

    def _part(self, name: str, part: str, dtype: str, shape: list[int] | None = None) -> list[int]:
        """Check a stored part exists with the right dtype (and shape); return its shape."""
        key = f"{name}::{part}"
        if key not in self._keys:
            self.fail(name, f"has no stored part {part!r}")
        piece = self._f.get_slice(key)
        got_shape, got_dtype = list(piece.get_shape()), piece.get_dtype()
        if got_dtype != DTYPES[dtype][1]:
            self.fail(name, f"stores {part!r} as {got_dtype}, expected {DTYPES[dtype][1]}")
        if shape is not None and got_shape != shape:
            self.fail(name, f"stores {part!r} with shape {got_shape}, expected {shape}")
        if len(got_shape) != 1 and shape is None:
            self.fail(name, f"stores {part!r} with shape {got_shape}, expected one dimension")
        return got_shape

    def _check_entry(self, name: Any, meta: Any) -> set[str]:
        if not isinstance(name, str) or not isinstance(meta, dict):
            self.fail(str(name), "has an entry that is not an object")
        fmt, dtype, shape = meta.get("format"), meta.get("dtype"), meta.get("shape")
        if fmt not in FORMATS:
            self.fail(name, f"has unknown format {fmt!r}")
        if dtype not in DTYPES:
            self.fail(name, f"has unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            self.fail(name, f"has an invalid shape {shape!r}")
        if self.checksums and not (isinstance(meta.get("sha256"), str) and _HEX64.fullmatch(meta["sha256"])):
            self.fail(name, "has no valid sha256 checksum")
        numel = math.prod(shape)
        if fmt == "dense":
            self._part(name, "dense", dtype, shape)
            return {f"{name}::dense"}
        if fmt == "bitmask":
            self._part(name, "bitmask", "uint8", [math.ceil(numel / 8)])
            (count,) = self._part(name, "values", dtype)
            if count > numel:
                self.fail(name, f"stores {count} values for {numel} entries")
            return {f"{name}::bitmask", f"{name}::values"}
        return self._check_nm(name, meta, dtype, shape, numel)

    def _check_nm(self, name: str, meta: dict, dtype: str, shape: list[int], numel: int) -> set[str]:
        n, m, layout = meta.get("n"), meta.get("m"), meta.get("layout")
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= MAX_NM_M):
            self.fail(name, f"has an invalid N:M pattern {n!r}:{m!r}")
        if layout not in {lay.value for lay in Layout} or len(shape) != 2:
            self.fail(name, f"has an invalid layout {layout!r} for shape {shape}")
        if canonical_shape(torch.Size(shape), Layout(layout))[2] % m:
            self.fail(name, f"has an input dimension not divisible by M={m}")
        values = numel // m * n
        self._part(name, "values", dtype, [values])
        self._part(name, "indices", "uint8", [math.ceil(values * index_bits(m) / 8)])
        return {f"{name}::values", f"{name}::indices"}

    def verify(self, name: str, tensor: Tensor) -> None:
        """The decoded ``tensor`` must be, to the bit, the one that was saved."""
        if self.checksums and digest(tensor) != self.entries[name]["sha256"]:
            self.fail(name, "does not match its saved sha256 checksum (a flipped or overwritten byte)")
