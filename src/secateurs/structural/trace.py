"""What a traced run records: ports, sources, and which classes are fixed or blocked.

:class:`Trace` is the context handlers and op rules write to. It knows nothing about
pruning: it only says where every channel class lives (ports) and who created it
(sources). :mod:`.graph` turns that into groups of units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from .labels import LABEL_DTYPE, UnionFind, along, full_none, vector
from .surgery import own_tensor

ROLES = ("out", "in", "pass", "free")


@dataclass
class Port:
    """One place a channel class lives: ``module.param`` along ``dim``.

    ``role``: ``out`` rows that produce the channel, ``in`` columns that consume it,
    ``pass`` per-channel parameters of an op that maps channel c to channel c (norms,
    depthwise convs), ``free`` a parameter used directly in ``forward`` (its ``ids``
    cover the whole tensor and ``dim`` is found when cutting).
    """

    module: str
    param: str
    dim: int | None
    ids: Tensor
    role: str
    owner: str  # the module whose handler declared the port ('' for free parameters)
    size_per_index: int = 1  # parameter elements per index along dim (filled by the graph)

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.module, self.param, self.dim)


@dataclass
class Source:
    """Fresh channel ids created by one module: a layer's outputs, attention heads, hidden units."""

    key: str
    owner: str
    ids: Tensor
    kind: str  # 'channel' | 'hidden' | 'head'
    rows: int = 1  # > 1: every row must lose the same number of units (query heads per KV group)


@dataclass
class Blocked:
    ids: Tensor
    reason: str
    module: str  # where it happened ('' for the top-level forward)


