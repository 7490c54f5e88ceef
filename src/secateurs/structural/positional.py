"""Ops whose constants are channel positions: fixed slices, ``narrow``, ``select``, index lists.

``h[:, 3:13]`` reads channels 3 to 12. Remove channel 1 and the same code reads what were
channels 4 to 13: the shapes still line up, the forward check passes, and the model computes
something else (ARCHITECTURE invariant 9). So for every such op on a channel axis we work out
which positions its constants pin, and freeze exactly those:

- a position counted from the start (``3:``, ``[:, 5]``, an index 7) moves when any channel
  before it is removed: the channels at and before it are frozen;
- a position counted from the end (``-4:``, ``[:, -1]``) moves when any channel at or after it is
  removed: those are frozen;
- what lies between an open start and an open end follows the cut exactly (``h[:, 3:]`` keeps
  reading "everything from channel 3 on"), so it stays removable;
- a stride, a boolean mask, a roll or a shuffle depends on every position: all are frozen.

The rest of the group stays removable, and each frozen unit names the op and its constants.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .labels import varying_dims
from .trace import Trace

Reads = list[tuple[int, Tensor, str]]  # (dim, frozen positions along it, what the op reads)


def _start(n: int, position: int) -> Tensor:
    """Frozen: every channel before ``position`` (counted from the start)."""
    frozen = torch.zeros(n, dtype=torch.bool)
    frozen[: max(0, min(position, n))] = True
    return frozen


def _end(n: int, count: int) -> Tensor:
    """Frozen: the last ``count`` channels (a position counted from the end)."""
    frozen = torch.zeros(n, dtype=torch.bool)
    if 0 < count <= n:
        frozen[n - count :] = True
    return frozen


def _everything(n: int) -> Tensor:
    return torch.ones(n, dtype=torch.bool)


def _slice(n: int, item: slice) -> Tensor:
    step = 1 if item.step is None else operator.index(item.step)
    if step != 1:
        return _everything(n)
    frozen = torch.zeros(n, dtype=torch.bool)
    if item.start is not None:
        start = operator.index(item.start)
        frozen |= _start(n, start) if start >= 0 else _end(n, -start)
    if item.stop is not None:
        stop = operator.index(item.stop)
        if 0 <= stop < n:
            frozen |= _start(n, stop)
        elif stop < 0:
            frozen |= _end(n, -stop)
    return frozen


def _indices(n: int, index: Any) -> Tensor:
    """Integer positions (an int, a list, a tensor): the furthest one from each end pins the rest."""
    values = torch.as_tensor(index).reshape(-1)
    if values.dtype == torch.bool:
        return _everything(n)
    frozen = torch.zeros(n, dtype=torch.bool)
    if not values.numel():
        return frozen
    ahead, behind = values[values >= 0], values[values < 0]
    if ahead.numel():
        frozen |= _start(n, int(ahead.max()) + 1)
    if behind.numel():
        frozen |= _end(n, -int(behind.min()))
    return frozen


def _consumed(item: Any) -> int:
    if item is None or isinstance(item, bool):
        return 0
    if isinstance(item, Tensor) and item.dtype == torch.bool:
        return item.ndim
    return 1


def _describe(item: Any) -> str:
    if isinstance(item, slice):
        parts = ["" if v is None else str(v) for v in (item.start, item.stop)]
        return ":".join(parts) + (f":{item.step}" if item.step is not None else "")
    if isinstance(item, Tensor):
        return f"an index tensor of {item.numel()} position(s)"
    return repr(item)


def _getitem(shape: torch.Size, args: tuple, kwargs: dict) -> Reads:
    index = args[1]
    items = index if isinstance(index, tuple) else (index,)
    explicit = sum(_consumed(i) for i in items if i is not Ellipsis)
    reads: Reads = []
    dim = 0
    for item in items:
        if item is Ellipsis:
            dim += len(shape) - explicit
            continue
        width = _consumed(item)
        if width and dim < len(shape):
            if isinstance(item, slice):
                reads.append((dim, _slice(shape[dim], item), f"[{_describe(item)}]"))
            elif isinstance(item, Tensor) and item.dtype == torch.bool:
                reads += [(d, _everything(shape[d]), "a boolean mask") for d in range(dim, dim + width)]
            else:
                reads.append((dim, _indices(shape[dim], item), f"[{_describe(item)}]"))
        dim += width
    return reads


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _narrow(shape: torch.Size, args: tuple, kwargs: dict) -> Reads:
    dim, start, length = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "start"), _arg(args, kwargs, 3, "length")
    start, length, n = int(start), int(length), shape[dim]
    frozen = _start(n, start + length) if start >= 0 else _end(n, -start)  # a fixed length: the window's far end too
    return [(dim, frozen, f"narrow(start={start}, length={length})")]


def _select(shape: torch.Size, args: tuple, kwargs: dict) -> Reads:
    dim, index = _arg(args, kwargs, 1, "dim"), int(_arg(args, kwargs, 2, "index"))
    return [(dim, _indices(shape[dim], index), f"select(index={index})")]


def _index_along(position: int, name: str) -> Callable[[torch.Size, tuple, dict], Reads]:
    """``index_select(x, dim, index)`` / ``gather(x, dim, index)``: positions in a tensor."""

    def reads(shape: torch.Size, args: tuple, kwargs: dict) -> Reads:
        dim, index = _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, position, name)
        return [(dim, _indices(shape[dim], index), f"an index tensor of {index.numel()} position(s)")]

    return reads


def _take_along_dim(shape: torch.Size, args: tuple, kwargs: dict) -> Reads:
    index, dim = _arg(args, kwargs, 1, "indices"), _arg(args, kwargs, 2, "dim")
    if dim is None:  # over the flattened tensor: every position of every axis
        return [(d, _everything(n), "flattened positions") for d, n in enumerate(shape)]
    return [(dim, _indices(shape[dim], index), f"an index tensor of {index.numel()} position(s)")]


def _all_of(dims_of: Callable[[torch.Size, tuple, dict], list[int]], what: str):
    def reads(shape: torch.Size, args: tuple, kwargs: dict) -> Reads:
        return [(d, _everything(shape[d]), what) for d in dims_of(shape, args, kwargs)]

    return reads


def _roll_dims(shape: torch.Size, args: tuple, kwargs: dict) -> list[int]:
    dims = _arg(args, kwargs, 2, "dims")
    if dims is None or dims == ():
        return list(range(len(shape)))
    return list(dims) if isinstance(dims, (list, tuple)) else [dims]


def _repeat_dims(shape: torch.Size, args: tuple, kwargs: dict) -> list[int]:
    repeats, dim = _arg(args, kwargs, 1, "repeats"), _arg(args, kwargs, 2, "dim")
    if not isinstance(repeats, Tensor) or repeats.numel() <= 1:
        return []  # the same count for every position follows any cut
    return list(range(len(shape))) if dim is None else [dim]


_READERS: dict[Any, Callable[[torch.Size, tuple, dict], Reads]] = {
    torch.Tensor.__getitem__: _getitem,
    torch.Tensor.__setitem__: _getitem,
    torch.narrow: _narrow,
    torch.Tensor.narrow: _narrow,
    torch.select: _select,
    torch.Tensor.select: _select,
    torch.index_select: _index_along(2, "index"),
    torch.Tensor.index_select: _index_along(2, "index"),
    torch.gather: _index_along(2, "index"),
    torch.Tensor.gather: _index_along(2, "index"),
    torch.take_along_dim: _take_along_dim,
    torch.Tensor.take_along_dim: _take_along_dim,
    torch.roll: _all_of(_roll_dims, "a roll"),
    torch.Tensor.roll: _all_of(_roll_dims, "a roll"),
    torch.diagonal: _all_of(lambda s, a, k: [_arg(a, k, 2, "dim1", 0), _arg(a, k, 3, "dim2", 1)], "a diagonal"),
    torch.Tensor.diagonal: _all_of(lambda s, a, k: [_arg(a, k, 2, "dim1", 0), _arg(a, k, 3, "dim2", 1)], "a diagonal"),
    torch.masked_select: _all_of(lambda s, a, k: list(range(len(s))), "a boolean mask"),
    torch.Tensor.masked_select: _all_of(lambda s, a, k: list(range(len(s))), "a boolean mask"),
    torch.repeat_interleave: _all_of(_repeat_dims, "a repeat count per position"),
    torch.Tensor.repeat_interleave: _all_of(_repeat_dims, "a repeat count per position"),
    torch.channel_shuffle: _all_of(lambda s, a, k: [1], "a channel shuffle"),
    torch.nn.functional.channel_shuffle: _all_of(lambda s, a, k: [1], "a channel shuffle"),
}


def pin_positions(t: Trace, func: Any, args: tuple, kwargs: dict, name_of: Callable[[Any], str]) -> None:
    """Freeze the channels whose removal would move what ``func`` reads at fixed positions. ``name_of(func)``
    names the op in the message, computed only when something is pinned (this runs for every traced op)."""
    reader = _READERS.get(func)
    x = args[0] if args else None
    if reader is None or not isinstance(x, Tensor):
        return
    lab = t.labels(x)
    if lab is None or t.parametric(x):
        return  # a parameter's own axes (a position table sliced to the sequence length) are not channels
    roots = t.roots(lab)
    axes = set(varying_dims(roots))
    for dim, frozen, what in reader(x.shape, args, kwargs):
        dim = operator.index(dim) % x.ndim
        if dim in axes and bool(frozen.any()):
            t.pin(
                roots.movedim(dim, 0)[frozen],
                f"{name_of(func)} in {t.where()} reads fixed channel positions ({what}) on axis {dim}",
            )
