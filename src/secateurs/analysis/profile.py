"""A sensitivity profile: what each analysed target costs and loses at each sparsity.

Plain data (no torch), so the allocation that reads it (``allocation='sensitivity'``) sits low in
the package and a profile can be written on one machine and read on another. It saves as JSON
(:meth:`SensitivityProfile.save`, atomic, refuses to overwrite unless asked) and CSV, prints as a
ranked table, and turns into the options of the knapsack (:meth:`SensitivityProfile.options`).

Costs are whole-model figures measured with only that target pruned (parameters left, MACs, and
latency as a ratio to the dense model, timed alternately with it), so each option's cost is its
change from dense. Under masks those changes add up exactly; under channel removal neighbouring
groups share weights (a conv loses input *and* output channels) and measured latency is not quite
additive, which is why the budget-fitting helper re-measures the solved model
(:func:`secateurs.analysis.fit_budget`).
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import write_text
from .knapsack import Option

FORMAT = "secateurs-sensitivity/1"
BUDGETS = ("sparsity", "params", "macs", "latency")
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
METRICS = ("loss", "perplexity", "accuracy")


def check_grid(sparsities: Iterable[float], name: str = "sparsities") -> list[float]:
    """The analysis grid, sorted and deduplicated; refused when empty or outside (0, 1). Checked here, below the
    allocation, so ``allocation='sensitivity'`` refuses a bad grid when the configuration resolves (no model)."""
    grid = list(sparsities) if isinstance(sparsities, Iterable) and not isinstance(sparsities, (str, bytes)) else None
    if not grid:
        raise ConfigError(
            f"sensitivity needs a non-empty grid of sparsities, e.g. {name}=(0.1, 0.3, 0.5, 0.7, 0.9); "
            f"got {sparsities!r}"
        )
    for s in grid:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
            raise ConfigError(f"sparsity {s!r} in the grid is outside (0, 1) ({name}); dense (0) is always measured")
    return sorted({round(float(s), 9) for s in grid})


def check_metric(metric: Any, name: str = "metric") -> None:
    """A metric name of the analysis or a ``callable(model) -> float``."""
    if not callable(metric) and metric not in METRICS:
        raise ConfigError(f"{name} must be one of {', '.join(METRICS)} or a callable(model) -> float, got {metric!r}")


class ProfileMismatchError(ConfigError):
    """The profile was measured on another model (or another scope): names or shapes differ."""


@dataclass
class Entry:
    """One analysed target: a layer, a repeated block, or a group of coupled channels."""

    name: str  # module name (a group: the layer producing its channels)
    kind: str  # 'layer' | 'block' | 'group'
    shapes: dict[str, list[int]]  # weight (or group) name -> shape, to recognise the model
    numel: int  # prunable weights (a group: its units)


@dataclass
class Cell:
    """The measurement of one target at one sparsity (the others dense)."""

    target: str
    sparsity: float
    metric: float
    params: int | None = None  # whole-model parameters left (nonzero)
    macs: int | None = None  # whole-model MACs (masks: dense MACs less the pruned layers' share)
    latency: float | None = None  # whole-model latency / dense latency (median of paired runs)
    seconds: float = 0.0

    @property
    def key(self) -> tuple[str, float]:
        return (self.target, round(self.sparsity, 9))


@dataclass
class SensitivityProfile:
    """Per-target curves of a metric against sparsity, with their costs; the dense values for reference."""

    model: str
    metric: str
    higher_is_better: bool
    baseline: float  # the metric of the dense model
    grid: list[float]
    entries: list[Entry]
    cells: list[Cell] = field(default_factory=list)
    dense: dict[str, float] = field(default_factory=dict)  # params, macs, latency_s of the dense model
    settings: dict[str, Any] = field(default_factory=dict)  # method, mode, pattern ... as analysed

    # -- lookups -----------------------------------------------------------------------------------
    def cell(self, target: str, sparsity: float) -> Cell | None:
        return self._index().get((target, round(sparsity, 9)))

    def _index(self) -> dict[tuple[str, float], Cell]:
        return {c.key: c for c in self.cells}

    def damage(self, cell: Cell) -> float:
        """How much worse than dense the metric is in ``cell`` (positive = worse)."""
        return self.baseline - cell.metric if self.higher_is_better else cell.metric - self.baseline

    def curve(self, target: str) -> list[tuple[float, float]]:
        """(sparsity, metric) of one target, dense first."""
        index = self._index()
        points = [(0.0, self.baseline)]
        points += [(s, index[(target, round(s, 9))].metric) for s in self.grid if (target, round(s, 9)) in index]
        return points

    def missing(self) -> list[tuple[str, float]]:
        index = self._index()
        return [(e.name, s) for e in self.entries for s in self.grid if (e.name, round(s, 9)) not in index]

    def ranked(self) -> list[tuple[Entry, float]]:
        """Entries, most sensitive first, by their mean damage over the grid."""
        index = self._index()
        out = []
        for e in self.entries:
            cells = [index[(e.name, round(s, 9))] for s in self.grid if (e.name, round(s, 9)) in index]
            out.append((e, math.fsum(self.damage(c) for c in cells) / len(cells) if cells else float("nan")))
        return sorted(out, key=lambda pair: (-pair[1] if math.isfinite(pair[1]) else math.inf, pair[0].name))

    # -- checks ------------------------------------------------------------------------------------
    def covering(self, name: str) -> Entry | None:
        """The entry whose module is ``name`` or holds it (a block holds its layers)."""
        holding = [e for e in self.entries if name == e.name or name.startswith(e.name + ".") or e.name == ""]
        return max(holding, key=lambda e: (e.name == name, len(e.name)), default=None)

    def check_targets(self, targets: Sequence[Any]) -> dict[str, Entry]:
        """Each target (``name``, ``module_name``, ``shape``) -> its entry; refuses the first mismatch."""
        found: dict[str, Entry] = {}
        for t in targets:
            entry = self.covering(t.module_name)
            if entry is None:
                raise ProfileMismatchError(
                    f"the sensitivity profile (of a {self.model}) has no entry for {t.module_name!r}; its entries are "
                    f"{', '.join(e.name for e in self.entries[:8])}{' ...' if len(self.entries) > 8 else ''}. "
                    "Analyse this model (secateurs.analysis.sensitivity) or narrow the scope to the profiled layers"
                )
            shape = entry.shapes.get(t.name)
            if shape is None or list(t.shape)[: len(shape)] != list(shape):
                raise ProfileMismatchError(
                    f"the sensitivity profile does not fit this model: {t.name!r} has shape {list(t.shape)}, the "
                    f"profile {'has no such weight' if shape is None else f'recorded {shape}'} (entry {entry.name!r})"
                )
            found[t.name] = entry
        used = {e.name for e in found.values()}
        unused = [e.name for e in self.entries if e.name not in used]
        if unused:
            raise ProfileMismatchError(
                f"the sensitivity profile's entry {unused[0]!r} matches no target of this run; the profile was "
                "measured on another model or scope"
            )
        return found

    def check_model(self, model: Any) -> None:
        """Refuse a model whose weights differ in names or shapes from the profiled ones."""
        modules = dict(model.named_modules())
        for e in self.entries:
            if e.kind == "group":
                continue  # a group's units are checked against the traced graph by the allocation
            for name, shape in e.shapes.items():
                module_name, _, param = name.rpartition(".")
                module = modules.get(module_name)
                tensor = getattr(module, param, None) if module is not None else None
                if tensor is None:
                    raise ProfileMismatchError(f"the profiled weight {name!r} is not in this model")
                if list(tensor.shape) != list(shape):
                    raise ProfileMismatchError(
                        f"the profiled weight {name!r} had shape {list(shape)}; this model's is {list(tensor.shape)}"
                    )

    # -- the knapsack's options ------------------------------------------------------------------------
    def options(self, budget: str, entries: Sequence[Entry] | None = None) -> list[list[tuple[float, Option]]]:
        """Per entry: (sparsity, Option) for dense and every measured grid point. The cost of the
        'sparsity' budget is weights kept; the others are the whole-model change from dense."""
        if budget not in BUDGETS:
            raise ConfigError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
        index = self._index()
        out = []
        for e in entries if entries is not None else self.entries:
            opts = [(0.0, Option(float(e.numel) if budget == "sparsity" else 0.0, 0.0))]
            worst = 0.0
            for s in self.grid:
                cell = index.get((e.name, round(s, 9)))
                if cell is None:
                    raise ConfigError(f"the profile has no measurement of {e.name!r} at sparsity {s:g}; finish it")
                # the damage curve is made non-decreasing (its running maximum, from 0 at dense): pruning more
                # of a layer does not truly help, so a dip below is noise, and the solver must never prune
                # beyond the budget to chase it (the unspent remainder then always goes back, see budget.py)
                worst = max(worst, self.damage(cell))
                opts.append((s, Option(self._cost(e, cell, budget), worst)))
            out.append(opts)
        return out

    def _cost(self, entry: Entry, cell: Cell, budget: str) -> float:
        if budget == "sparsity":
            return entry.numel * (1.0 - cell.sparsity)
        value = {"params": cell.params, "macs": cell.macs, "latency": cell.latency}[budget]
        if value is None:
            raise ConfigError(
                f"the profile has no {budget} measurement (cell {cell.target!r} at {cell.sparsity:g}); analyse with "
                f"costs including {budget!r}"
            )
        return float(value) - (1.0 if budget == "latency" else float(self.dense[budget]))

    # -- output ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityProfile:
        if data.get("format") != FORMAT:
            raise ConfigError(f"not a secateurs sensitivity profile (format {data.get('format')!r}, want {FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["entries"] = [Entry(**e) for e in fields["entries"]]
        fields["cells"] = [Cell(**c) for c in fields.get("cells", [])]
        return cls(**fields)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """JSON (``.json``) or CSV of the cells (``.csv``), written atomically."""
        text = self.to_csv() if str(path).endswith(".csv") else json.dumps(self.to_dict(), indent=1) + "\n"
        return write_text(path, text, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityProfile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read the sensitivity profile {str(path)!r}: {e}") from e
        return cls.from_dict(data)

    def to_csv(self) -> str:
        out = _io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["target", "kind", "sparsity", self.metric, "damage", "params", "macs", "latency_ratio"])
        kinds = {e.name: e.kind for e in self.entries}
        for c in sorted(self.cells, key=lambda c: (c.target, c.sparsity)):
            writer.writerow(
                [c.target, kinds.get(c.target, ""), c.sparsity, c.metric, self.damage(c), c.params, c.macs, c.latency]
            )
        return out.getvalue()

    def table(self, top: int | None = None) -> str:
        """Targets ranked most sensitive first: the metric at each grid sparsity."""
        rows = self.ranked()[:top] if top else self.ranked()
        width = max([len(e.name) for e, _ in rows] + [6])
        head = f"{'target':<{width}}  {'mean damage':>11}  " + "  ".join(f"{s:>7.0%}" for s in self.grid)
        lines = [f"{self.metric} of the dense model: {self.baseline:.4g}", head, "-" * len(head)]
        index = self._index()
        for e, mean in rows:
            values = []
            for s in self.grid:
                c = index.get((e.name, round(s, 9)))
                values.append(f"{c.metric:>7.4g}" if c is not None else f"{'-':>7}")
            lines.append(f"{e.name:<{width}}  {mean:>11.4g}  " + "  ".join(values))
        return "\n".join(lines)


def merged_cells(cells: Iterable[Cell]) -> list[Cell]:
    """One cell per (target, sparsity), the last one kept (a resumed run may repeat one)."""
    return list({c.key: c for c in cells}.values())
