"""Application modes: what happens to the units a selection chose, one class per mode.

- ``mask``: a parametrization multiplies by the mask at forward time (reversible);
- ``bake``: the zeros are written into the weights, state_dict keys unchanged;
- ``reconstruct``: a solver updates the surviving weights (SparseGPT's OBS update, bias
  compensation) and the pruned ones become +0.0;
- ``remove``: structural surgery through the dependency graph, registered by
  :mod:`secateurs.structural` (it works on groups of coupled channels, not on masks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .errors import ConfigError
from .evidence import Evidence
from .masking import attach, detach
from .patterns import Pattern
from .registry import Registry
from .report import LayerResult
from .scope import Target
from .solvers.base import Solver, SolveResult


class Application:
    """Base class of an application mode."""

    name: ClassVar[str]
    #: a solver may run in this mode
    takes_solver: ClassVar[bool] = False
    #: the mode cannot run without one
    requires_solver: ClassVar[bool] = False
    #: the solver used when neither the user nor the method names one
    default_solver: ClassVar[str | None] = None
    #: writes into the weights, so a failure must restore them from a copy
    writes_weights: ClassVar[bool] = False
    #: carried out by the structural pipeline on groups of channels (not on masks)
    structural: ClassVar[bool] = False
    #: rounds compose within one call (masks only ever prune what is alive); others apply once
    multi_round: ClassVar[bool] = False
    #: a solver rewrites the surviving weights (so it may also choose the mask as it goes: SparseGPT)
    updates_survivors: ClassVar[bool] = False

    def apply(
        self,
        targets: Sequence[Target],
        masks: Mapping[str, Tensor] | None,
        evidence: Evidence | None = None,
        solver: Solver | None = None,
        sparsities: Mapping[str, float] | None = None,
        pattern: Pattern | None = None,
    ) -> list[LayerResult]:
        raise NotImplementedError

    def finish(self, targets: Sequence[Target]) -> None:
        """End of the run (after every round): make the result what the mode promises."""


APPLICATIONS: Registry[type[Application]] = Registry("mode", base=Application)


@APPLICATIONS.register
class Remove(Application):
    """Structural: channels, heads, hidden dimensions or blocks removed for real; tensors shrink."""

    name = "remove"
    takes_solver = True
    structural = True  # the whole-model runner hands the run to secateurs.structural.pipeline


@APPLICATIONS.register
class Mask(Application):
    """Ephemeral: a parametrization multiplies by the mask; unmask() restores the dense weights."""

    name = "mask"
    multi_round = True

    def apply(self, targets, masks, evidence=None, solver=None, sparsities=None, pattern=None):
        for t in targets:
            attach(t, masks[t.name])
        return []


@APPLICATIONS.register
class Bake(Mask):
    """Permanent zeros in the weights; the state_dict keys are the original ones."""

    name = "bake"
    writes_weights = True

    def finish(self, targets: Sequence[Target]) -> None:
        # rounds compose as masks (each round only sees what is alive), then the zeros are written once
        for t in targets:
            detach(t, bake=True)


@APPLICATIONS.register
class Reconstruct(Application):
    """A solver updates the surviving weights (and biases); pruned weights become +0.0."""

    name = "reconstruct"
    takes_solver = True
    requires_solver = True
    updates_survivors = True
    default_solver = "sparsegpt"
    writes_weights = True

    def apply(self, targets, masks, evidence=None, solver=None, sparsities=None, pattern=None):
        if solver is None or evidence is None:
            raise ConfigError("mode='reconstruct' needs a solver and its evidence")
        results = solver.solve(targets, evidence, masks, sparsities, pattern)
        deltas = {t.name: _bias_deltas(t, results[t.name], solver) for t in targets}  # checked before any write
        out = []
        with torch.no_grad():
            for t in targets:
                result = results[t.name]
                parameter = t.parameter
                if result.weight is not None:
                    parameter.copy_(result.weight.to(parameter.device, parameter.dtype))
                parameter.masked_fill_(~result.keep.to(parameter.device, torch.bool), 0.0)
                for bias, delta in deltas[t.name]:
                    bias.add_(delta.to(bias.device, bias.dtype))
                info = result.info
                own = {k: v for k, v in info.items() if k not in ("loss", "dampening", "retries")}
                out.append(LayerResult(t.name, requested_sparsity(t, result.keep, sparsities), info.get("dampening"),
                                       int(info.get("retries", 0)), info.get("loss"), own))  # fmt: skip
        return out


def _bias_deltas(target: Target, result: SolveResult, solver: Solver) -> list[tuple[Tensor, Tensor]]:
    """``(bias, delta)`` for every holder of the weight a solver corrects: a tied weight's holders see different
    inputs, so each needs its own delta, and each must have a bias to take it."""
    if result.bias_delta is None and not result.tied_bias_deltas:
        return []
    given = {target.module_name: result.bias_delta, **result.tied_bias_deltas}
    pairs = []
    for holder, module, _ in target.users:
        delta = given.get(holder)
        if delta is None:
            raise ConfigError(
                f"solver {solver.name!r} corrected some holders of the tied weight {target.name} but not {holder!r}, "
                "which sees other inputs; a solver returns one bias delta per holder (SolveResult.tied_bias_deltas), "
                "or exclude the weight from the scope"
            )
        bias = getattr(module, "bias", None)
        if not isinstance(bias, Tensor):
            raise ConfigError(
                f"solver {solver.name!r} corrects the bias of {holder!r}, which has none; exclude it from the scope"
            )
        pairs.append((bias, delta))
    return pairs


def requested_sparsity(target: Target, keep: Tensor, sparsities: Mapping[str, float] | None) -> float:
    """What a layer result reports as asked: the allocation's fraction when it sets one, else what the mask prunes."""
    return sparsities[target.name] if sparsities is not None else 1.0 - float(keep.float().mean())
