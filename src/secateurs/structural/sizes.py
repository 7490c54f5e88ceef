"""Size attributes of modules that are traced through (no handler) but whose forward reads them.

A module with a handler fixes its own attributes in :meth:`Handler.update`. A module traced op by
op has no such moment, yet its forward may read a size it stored at construction (torchvision's
``VisionTransformer`` reshapes with ``self.hidden_dim``). :func:`register_sizes` names a function
that sets such attributes from the module's (already cut) children; it runs after every applied
step, before the forward check, through the same undoable :class:`Surgery`, and when a saved plan
is replayed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .surgery import Surgery

SizeSync = Callable[[nn.Module, Surgery], None]
_BY_NAME: dict[str, SizeSync] = {}  # 'package.module.Class' -> sync


def register_sizes(qualified_name: str, sync: SizeSync) -> None:
    """After a cut, call ``sync(module, edit)`` on every module of class ``'package.module.Class'``
    (or a subclass); it sets attributes with ``edit.set`` so a refused removal undoes them."""
    _BY_NAME[qualified_name] = sync


def sync_sizes(model: nn.Module, edit: Surgery) -> None:
    if not _BY_NAME:
        return
    for module in model.modules():
        for cls in type(module).__mro__:
            sync = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
            if sync is not None:
                sync(module, edit)
                break
