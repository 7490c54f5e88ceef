"""``secateurs.methods()``: every registered method of every role, with what it needs and where it runs.

Read from the registries at call time, so a criterion, solver or allocation registered by user code
is listed exactly like a built-in one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .allocation import ALLOCATIONS
from .application import APPLICATIONS
from .criteria import CRITERIA
from .errors import ConfigError, choices
from .granularity import GRANULARITY_NAMES
from .patterns import PATTERNS
from .registry import summary_of
from .runner import RUNNERS
from .schedules import SCHEDULES
from .solvers import SOLVERS
from .structural import HANDLERS
from .training import REGULARIZERS

ROLES = ("criterion", "solver", "allocation", "pattern", "granularity", "mode", "runner", "schedule",
         "regularizer", "handler")  # fmt: skip
_GRANULARITIES = {
    "channel": "Neurons, filters and channels, with every tensor they are coupled to",
    "head": "Attention heads (grouped-query attention: whole KV groups or query heads evenly)",
    "hidden": "The hidden (residual, embedding) dimension of a transformer",
    "layer": "Whole blocks of the repeated stack",
}


@dataclass(frozen=True)
class MethodInfo:
    role: str
    name: str
    summary: str = ""
    needs: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    runners: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _runners(needs: frozenset, modes: tuple[str, ...], all_targets: bool = False) -> tuple[str, ...]:
    out = []
    for name, cls in RUNNERS.items():
        if needs <= cls.needs and set(modes) & set(cls.modes) and (cls.sees_all_targets or not all_targets):
            out.append(name)
    return tuple(out)


def _needs(needs: frozenset) -> tuple[str, ...]:
    return tuple(sorted(n.value for n in needs))


def _criteria() -> list[MethodInfo]:
    out = []
    for name, cls in CRITERIA.items():
        defaults = {"allocation": cls.default_allocation, "comparison": cls.default_comparison}
        for key in ("default_mode", "default_solver", "default_pattern"):
            if getattr(cls, key) is not None:
                defaults[key.removeprefix("default_")] = getattr(cls, key)
        if cls.default_iterations != 1:
            defaults["iterations"] = cls.default_iterations
        out.append(MethodInfo("criterion", name, summary_of(cls), _needs(cls.needs), tuple(cls.modes),
                              _runners(cls.needs, cls.modes), defaults))  # fmt: skip
    return out


def _others() -> list[MethodInfo]:
    element_modes = tuple(n for n, a in APPLICATIONS.items() if not a.structural)
    every_mode = tuple(APPLICATIONS.names())
    out = [
        MethodInfo("solver", n, summary_of(c), _needs(c.needs), c.modes, _runners(c.needs, c.modes))
        for n, c in SOLVERS.items()
    ]
    for n, c in ALLOCATIONS.items():
        modes = every_mode if c.sizes_groups else element_modes
        out.append(MethodInfo("allocation", n, summary_of(c), _needs(c.needs), modes,
                              _runners(c.needs, modes, c.needs_single_group)))  # fmt: skip
    out.append(MethodInfo("allocation", "{glob: sparsity}", "Explicit per-target sparsities by module-name glob",
                          (), every_mode, tuple(RUNNERS.names())))  # fmt: skip
    out += [MethodInfo("pattern", n, summary_of(c), modes=element_modes, runners=tuple(RUNNERS.names()))
            for n, c in PATTERNS.items()]  # fmt: skip
    out += [MethodInfo("granularity", n, _GRANULARITIES[n], modes=("remove",), runners=("model",))
            for n in GRANULARITY_NAMES]  # fmt: skip
    out += [MethodInfo("mode", n, summary_of(c), runners=tuple(r for r, rc in RUNNERS.items() if n in rc.modes))
            for n, c in APPLICATIONS.items()]  # fmt: skip
    out += [MethodInfo("runner", n, summary_of(c), _needs(c.needs), c.modes) for n, c in RUNNERS.items()]
    out += [MethodInfo("schedule", n, summary_of(c)) for n, c in SCHEDULES.items()]
    out += [MethodInfo("regularizer", n, summary_of(c)) for n, c in REGULARIZERS.items()]
    out += [MethodInfo("handler", n, summary_of(h), modes=("remove",)) for n, h in HANDLERS.items()]
    return out


def methods(role: str | None = None) -> list[MethodInfo]:
    """Every registered method (or those of one ``role``), with its needs, modes and runners."""
    if role is not None and role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; valid: {choices(ROLES)}")
    found = _criteria() + _others()
    return [m for m in found if role is None or m.role == role]


def table(infos: list[MethodInfo]) -> str:
    """A terminal table of :func:`methods`."""
    rows = [("role", "name", "needs", "modes", "runners", "what")]
    for m in infos:
        rows.append((m.role, m.name, ",".join(m.needs) or "-", ",".join(m.modes) or "-", ",".join(m.runners) or "-",
                     m.summary[:70]))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row[:5])) + "  " + row[5])
        if i == 0:
            lines.append("-" * min(len(lines[0]) + 20, 160))
    return "\n".join(lines)
