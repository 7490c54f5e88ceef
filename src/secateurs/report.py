"""What changed: per-layer table, totals, MACs, bytes, layer collapse; JSON out."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .evaluation import count_macs, is_connected
from .io import write_text
from .layout import channel_dims, to_canonical
from .masking import effective_masks
from .patterns import NM, Block, Element, InputChannel, OutputChannel, Pattern
from .scope import Target


@dataclass
class LayerReport:
    name: str
    type: str
    shape: list[int]
    params: int
    nonzeros: int
    sparsity: float
    pattern_valid: bool | None
    collapsed: bool  # every weight pruned
    dead_outputs: int  # output rows with no surviving weight
    dead_inputs: int  # input columns with no surviving weight
    macs_dense: int | None = None
    macs_effective: int | None = None
    bytes_dense: int = 0
    bytes_compressed: int = 0


@dataclass
class LayerResult:
    """What a solver did to one weight (reconstruct mode), or what scoring it took (the OBS saliency's
    Hessian inverse in mask / bake mode)."""

    name: str
    sparsity: float  # requested for this layer
    dampening: float | None = None  # Hessian dampening that finally worked
    retries: int = 0  # times the dampening had to be raised (a Cholesky failed)
    loss: float | None = None  # the solver's estimate of the added squared error
    #: the solver's own diagnostics (ALPS: ADMM iterations, converged, support_change, cg_iterations, cg_residual)
    solver: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunDetails:
    """How the run went: which runner, per-layer allocation, solver results, calibration."""

    runner: str = "model"
    blocks: str | None = None  # the container of repeated blocks (block runner)
    layer_sparsities: dict[str, float] = field(default_factory=dict)  # per layer (block), when they differ
    observed: dict[str, float] = field(default_factory=dict)  # what the allocation observed (OWL: outlier ratios)
    solved: list[LayerResult] = field(default_factory=list)  # per layer: the solver's results, Hessian dampening
    seconds: float | None = None
    calibration: dict[str, int] = field(default_factory=dict)
    outside_blocks: list[str] = field(default_factory=list)  # scoped, but outside the blocks the runner prunes
    #: modules pruned by a declared fallback instead of the run's method, and why (MoE experts with too few tokens)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def lines(self, allocation: str | None) -> list[str]:
        out = []
        if self.blocks is not None:
            timing = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
            out.append(f"{self.runner} runner: blocks of {self.blocks!r}{timing}")
        if self.outside_blocks:
            shown = ", ".join(self.outside_blocks[:5]) + (" ..." if len(self.outside_blocks) > 5 else "")
            out.append(f"left dense, outside the blocks: {shown} (prune them with runner='model')")
        if "seqlen" in self.calibration:
            out.append(f"calibration: {self.calibration['nsamples']} x {self.calibration['seqlen']} tokens")
        elif self.calibration:
            out.append(f"calibration: {self.calibration['batches']} batches as given")
        if self.observed:
            pairs = ", ".join(
                f"{self.observed[k]:.2%}->{self.layer_sparsities.get(k, float('nan')):.1%}" for k in self.observed
            )
            out.append(f"{allocation} observation -> layer sparsity: {pairs}")
        for name, why in self.fallbacks.items():
            out.append(f"NOTE {name}: {why}")
        for layer in self.solved:
            if layer.solver.get("converged") is False:
                out.append(
                    f"NOTE {layer.name}: the solver stopped at its iteration cap ({layer.solver.get('iterations')} "
                    f"iterations) before its support settled ({layer.solver.get('support_change', 0):.2%} of the kept "
                    "weights still moving); the mask is exact, the weights are its conjugate-gradient solve"
                )
            if layer.retries:
                out.append(
                    f"NOTE {layer.name}: Hessian not positive definite; dampening raised to {layer.dampening:g} "
                    f"({layer.retries} retr{'y' if layer.retries == 1 else 'ies'})"
                )
        return out


class JsonReport:
    """Every report is plain data: ``to_dict()`` for code, ``to_json()`` for files and tools."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self, path: str | os.PathLike | None = None, overwrite: bool = False) -> str:
        """The report as JSON; also written (atomically, never clobbering unless asked) to ``path``."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            write_text(Path(path), text + "\n", overwrite=overwrite)
        return text

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        raise NotImplementedError


def _fit(name: str, width: int) -> str:
    """Keep the informative end of a long qualified name (``…layers.5.mlp.up_proj.weight``)."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


