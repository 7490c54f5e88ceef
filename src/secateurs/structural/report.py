"""What a structural prune bought: units per group, parameters, MACs and latency before and after."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..evaluation import count_macs, measure_latency
from ..report import JsonReport


@dataclass
class GroupChange:
    name: str
    kind: str
    units_before: int
    units_after: int
    modules: int  # modules the group spans


@dataclass
class Measure:
    params: int
    macs: int | None = None
    latency_s: float | None = None


def measure(model: nn.Module, example_inputs: Any, latency: bool = True) -> Measure:
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if example_inputs is None:
        return Measure(params)
    macs = count_macs(model, example_inputs).total
    return Measure(params, macs, measure_latency(model, example_inputs) if latency else None)


@dataclass
class StructuralReport(JsonReport):
    groups: list[GroupChange]
    before: Measure
    after: Measure
    seconds: float  # wall time of scoring, selection and surgery
    removed_blocks: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, int] = field(default_factory=dict)  # what the LLM front door calibrated on

    @property
    def params_ratio(self) -> float:
        return self.after.params / max(self.before.params, 1)

    @property
    def macs_reduction(self) -> float | None:
        if not self.before.macs or not self.after.macs:
            return None
        return self.before.macs / self.after.macs

    @property
    def speedup(self) -> float | None:
        if not self.before.latency_s or not self.after.latency_s:
            return None
        return self.before.latency_s / self.after.latency_s

    @property
    def latency_efficiency(self) -> float | None:
        """Measured speed-up / MACs reduction: 1.0 means the saved compute became saved time."""
        s, m = self.speedup, self.macs_reduction
        return None if s is None or m is None or m <= 1.0 else s / m

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            params_ratio=self.params_ratio,
            macs_reduction=self.macs_reduction,
            speedup=self.speedup,
            latency_efficiency=self.latency_efficiency,
        )
        return data

    def table(self) -> str:
        head = f"{'group':<40} {'kind':<8} {'units':>14} {'modules':>8}"
        lines = [head, "-" * len(head)]
        for g in self.groups:
            if g.units_after != g.units_before:
                units = f"{g.units_before} -> {g.units_after}"
                lines.append(f"{g.name[-40:]:<40} {g.kind:<8} {units:>14} {g.modules:>8}")
        untouched = sum(g.units_after == g.units_before for g in self.groups)
        if untouched:
            lines.append(f"({untouched} group(s) unchanged)")
        for block in self.removed_blocks:
            lines.append(f"removed block {block}")
        lines.append("-" * len(head))
        b, a = self.before, self.after
        lines.append(f"params: {b.params:,} -> {a.params:,} ({self.params_ratio:.1%} remain)")
        if self.macs_reduction:
            lines.append(f"MACs: {b.macs:,} -> {a.macs:,} ({self.macs_reduction:.2f}x fewer)")
        if self.speedup:
            lines.append(
                f"latency: {b.latency_s * 1e3:.2f} ms -> {a.latency_s * 1e3:.2f} ms ({self.speedup:.2f}x faster; "
                f"efficiency {self.latency_efficiency or 0:.2f} of the MACs reduction)"
            )
        lines.append(f"pruning took {self.seconds:.2f} s")
        if "seqlen" in self.calibration:
            lines.append(f"calibration: {self.calibration['nsamples']} x {self.calibration['seqlen']} tokens")
        return "\n".join(lines)
