"""Surgery: every change a structural prune makes, logged so it can be undone exactly.

Cuts are collected first and applied together, so a parameter shared by two modules
(tied embeddings and LM head) is cut once and stays shared. Attribute changes,
module replacements and added biases go through the same log; :meth:`Surgery.undo`
puts back the very same tensor and module objects, so a refused prune leaves the
model bit-identical (and an optimizer built on it still points at live parameters).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import StructureError

_MISSING = object()


def holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) through which each parameter or buffer is reachable."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                found.setdefault(id(tensor), []).append((module, name))
    return found


def _refresh(module: nn.Module) -> None:
    """RNNs cache a flat list of their weights; rebuild it after swapping tensors."""
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def own_tensor(module: nn.Module, name: str) -> Tensor | None:
    """``module``'s own parameter or buffer ``name`` (not a submodule's), or None."""
    return module._parameters.get(name, module._buffers.get(name))


class Surgery:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._undo: list[Callable[[], None]] = []
        self._cuts: dict[int, tuple[Tensor, dict[int, Tensor], str]] = {}
        self._holders: dict[int, list[tuple[nn.Module, str]]] = {}
        #: ``(module, '#port')`` -> the positions that stay, for parameter-less ports whose handler needs
        #: to know *which* units stayed (alibi heads keep their slopes), not only how many
        self.kept_positions: dict[tuple[str, str], Tensor] = {}

    # -- cutting tensors --------------------------------------------------------------------
    def cut(self, module: nn.Module, name: str, dim: int, keep: Tensor, where: str = "") -> None:
        """Keep only ``keep`` (sorted indices) of ``module.<name>`` along ``dim``."""
        tensor = own_tensor(module, name)
        if tensor is None:
            raise StructureError(f"{where or type(module).__name__} has no parameter or buffer {name!r} to cut")
        dim = dim % tensor.ndim
        _, dims, label = self._cuts.setdefault(id(tensor), (tensor, {}, f"{where}.{name}"))
        previous = dims.get(dim)
        if previous is not None and not torch.equal(previous, keep):
            raise StructureError(
                f"{label} is shared with {where}.{name} but the two would be cut differently along dim {dim}; "
                "untie the weights first or exclude one of the modules"
            )
        dims[dim] = keep

    def apply_cuts(self) -> None:
        self._holders = holders(self.model)  # earlier steps replaced tensors
        touched: list[nn.Module] = []
        for tensor, dims, _ in self._cuts.values():
            new = tensor.detach()
            for dim, keep in sorted(dims.items()):
                new = new.index_select(dim, keep.to(new.device))
            new = new.clone().contiguous()
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            for module, name in self._holders.get(id(tensor), []):
                self._swap(module, name, new)
                touched.append(module)
        self._cuts.clear()
        for module in dict.fromkeys(touched):
            _refresh(module)

    def _swap(self, module: nn.Module, name: str, new: Tensor | None) -> None:
        store = module._parameters if name in module._parameters else module._buffers
        old = store[name]
        store[name] = new

        def undo() -> None:
            store[name] = old
            _refresh(module)

        self._undo.append(undo)

    def assign(self, module: nn.Module, name: str, value: Tensor) -> None:
        """Replace a parameter's values with a new tensor of the same role (e.g. a compensated bias)."""
        old = module._parameters[name]
        self._swap(module, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))

    # -- other edits ----------------------------------------------------------------------------
    def set(self, obj: object, attr: str, value: object) -> None:
        """``setattr`` that can be undone (module attributes, HF config fields)."""
        old = getattr(obj, attr, _MISSING)
        if old is not _MISSING and type(old) is type(value) and old == value:
            return
        setattr(obj, attr, value)
        self._undo.append(lambda: delattr(obj, attr) if old is _MISSING else setattr(obj, attr, old))

    def add_parameter(self, module: nn.Module, name: str, value: Tensor) -> nn.Parameter:
        """Give ``module`` a parameter it did not have (e.g. a compensating bias)."""
        if module._parameters.get(name) is not None:
            raise StructureError(f"{type(module).__name__} already has a parameter {name!r}")
        had_key = name in module._parameters
        param = nn.Parameter(value.detach().clone())
        module._parameters[name] = param

        def undo() -> None:
            if had_key:
                module._parameters[name] = None
            else:
                module._parameters.pop(name)

        self._undo.append(undo)
        return param

    def add_forward_pre_hook(self, module: nn.Module, hook: Callable) -> None:
        """``module.register_forward_pre_hook(hook, with_kwargs=True)``, removed again on undo."""
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        self._undo.append(handle.remove)

    def replace(self, qualname: str, new: nn.Module) -> None:
        """Put ``new`` where ``qualname`` is."""
        parent_name, _, child = qualname.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        old = parent._modules[child]
        parent._modules[child] = new
        self._undo.append(lambda: parent._modules.__setitem__(child, old))

    def drop_children(self, container: nn.Module, indices: Sequence[int]) -> None:
        """Delete entries of a ModuleList / Sequential, renumbering the rest like ``del``."""
        old = container._modules
        dropped = set(indices)
        kept = [m for i, m in enumerate(old.values()) if i not in dropped]
        container._modules = OrderedDict((str(i), m) for i, m in enumerate(kept))

        def undo() -> None:
            container._modules = old

        self._undo.append(undo)

    def undo(self) -> None:
        """Put the model back exactly as it was, in reverse order."""
        self._cuts.clear()
        while self._undo:
            self._undo.pop()()

    def commit(self) -> None:
        """Forget the log: the model keeps its changes."""
        self._undo.clear()