@dataclass
class Trace:
    model: nn.Module
    options: dict = field(default_factory=dict)  # read by handlers, e.g. {'gqa': 'query_heads'}
    uf: UnionFind = field(default_factory=UnionFind)
    ports: dict[tuple, Port] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    fixed: list[Tensor] = field(default_factory=list)
    pinned: list[Blocked] = field(default_factory=list)  # frozen by an op reading fixed positions
    blocked: list[Blocked] = field(default_factory=list)
    owners: dict[str, nn.Module] = field(default_factory=dict)  # modules whose handler traced them
    path: list[str] = field(default_factory=list)  # module stack, for messages

    def __post_init__(self) -> None:
        self._labels = WeakIdKeyDictionary()
        self._parametric = WeakIdKeyDictionary()  # labels still per element of a parameter, no channel yet
        self._modules = dict(self.model.named_modules())
        self._by_tensor: dict[tuple[int, int | None], Port] = {}
        self._free: dict[int, tuple[str, str]] = {}
        for module_name, module in self.model.named_modules():
            for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is not None and tensor.is_floating_point() and id(tensor) not in self._free:
                    self._free[id(tensor)] = (module_name, attr)

    # -- labels -----------------------------------------------------------------------------
    def labels(self, x: Tensor) -> Tensor | None:
        """The label tensor of ``x``; a model parameter used outside any handled module gets
        fresh per-element ids on first sight (it will be cut along whichever dim they couple)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        lab = self._labels.get(x)
        if lab is None and id(x) in self._free:
            module, attr = self._free[id(x)]
            lab = self.uf.new(x.numel()).reshape(x.shape)
            self._labels[x] = lab
            self._parametric[x] = True
            self.port(module, attr, None, lab, "free", "")
        return lab

    def parametric(self, x: Tensor) -> bool:
        """Are ``x``'s labels the per-element ids of parameters (a position table, a class token)
        rather than channels? Such labels vary along every axis without meaning anything."""
        return bool(self._parametric.get(x, False))

    def owner_of(self, x: object) -> tuple[str, str] | None:
        """``(module, attribute)`` if ``x`` is one of the model's parameters or float buffers."""
        return self._free.get(id(x)) if isinstance(x, Tensor) else None

    def tracked(self, x: object) -> bool:
        """Does ``x`` carry (or would it get) labels? Cheap: assigns nothing."""
        return isinstance(x, Tensor) and (x in self._labels or id(x) in self._free) and x.is_floating_point()

    def set(self, x: Tensor, lab: Tensor, parametric: bool = False) -> None:
        if isinstance(x, Tensor) and x.is_floating_point() and tuple(lab.shape) == tuple(x.shape):
            self._labels[x] = lab.to(LABEL_DTYPE)
            if parametric:
                self._parametric[x] = True
            else:
                self._parametric.pop(x, None)

    def roots(self, lab: Tensor) -> Tensor:
        return self.uf.roots(lab)

    def channel(self, x: Tensor, dim: int) -> Tensor:
        """Classes along ``dim`` of ``x`` (a layer's input channels). Non-uniform labels mean the
        channels were rearranged in a way a layer cannot follow: they are blocked."""
        n = x.shape[dim]
        lab = self.labels(x)
        if lab is None:
            return full_none((n,))
        roots = self.roots(lab)
        vec = vector(roots, dim)
        if vec is None:
            self.block(roots, f"input of {self.where()} mixes channel classes across positions")
            return full_none((n,))
        return vec.to(LABEL_DTYPE)

    def label(self, x: Tensor, dim: int, ids: Tensor) -> None:
        """Mark ``x`` as carrying ``ids`` along ``dim``."""
        if isinstance(x, Tensor) and x.is_floating_point() and x.ndim:
            self.set(x, along(ids, x.shape, dim))

    # -- structure --------------------------------------------------------------------------
    def source(self, owner: str, key: str, n: int, kind: str = "channel", rows: int = 1) -> Tensor:
        """``n`` fresh ids for ``key`` (the same ids every time the module runs)."""
        existing = self.sources.get(key)
        if existing is None:
            existing = self.sources[key] = Source(key, owner, self.uf.new(n), kind, rows)
        return existing.ids

    def port(self, module: str, param: str, dim: int | None, ids: Tensor, role: str, owner: str) -> None:
        """Declare that ``module.param`` along ``dim`` holds ``ids``; a module that runs twice
        (shared weights) couples what both calls saw."""
        key = (module, param, dim)
        ids = ids.to(LABEL_DTYPE)
        existing = self.ports.get(key)
        if existing is None:
            self.ports[key] = Port(module, param, dim, ids, role, owner)
        else:
            self.uf.union(existing.ids, ids)
        # a tensor shared by two modules (tied embeddings / LM head) is one set of channels
        owner_module = self._modules.get(module)
        tensor = None if owner_module is None else own_tensor(owner_module, param)
        if tensor is not None:
            twin = self._by_tensor.setdefault((id(tensor), dim), self.ports[key])
            if twin is not self.ports[key] and twin.ids.shape == ids.shape:
                self.uf.union(twin.ids, ids)

    def couple(self, a: Tensor, b: Tensor) -> None:
        self.uf.union(a, b)

    def fix(self, ids: Tensor) -> None:
        """These classes reach the model's inputs or outputs, whose shapes cannot change."""
        self.fixed.append(ids.reshape(-1).to(LABEL_DTYPE))

    def pin(self, ids: Tensor, reason: str) -> None:
        """These classes must stay: an op reads them, or the channels after them, at fixed positions."""
        self._note(self.pinned, ids, reason)

    def block(self, ids: Tensor, reason: str) -> None:
        """An op the graph cannot follow touches these classes: removing them is refused."""
        self._note(self.blocked, ids, reason)

    def _note(self, into: list[Blocked], ids: Tensor, reason: str) -> None:
        ids = ids.reshape(-1)
        ids = ids[ids >= 0]
        if ids.numel():
            module = self.path[-1] if self.path else ""
            into.append(Blocked(torch.unique(ids).to(LABEL_DTYPE), reason, module))

    def where(self) -> str:
        if not self.path or not self.path[-1]:
            return f"the top-level forward of {type(self.model).__name__}"
        name = self.path[-1]
        return f"{name!r} ({type(self._modules[name]).__name__})" if name in self._modules else repr(name)
