"""Channel classes: union-find over channel ids, and label tensors that shadow activations.

Every channel a layer produces gets a fresh integer id. While the model runs, each
activation carries a *label tensor* of the same shape whose entries say which
channel id every element belongs to (``-1``: none). Ops that tie channels
together (a residual add, a norm's scale, grouped convolutions) merge ids in a
union-find; the classes that come out are the units that must be removed
together. Labels are stored as float64 so shape ops such as padding and nearest
interpolation can be replayed on them unchanged; ids stay exact below 2**53.
"""

from __future__ import annotations

import torch
from torch import Tensor

LABEL_DTYPE = torch.float64
NONE = -1.0


class UnionFind:
    """Disjoint sets over ids handed out in contiguous blocks. Every operation is vectorised:
    unions link roots in bulk (smaller id wins) and pointer jumping flattens the forest."""

    def __init__(self) -> None:
        self._parent = torch.zeros(0, dtype=torch.long)
        self._size = 0
        self._flat = True

    def __len__(self) -> int:
        return self._size

    def new(self, n: int) -> Tensor:
        """``n`` fresh ids, each its own class."""
        start = self._size
        if start + n > len(self._parent):
            grown = torch.arange(max(2 * len(self._parent), start + n, 1024), dtype=torch.long)
            grown[:start] = self._parent[:start]
            self._parent = grown
        self._parent[start : start + n] = torch.arange(start, start + n)
        self._size += n
        return torch.arange(start, start + n, dtype=LABEL_DTYPE)

    def _flatten(self) -> None:
        if self._flat:
            return
        p = self._parent[: self._size]
        while True:
            jumped = p[p]
            if torch.equal(jumped, p):
                break
            p = jumped
        self._parent[: self._size] = p
        self._flat = True

    def union(self, a: Tensor, b: Tensor) -> None:
        """Merge ``a[k]`` with ``b[k]`` for every k where both are ids (not -1)."""
        a, b = torch.broadcast_tensors(a, b)
        both = (a >= 0) & (b >= 0) & (a != b)
        if not bool(both.any()):
            return
        x, y = a[both].long(), b[both].long()
        while True:
            self._flatten()
            rx, ry = self._parent[x], self._parent[y]
            differ = rx != ry
            if not bool(differ.any()):
                return
            x, y, rx, ry = x[differ], y[differ], rx[differ], ry[differ]
            # link roots: the larger id points to the smaller (duplicates: one wins, the rest next round)
            self._parent[torch.maximum(rx, ry)] = torch.minimum(rx, ry)
            self._flat = False

    def roots(self, ids: Tensor) -> Tensor:
        """The class (smallest id) of every id; -1 stays -1."""
        self._flatten()
        flat = ids.reshape(-1).long()
        out = torch.where(flat >= 0, self._parent[flat.clamp_min(0)], flat)
        return out.reshape(ids.shape)


def full_none(shape: torch.Size | tuple[int, ...]) -> Tensor:
    return torch.full(tuple(shape), NONE, dtype=LABEL_DTYPE)


def along(ids: Tensor, shape: torch.Size | tuple[int, ...], dim: int) -> Tensor:
    """A label tensor of ``shape`` holding ``ids`` along ``dim`` (constant elsewhere)."""
    dim = dim % len(shape)
    view = [1] * len(shape)
    view[dim] = len(ids)
    return ids.to(LABEL_DTYPE).reshape(view).expand(tuple(shape)).clone()


def varying_dims(roots: Tensor) -> list[int]:
    """Dims along which the classes change (a clean activation varies along one: its channels)."""
    out = []
    for d in range(roots.ndim):
        if roots.shape[d] > 1 and bool((roots != roots.narrow(d, 0, 1)).any()):
            out.append(d)
    return out


def vector(roots: Tensor, dim: int) -> Tensor | None:
    """The classes along ``dim`` if they are the same at every other position, else None."""
    dim = dim % roots.ndim
    moved = roots.movedim(dim, 0).reshape(roots.shape[dim], -1)
    first = moved[:, :1]
    if moved.shape[1] and not bool((moved == first).all()):
        return None
    return first.reshape(-1)
