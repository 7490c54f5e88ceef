"""The dependency graph: groups of coupled channels, built from one traced run.

A *unit* is one class of coupled channels: everything that must go together (a
filter, the BatchNorm entries that scale it, the next layers' input columns, and,
through a residual add, the matching filter of every other layer on that path). A
*group* is the set of units created by the same layers, e.g. all channels of one
residual stage, all neurons of one MLP, all heads of one attention layer; units
compete within their group (local ranking) or across groups (global ranking).

Units that reach the model's inputs or outputs, or pass through an op the graph
cannot follow, are *frozen*: they are never removed, and asking for them says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import StructureError
from .handlers import handler_for
from .step import Cut, Step
from .surgery import own_tensor
from .trace import Port, Source, Trace
from .tracer import trace_model

KINDS = ("channel", "head", "hidden")


@dataclass
class PortView:
    """A port as one group sees it: ``index[i]`` is the unit of position i (or -1)."""

    port: Port
    index: Tensor


@dataclass
class Group:
    name: str
    kind: str  # 'channel' | 'head' | 'hidden'
    sources: list[Source]
    roots: Tensor  # class id of each removable unit
    rows: int = 1  # > 1: each row of units must lose the same number (query heads per KV group)
    ports: list[PortView] = field(default_factory=list)
    frozen: int = 0
    frozen_reasons: list[str] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (module, reason): ops the graph cannot follow

    @property
    def units(self) -> int:
        return len(self.roots)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(v.port.module for v in self.ports))

    @property
    def unit_params(self) -> Tensor:
        """Parameters each unit holds (removed with it)."""
        counts = torch.zeros(self.units, dtype=torch.float64)
        for view in self.ports:
            if view.port.param.startswith("#"):
                continue
            per_index = 1 if view.port.dim is None else view.port.size_per_index
            hit = view.index[view.index >= 0]
            counts += torch.bincount(hit, minlength=self.units).double() * per_index
        return counts

    def __repr__(self) -> str:
        frozen = f", {self.frozen} frozen" if self.frozen else ""
        return f"Group({self.name!r}, {self.kind}, {self.units} units{frozen}, {len(self.ports)} ports)"


class DependencyGraph:
    """Groups of coupled channels of ``model``, traced on ``example_inputs``.

    ``graph.groups`` lists them; ``graph.step({group_name: unit_indices})`` says what removing
    those units cuts, and :func:`secateurs.structural.apply` applies it with a forward check.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, **options: Any) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.trace: Trace = trace_model(model, example_inputs, options)
        self._sizes()
        self.groups: list[Group] = []
        self._build()
        self.by_name = {g.name: g for g in self.groups}

    def _sizes(self) -> None:
        modules = dict(self.model.named_modules())
        for port in self.trace.ports.values():
            tensor = None
            if not port.param.startswith("#"):
                module = modules[port.module]
                tensor = own_tensor(module, port.param)
            if tensor is None:
                port.size_per_index = 0
            elif port.dim is not None:
                port.size_per_index = tensor.numel() // tensor.shape[port.dim]

    def _build(self) -> None:
        t = self.trace
        fixed = set(t.roots(torch.cat(t.fixed)).tolist()) if t.fixed else set()
        blocked: dict[int, str] = {}
        blocked_at: dict[int, tuple[str, str]] = {}
        for b in t.blocked:
            for r in t.roots(b.ids).tolist():
                blocked.setdefault(r, b.reason)
                blocked_at.setdefault(r, (b.module, b.reason))
        pinned: dict[int, str] = {}
        for p in t.pinned:
            for r in t.roots(p.ids).tolist():
                pinned.setdefault(r, p.reason)
        sources = list(t.sources.values())
        roots = [t.roots(s.ids) for s in sources]
        # sources that share a class belong to one group
        parent = list(range(len(sources)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        first: dict[int, int] = {}
        for i, r in enumerate(roots):
            for c in r.tolist():
                if c < 0:
                    continue
                j = first.setdefault(c, i)
                parent[find(i)] = find(j)
        members: dict[int, list[int]] = {}
        for i in range(len(sources)):
            members.setdefault(find(i), []).append(i)
        unit_of: dict[int, tuple[int, int]] = {}
        for gi, idxs in enumerate(members.values()):
            ordered = list(dict.fromkeys(c for i in idxs for c in roots[i].tolist() if c >= 0))
            free = [c for c in ordered if c not in fixed and c not in blocked and c not in pinned]
            reasons = list(dict.fromkeys(
                "reaches the model's inputs or outputs" if c in fixed else blocked.get(c) or pinned[c]
                for c in ordered if c in fixed or c in blocked or c in pinned
            ))  # fmt: skip
            group_sources = [sources[i] for i in idxs]
            kinds = {s.kind for s in group_sources}
            kind = "head" if "head" in kinds else "hidden" if "hidden" in kinds else "channel"
            rows = group_sources[0].rows if len(group_sources) == 1 and len(free) == len(ordered) else 1
            group = Group(
                name=group_sources[0].key,
                kind=kind,
                sources=group_sources,
                roots=torch.tensor(free, dtype=torch.long),
                rows=rows,
                frozen=len(ordered) - len(free),
                frozen_reasons=reasons,
                blocked=list(dict.fromkeys(blocked_at[c] for c in ordered if c in blocked_at and c not in fixed)),
            )
            for u, c in enumerate(free):
                unit_of[c] = (gi, u)
            self.groups.append(group)
        self._attach_ports(unit_of)

    def _attach_ports(self, unit_of: dict[int, tuple[int, int]]) -> None:
        """Each port's positions as unit indices of every group it touches (-1: not that group's).
        Vectorised: ports of large models have millions of positions."""
        classes = torch.tensor(list(unit_of), dtype=torch.long)
        size = int(classes.max()) + 1 if len(classes) else 0
        group_of = torch.full((size,), -1, dtype=torch.long)
        unit_at = torch.full((size,), -1, dtype=torch.long)
        if size:
            group_of[classes] = torch.tensor([g for g, _ in unit_of.values()], dtype=torch.long)
            unit_at[classes] = torch.tensor([u for _, u in unit_of.values()], dtype=torch.long)
        for port in self.trace.ports.values():
            r = self.trace.roots(port.ids).reshape(-1).long()
            known = (r >= 0) & (r < size)
            groups = torch.full_like(r, -1)
            units = torch.full_like(r, -1)
            groups[known] = group_of[r[known]]
            units[known] = unit_at[r[known]]
            for gi in torch.unique(groups[groups >= 0]).tolist():
                self.groups[gi].ports.append(PortView(port, torch.where(groups == gi, units, -1)))

    # -- selection ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Group:
        if name not in self.by_name:
            raise StructureError(f"no group named {name!r}; groups: {', '.join(self.by_name)}")
        return self.by_name[name]

    def step(self, removed: dict[str, Tensor | list[int]]) -> Step:
        """The cuts that remove ``removed[group]`` (unit indices) from every port."""
        gone: dict[int, Tensor] = {}
        for name, units in removed.items():
            group = self[name]
            units = torch.as_tensor(units, dtype=torch.long).reshape(-1)
            if units.numel() and (units.min() < 0 or units.max() >= group.units):
                raise StructureError(f"group {name!r} has units 0..{group.units - 1}; got {units.tolist()}")
            if units.numel() >= group.units:
                raise StructureError(
                    f"removing all {group.units} units of group {name!r} would delete the layer; keep at least one"
                )
            mask = torch.zeros(group.units, dtype=torch.bool)
            mask[units] = True
            gone[id(group)] = mask
        step = Step()
        ports: dict[tuple, list[tuple[PortView, Tensor]]] = {}
        for group in self.groups:
            mask = gone.get(id(group))
            if mask is None:
                continue
            for view in group.ports:
                ports.setdefault(view.port.key, []).append((view, mask))
        for views in ports.values():
            port = views[0][0].port
            drop = torch.zeros(len(views[0][0].index), dtype=torch.bool)
            for view, mask in views:
                hit = view.index >= 0
                drop[hit] |= mask[view.index[hit]]
            if not bool(drop.any()):
                continue
            if port.dim is not None and bool(drop.all()) and not port.param.startswith("#"):
                raise StructureError(
                    f"removing these units would delete every channel of {port.module}.{port.param} along dim "
                    f"{port.dim} (its group's units span several layers of uneven width); keep at least one unit "
                    "that this layer holds, or exclude it from the scope"
                )
            if port.dim is None:
                step.cuts.append(self._free_cut(port, drop))
            else:
                step.cuts.append(Cut(port.module, port.param, port.dim, (~drop).nonzero().reshape(-1), len(drop)))
            if port.owner:
                step.updates[port.owner] = handler_for(self.trace.owners[port.owner]).name
        return step

    def _free_cut(self, port: Port, drop: Tensor) -> Cut:
        """A parameter used directly in forward: the removed elements must be whole slices."""
        mask = drop.reshape(port.ids.shape)
        for dim in range(mask.ndim):
            line = mask.any(dim=tuple(d for d in range(mask.ndim) if d != dim), keepdim=True)
            if torch.equal(mask, line.expand_as(mask)):
                keep = (~line.reshape(-1)).nonzero().reshape(-1)
                if not keep.numel():
                    break
                return Cut(port.module, port.param, dim, keep, mask.shape[dim])
        raise StructureError(
            f"parameter {port.module}.{port.param} is used directly in forward and the removed channels do not "
            "form whole slices of it along one axis; register a handler for its module or exclude it"
        )
