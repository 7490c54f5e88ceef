"""``allocation='sensitivity'`` without a profile: the front doors measure one on the model first.

``prune()``, ``Pruner``, ``prune_llm()`` and ``secateurs prune`` call :func:`measure_profile` after the
configuration and the calibration are checked and before the runner touches the model. It runs
:func:`~secateurs.analysis.sensitivity` on this very model with the run's method, calibration batches,
loss and example inputs, and the run's *resolved* options (pattern, scope, mode, solver, runner, blocks,
structural ...), so every cell prunes exactly as the run will; the targets follow the run: groups of
coupled channels for ``mode='remove'``, repeated blocks for ``runner='blocks'``, else weight tensors.
It returns the configuration with the measured profile in its allocation, which the report records
(``report.config['allocation_options']['profile']``) and ``out/profile.json`` keeps.

Why a front-door step and not part of the configuration: measuring needs the model and the data, while
a configuration resolves model-free (the CLI and recipes check it before loading anything); and the
analysis prunes inside trials through the runners, so it sits above them and below the front doors.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..allocation import Sensitivity
from ..config import PruneConfig
from ..errors import DataRequiredError
from ..pipeline import Data
from .cells import sensitivity
from .profile import DEFAULT_GRID

#: resolved fields of the run that say how a cell prunes (the others say how much, or act between steps)
_CELL_OPTIONS = ("pattern", "comparison", "scope", "mode", "solver", "solver_options", "runner", "blocks",
                 "iterations", "method_options", "max_batches", "seed", "structural")  # fmt: skip


def measures(config: PruneConfig) -> bool:
    """Whether ``config``'s allocation is a sensitivity profile still to be measured on the model."""
    return isinstance(config.allocation_, Sensitivity) and config.allocation_.profile is None


def measure_profile(model: nn.Module, config: PruneConfig, data: Data) -> PruneConfig:
    """``config`` with its sensitivity profile measured on ``model`` (``config`` itself when there is nothing
    to measure). The model comes back bit-identical, also when the analysis fails (every cell is a trial)."""
    if not measures(config):
        return config
    allocation: Sensitivity = config.allocation_  # type: ignore[assignment]
    targets = "groups" if config.application_.structural else "blocks" if config.runner_.name == "blocks" else "layers"
    local = allocation.measures_locally(config.runner_.name)
    metric = allocation.metric or "loss"
    budget = allocation.budget or {}
    _refuse_missing_data(data, local, metric, budget)
    profile = sensitivity(
        model,
        data.batches,
        method=config.method,
        sparsities=allocation.sparsities or DEFAULT_GRID,
        targets=targets,
        metric=metric,
        costs=("params", "macs", "latency") if "latency" in budget else ("params", "macs"),
        example_inputs=data.example_inputs,
        loss_fn=data.loss_fn,
        local=local,
        out=allocation.out,
        progress=data.show_progress,
        **_cell_options(config, targets, local),
    )
    return type(config)(
        **{**config.given(), "allocation": allocation.with_profile(profile), "allocation_options": None}
    )


def _cell_options(config: PruneConfig, targets: str, local: bool) -> dict[str, Any]:
    """The run's resolved options as :func:`sensitivity` takes them for ``targets``."""
    resolved = config.to_dict()
    options = {k: resolved[k] for k in _CELL_OPTIONS if resolved.get(k) is not None}
    if not isinstance(config.method, str):  # a criterion object carries its own options (to_dict lists them)
        options.pop("method_options", None)
    if targets == "groups":
        options.pop("mode")  # a group's cell removes (mode='remove') by itself
        # the cell's report times nothing (a latency budget's costs are timed by the analysis itself)
        options["structural"] = {**options.get("structural", {}), "latency": False}
    else:
        options["allocation"] = "uniform"  # a cell prunes its layer, or every layer of its block, to one sparsity:
        # what the profile's allocation then gives them (a method ranking globally by default would not)
    if local:
        options.pop("runner", None)  # the local cells run the block runner themselves
    return options


def _refuse_missing_data(data: Data, local: bool, metric: Any, budget: dict[str, Any]) -> None:
    if not data.batches and (local or not callable(metric)):
        what = "captures each block's inputs from" if local else f"scores metric {metric!r} on"
        raise DataRequiredError(
            f"allocation 'sensitivity' without a profile measures one first, and its analysis {what} the "
            "calibration batches: pass calibration=..., or allocation_options={'profile': ...}"
        )
    if "macs" in budget and data.example_inputs is None:
        raise DataRequiredError(
            "a macs budget needs the MACs of every cell: pass example_inputs= (or calibration=), or a profile"
        )