@dataclass
class Report(JsonReport):
    layers: list[LayerReport]
    params: int  # every parameter of the model
    nonzeros: int
    target_params: int
    target_nonzeros: int
    macs_dense: int | None
    macs_effective: int | None
    bytes_dense: int
    bytes_compressed: int
    connected: bool | None
    config: dict[str, Any] = field(default_factory=dict)
    details: RunDetails = field(default_factory=RunDetails)
    #: the largest weight tensors that were not pruning targets: {name, params, module}
    left_out: list[dict[str, Any]] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        """The share of the model's parameters that were pruning targets (the sparsity is over these)."""
        return self.target_params / max(self.params, 1)

    @property
    def sparsity(self) -> float:
        """Over the pruned targets."""
        return 1.0 - self.target_nonzeros / max(self.target_params, 1)

    @property
    def model_sparsity(self) -> float:
        return 1.0 - self.nonzeros / max(self.params, 1)

    @property
    def collapsed_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.collapsed]

    @property
    def block_sparsities(self) -> list[float]:
        """Sparsity per layer (block) as the allocation set it (OWL varies it)."""
        return list(self.details.layer_sparsities.values())

    @property
    def outlier_ratios(self) -> list[float] | None:
        """OWL's outlier ratio per layer (block), measured on the dense model."""
        return list(self.details.observed.values()) if self.details.observed else None

    @property
    def not_converged(self) -> list[LayerResult]:
        """Layers whose iterative solver (ALPS) hit its iteration cap before its support settled."""
        return [layer for layer in self.details.solved if layer.solver.get("converged") is False]

    @property
    def dampening_raised(self) -> list[LayerResult]:
        """Layers whose Hessian needed more dampening than asked."""
        return [layer for layer in self.details.solved if layer.retries]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(sparsity=self.sparsity, model_sparsity=self.model_sparsity, collapsed_layers=self.collapsed_layers,
                    coverage=self.coverage)  # fmt: skip
        return data

    def table(self) -> str:
        width = min(max([len(r.name) for r in self.layers] + [5]), 48)
        head = f"{'layer':<{width}} {'shape':<16} {'params':>9} {'nonzero':>9} {'sparsity':>8} {'valid':>5}"
        lines = [head, "-" * len(head)]
        for r in self.layers:
            valid = "-" if r.pattern_valid is None else ("yes" if r.pattern_valid else "NO")
            flag = "  COLLAPSED" if r.collapsed else ""
            shape = "x".join(map(str, r.shape))
            name = _fit(r.name, width)
            lines.append(
                f"{name:<{width}} {shape:<16} {r.params:>9,} {r.nonzeros:>9,} {r.sparsity:>8.2%} {valid:>5}{flag}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"targets: {self.target_nonzeros:,}/{self.target_params:,} nonzero ({self.sparsity:.2%} sparse); "
            f"model: {self.nonzeros:,}/{self.params:,} ({self.model_sparsity:.2%} sparse)"
        )
        lines.append(f"coverage: {self.coverage:.1%} of the model's parameters were pruning targets")
        if self.left_out:
            shown = ", ".join(f"{t['name']} ({t['params']:,}, {t['module']})" for t in self.left_out)
            lines.append(f"largest weights left out: {shown}")
        if self.macs_dense:
            lines.append(
                f"MACs: {self.macs_dense:,} dense -> {self.macs_effective:,} effective "
                f"({self.macs_dense / max(self.macs_effective or 1, 1):.2f}x fewer)"
            )
        lines.append(
            f"size: {_mb(self.bytes_dense)} dense -> {_mb(self.bytes_compressed)} compressed estimate "
            f"({self.bytes_dense / max(self.bytes_compressed, 1):.2f}x smaller)"
        )
        if self.collapsed_layers:
            lines.append(f"LAYER COLLAPSE: fully pruned: {', '.join(self.collapsed_layers)}")
        if self.connected is False:
            lines.append("DISCONNECTED: no path of surviving weights links the input to the output")
        lines += self.details.lines(self.config.get("allocation") if isinstance(self.config.get("allocation"), str)
                                    else "allocation")  # fmt: skip
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def compressed_bytes(pattern: Pattern | None, shape3: tuple[int, int, int], nonzeros: int, element_size: int) -> int:
    """Bytes to store a pruned weight in the natural format of its pattern (never above dense).

    element: a bitmask plus the surviving values; N:M: values plus ceil(log2 M) index bits
    each; block: one bit per block plus surviving blocks; channels: surviving values
    plus one bit per channel.
    """
    numel = math.prod(shape3)
    dense = numel * element_size
    values = nonzeros * element_size
    if isinstance(pattern, NM):
        estimate = values + math.ceil(nonzeros * math.ceil(math.log2(pattern.m)) / 8)
    elif isinstance(pattern, Block):
        estimate = values + math.ceil(numel / (pattern.height * pattern.width) / 8)
    elif isinstance(pattern, OutputChannel):
        estimate = values + math.ceil(shape3[0] / 8)
    elif isinstance(pattern, InputChannel):
        estimate = values + math.ceil(shape3[2] / 8)
    else:
        estimate = values + math.ceil(numel / 8)
    return min(dense, estimate)


