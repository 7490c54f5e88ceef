"""What a structural prune bought: units per group, parameters, MACs and latency before and after.

Latency on a shared CPU is noisy: a burst of load during one measurement turned into "227x faster"
in an earlier version. So the dense model is copied before surgery and timed *alternately* with
the pruned one, the speed-up is the median of the per-pair ratios, the report gives the spread and
the thread count, and it warns when the spread is large or the speed-up exceeds the MACs reduction
by more than 20% (removal cannot make the remaining work cheaper per MAC, so that is noise).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..evaluation import LatencyComparison, Spread, compare_latency, count_macs, measure_latency
from ..report import JsonReport

#: warn when the middle half of the paired speed-ups spans more than this fraction of their median
NOISY_SPREAD = 0.2
#: warn when speed-up / MACs reduction exceeds this: the saved compute cannot save more than its time
IMPLAUSIBLE_EFFICIENCY = 1.2


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
    latency_s: float | None = None  # median; the spread is in StructuralReport.latency


def measure(model: nn.Module, example_inputs: Any) -> Measure:
    """Parameters and (with inputs) MACs; latency is timed by :class:`LatencyTwin`, dense against pruned."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if example_inputs is None:
        return Measure(params)
    return Measure(params, count_macs(model, example_inputs).total)


class LatencyTwin:
    """A copy of the dense model, taken just before surgery, to time against the pruned model in
    alternation. It holds a second copy of the weights until :meth:`compare` (the ``latency``
    option turns it off for models near the memory limit)."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.inputs = example_inputs
        self.dense: nn.Module | None = None
        self.sequential: Spread | None = None
        self.note = ""
        try:
            self.dense = copy.deepcopy(model)
        except Exception as exc:  # user modules can refuse deepcopy in many ways; time the dense model now instead
            self.sequential = measure_latency(model, example_inputs)
            self.note = f"not interleaved: the model could not be copied ({type(exc).__name__}: {exc})"

    def compare(self, pruned: nn.Module) -> LatencyComparison:
        if self.dense is None:
            import torch

            after = measure_latency(pruned, self.inputs)
            dense = self.sequential or after
            ratio = Spread.of([dense.median / after.median])
            return LatencyComparison(dense, after, ratio, torch.get_num_threads(), interleaved=False, note=self.note)
        try:
            return compare_latency(self.dense, pruned, self.inputs)
        finally:
            self.dense = None  # free the copy


@dataclass
class StructuralReport(JsonReport):
    groups: list[GroupChange]
    before: Measure
    after: Measure
    seconds: float  # wall time of scoring, selection and surgery
    removed_blocks: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, int] = field(default_factory=dict)  # what the LLM front door calibrated on
    latency: LatencyComparison | None = None

    def __post_init__(self) -> None:
        if self.latency is not None:
            self.before.latency_s = self.latency.dense_s.median
            self.after.latency_s = self.latency.pruned_s.median

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
        """Median of the paired dense/pruned time ratios."""
        return None if self.latency is None else self.latency.speedup.median

    @property
    def latency_efficiency(self) -> float | None:
        """Measured speed-up / MACs reduction: 1.0 means the saved compute became saved time."""
        s, m = self.speedup, self.macs_reduction
        return None if s is None or m is None or m <= 1.0 else s / m

    @property
    def latency_warnings(self) -> list[str]:
        """Why the latency figures should not be taken as fact, if they should not."""
        if self.latency is None:
            return []
        warnings = []
        spread = self.latency.speedup
        if spread.relative_iqr > NOISY_SPREAD:
            warnings.append(
                f"latency is noisy here: the middle half of the paired speed-ups spans {spread.q1:.2f}-"
                f"{spread.q3:.2f}x ({spread.relative_iqr:.0%} of the median); the machine is probably busy: rerun when "
                "it is idle" + (", or with fewer threads (--threads 1)" if self.latency.threads > 1 else "")
            )
        efficiency = self.latency_efficiency
        if efficiency is not None and efficiency > IMPLAUSIBLE_EFFICIENCY:
            warnings.append(
                f"a speed-up {efficiency:.2f}x the MACs reduction is implausible (removal does not make the remaining "
                "work cheaper); treat the latency as noise and measure again"
            )
        if not self.latency.interleaved:
            warnings.append(f"dense and pruned were timed one after the other, {self.latency.note}")
        return warnings

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            params_ratio=self.params_ratio,
            macs_reduction=self.macs_reduction,
            speedup=self.speedup,
            latency_efficiency=self.latency_efficiency,
            latency_warnings=self.latency_warnings,
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
        if self.latency is not None:
            lines += _latency_lines(self.latency, self.latency_efficiency)
            lines += [f"WARNING: {w}" for w in self.latency_warnings]
        lines.append(f"pruning took {self.seconds:.2f} s")
        if "seqlen" in self.calibration:
            lines.append(f"calibration: {self.calibration['nsamples']} x {self.calibration['seqlen']} tokens")
        return "\n".join(lines)


def _ms(spread: Spread) -> str:
    return f"{spread.median * 1e3:.2f} ms (IQR {spread.q1 * 1e3:.2f}-{spread.q3 * 1e3:.2f})"


def _latency_lines(latency: LatencyComparison, efficiency: float | None) -> list[str]:
    how = "alternating" if latency.interleaved else "one after the other"
    s = latency.speedup
    lines = [
        f"latency: median of {latency.dense_s.n} runs each, {how}, {latency.threads} thread(s): "
        f"{_ms(latency.dense_s)} -> {_ms(latency.pruned_s)}",
        f"speed-up {s.median:.2f}x (IQR {s.q1:.2f}-{s.q3:.2f}x, range {s.low:.2f}-{s.high:.2f}x)"
        + (f"; efficiency {efficiency:.2f} of the MACs reduction" if efficiency is not None else ""),
    ]
    return lines
