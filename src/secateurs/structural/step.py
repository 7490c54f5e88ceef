"""One structural change as plain data, and the single function that applies it.

A live prune computes a :class:`Step` from scores and applies it; loading a saved
model replays the same steps onto a freshly constructed one. Both go through
:func:`apply_step`, so what is saved is exactly what was done. A step names modules
and parameters by qualified name and lists the indices that *stay*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import model_device
from ..errors import StructureError
from .handlers import handler_named
from .surgery import Surgery, own_tensor


@dataclass
class Cut:
    module: str
    param: str  # '#...' for a parameter-less port that only carries a size
    dim: int
    keep: Tensor  # sorted indices that stay
    size: int  # length along dim before the cut (checked on replay)


@dataclass
class Step:
    cuts: list[Cut] = field(default_factory=list)
    updates: dict[str, str] = field(default_factory=dict)  # module -> handler name, run after the cuts
    new_parameters: dict[str, list[int]] = field(default_factory=dict)  # 'module.param' -> shape, added after
    dropped: dict[str, list[int]] = field(default_factory=dict)  # container -> removed child indices
    kind: str = "channels"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cuts": [
                {"module": c.module, "param": c.param, "dim": c.dim, "size": c.size, "keep": encode(c.keep)}
                for c in self.cuts
            ],
            "updates": dict(self.updates),
            "new_parameters": dict(self.new_parameters),
            "dropped": {k: list(v) for k, v in self.dropped.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        cuts = [Cut(c["module"], c["param"], int(c["dim"]), decode(c["keep"]), int(c["size"])) for c in data["cuts"]]
        return cls(
            cuts=cuts,
            updates=dict(data.get("updates", {})),
            new_parameters={k: list(v) for k, v in data.get("new_parameters", {}).items()},
            dropped={k: [int(i) for i in v] for k, v in data.get("dropped", {}).items()},
            kind=data.get("kind", "channels"),
        )


def encode(keep: Tensor) -> str:
    """Sorted indices as compact ranges: ``0-5,7,9-12``."""
    values = keep.tolist()
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ",".join(parts)


def decode(text: str) -> Tensor:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return torch.tensor(out, dtype=torch.long)


def check_step(model: nn.Module, step: Step) -> None:
    """Every module, parameter and size the step names exists as expected (before any change)."""
    modules = dict(model.named_modules())
    for cut in step.cuts:
        module = modules.get(cut.module)
        if module is None:
            raise StructureError(f"the pruning plan names module {cut.module!r}, which this model does not have")
        keep = cut.keep
        if keep.ndim != 1 or (keep.numel() and (keep.min() < 0 or keep.max() >= cut.size or (keep.diff() <= 0).any())):
            raise StructureError(
                f"the pruning plan keeps indices of {cut.module}.{cut.param} that are not sorted, unique positions "
                f"in 0..{cut.size - 1}; the plan is corrupted"
            )
        if cut.param.startswith("#"):
            continue
        tensor = own_tensor(module, cut.param)
        if tensor is None or not -tensor.ndim <= cut.dim < tensor.ndim or tensor.shape[cut.dim] != cut.size:
            found = None if tensor is None else tuple(tensor.shape)
            raise StructureError(
                f"the pruning plan expects {cut.module}.{cut.param} with size {cut.size} on dim {cut.dim}, "
                f"found shape {found}; the plan belongs to a different architecture or configuration"
            )
    for name in step.updates:
        if name not in modules:
            raise StructureError(f"the pruning plan updates module {name!r}, which this model does not have")
    for name, handler in step.updates.items():
        handler_named(handler, name, type(modules[name]).__name__)
    for qualified, shape in step.new_parameters.items():
        module = modules.get(qualified.rpartition(".")[0])
        largest = max((t.numel() for t in module.parameters(recurse=False)), default=0) if module is not None else 0
        if module is None or not all(isinstance(n, int) and n >= 0 for n in shape) or math.prod(shape) > largest:
            raise StructureError(
                f"the pruning plan adds a parameter {qualified!r} of shape {shape}, which does not fit that module "
                "(a compensating bias is never larger than the layer's weight); the plan is corrupted"
            )
    for container in step.dropped:
        if container not in modules:
            raise StructureError(f"the pruning plan removes blocks from {container!r}, which this model does not have")


def apply_step(model: nn.Module, step: Step, edit: Surgery) -> None:
    """Cut, fix module attributes, add new parameters, drop blocks. Undo with ``edit.undo()``."""
    check_step(model, step)
    modules = dict(model.named_modules())
    kept: dict[str, dict[str, int]] = {}
    edit.kept_positions.clear()  # this step's positions only (a replay applies every step in one surgery)
    for cut in step.cuts:
        kept.setdefault(cut.module, {})[cut.param] = len(cut.keep)
        if cut.param.startswith("#"):
            edit.kept_positions[(cut.module, cut.param)] = cut.keep
        else:
            edit.cut(modules[cut.module], cut.param, cut.dim, cut.keep, where=cut.module)
    edit.apply_cuts()
    for name, handler_name in step.updates.items():
        module = modules[name]
        sizes = kept.get(name, {})
        for child, params in kept.items():
            if child.startswith(name + ".") or not name:
                sizes.update({f"{child[len(name) + 1 :] if name else child}.{p}": n for p, n in params.items()})
        handler_named(handler_name, name, type(module).__name__).update(module, name, edit, sizes)
    for qualified, shape in step.new_parameters.items():
        module_name, _, param = qualified.rpartition(".")
        module = model.get_submodule(module_name)
        if own_tensor(module, param) is None:
            edit.add_parameter(module, param, torch.zeros(shape, device=model_device(module)))
    for container, indices in step.dropped.items():
        edit.drop_children(model.get_submodule(container), indices)