def build_report(
    model: nn.Module,
    targets: Sequence[Target],
    pattern: Pattern | Mapping[str, Pattern] | None = None,
    example_inputs: Any = None,
    config: dict[str, Any] | None = None,
    details: RunDetails | None = None,
) -> Report:
    """Measure ``model`` as it is now. MACs and connectivity need ``example_inputs``. ``pattern`` is one
    pattern, or one per target name (per-glob overrides)."""
    masks = effective_masks(targets)
    macs = count_macs(model, example_inputs) if example_inputs is not None else None
    target_ids = {id(t.parameter) for t in targets}
    layers: list[LayerReport] = []
    for t in targets:
        keep = masks[t.name]
        nonzeros = int(torch.count_nonzero(keep))
        params = t.numel
        size = t.parameter.element_size()
        dense_macs = macs.per_module.get(t.module_name) if macs else None
        effective = round(dense_macs * nonzeros / params) if dense_macs is not None else None
        own = pattern.get(t.name) if isinstance(pattern, Mapping) else pattern
        needs_pattern = own is not None and not isinstance(own, Element)
        valid = own.is_valid(to_canonical(keep, t.layout)) if needs_pattern else None
        out_dim, in_dim = channel_dims(t.layout)
        layers.append(
            LayerReport(
                name=t.name,
                type=type(t.module).__name__.removeprefix("Parametrized"),
                shape=list(t.shape),
                params=params,
                nonzeros=nonzeros,
                sparsity=1 - nonzeros / params,
                pattern_valid=valid,
                collapsed=nonzeros == 0,
                dead_outputs=_dead(keep, out_dim),
                dead_inputs=_dead(keep, in_dim),
                macs_dense=dense_macs,
                macs_effective=effective,
                bytes_dense=params * size,
                bytes_compressed=compressed_bytes(own, t.canonical_shape, nonzeros, size),
            )
        )
    other = [p for p in _unique_parameters(model) if id(p) not in target_ids]
    left_out = _left_out(model, target_ids)
    other_params = sum(p.numel() for p in other)
    other_bytes = sum(p.numel() * p.element_size() for p in other)
    target_params = sum(r.params for r in layers)
    target_nonzeros = sum(r.nonzeros for r in layers)
    other_nonzeros = sum(int((p != 0).sum()) for p in other)
    macs_effective = None
    if macs is not None:
        saved = sum((r.macs_dense or 0) - (r.macs_effective or 0) for r in layers)
        macs_effective = macs.total - saved
    return Report(
        layers=layers,
        params=target_params + other_params,
        nonzeros=target_nonzeros + other_nonzeros,
        target_params=target_params,
        target_nonzeros=target_nonzeros,
        macs_dense=macs.total if macs else None,
        macs_effective=macs_effective,
        bytes_dense=sum(r.bytes_dense for r in layers) + other_bytes,
        bytes_compressed=sum(r.bytes_compressed for r in layers) + other_bytes,
        connected=is_connected(model, example_inputs) if example_inputs is not None else None,
        config=config or {},
        details=details or RunDetails(),
        left_out=left_out,
    )


def _dead(keep: torch.Tensor, dim: int) -> int:
    """Channels along ``dim`` with no surviving weight."""
    others = tuple(d for d in range(keep.ndim) if d != dim)
    return int(keep.shape[dim] - torch.count_nonzero(keep.any(dim=others)))


def _left_out(model: nn.Module, target_ids: set[int], most: int = 5, share: float = 0.02) -> list[dict[str, Any]]:
    """The largest matrices (2-D and up) that were not targets and hold at least ``share`` of the model's
    parameters: what a report must name, so a sparsity over the targets is never read as the model's
    (fused 3-D expert weights of a mixture-of-experts, embeddings, a second stack of blocks)."""
    total = sum(p.numel() for p in _unique_parameters(model))
    seen: set[int] = set()
    found = []
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen or id(p) in target_ids or p.ndim < 2 or p.numel() < share * total:
                continue
            seen.add(id(p))
            name = f"{module_name}.{attr}" if module_name else attr
            found.append({"name": name, "params": p.numel(), "module": type(module).__name__})
    return sorted(found, key=lambda t: -t["params"])[:most]


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
