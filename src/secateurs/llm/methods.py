"""The per-block pruning step of each layerwise method.

Magnitude and Wanda are the library's own criteria (``criteria/magnitude.py``,
``criteria/activation.py``) fed with the statistics the runner gathered, and selected by
``engine.select_masks`` (exact per group, valid N:M); SparseGPT is the OBS solver in
``solvers/sparsegpt.py``. Each step writes its result into the weights (zeros stay zeros:
the bake / reconstruct application modes) and returns what it did per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import PruneConfig
from ..engine import select_masks
from ..errors import ConfigError, DataRequiredError, choices
from ..evidence import ActivationStats, Evidence
from ..layout import from_canonical, to_canonical
from ..masking import bake_target
from ..patterns import NM, Pattern
from ..scope import Target
from ..solvers.sparsegpt import InverseFactor, inverse_factor, sparsegpt
from .stats import BlockStats, Needs


@dataclass
class LayerResult:
    """What happened to one weight."""

    name: str
    sparsity: float  # requested for this layer
    dampening: float | None = None  # SparseGPT: the dampening that finally worked
    retries: int = 0  # SparseGPT: times the dampening had to be raised
    obs_loss: float | None = None  # SparseGPT: estimated added squared error


def evidence_from(stats: BlockStats, targets: list[Target]) -> Evidence:
    """An :class:`Evidence` whose activation statistics are the runner's input norms."""
    activations = {}
    for t in targets:
        sums = stats.norms.get(t.name)
        if sums is None:
            raise DataRequiredError(f"no calibration input reached {t.module_name!r}; is it used in the block?")
        zeros = torch.zeros(t.canonical_shape[0], dtype=torch.float64)
        activations[t.name] = ActivationStats(sums.sq_sum, zeros, zeros, sums.positions)
    return Evidence(model=targets[0].module, targets=targets, activations=activations)


class LayerwiseMethod:
    """One block's targets in, pruned weights out."""

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs.NOTHING
    options: ClassVar[dict[str, type]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            valid = choices(self.options) if self.options else "none"
            raise ConfigError(f"unknown method_options {sorted(unknown)} for {self.name!r}; valid: {valid}")
        self.settings = dict(options)

    def prune(
        self, targets: list[Target], stats: BlockStats, sparsity: float | None, pattern: Pattern
    ) -> list[LayerResult]:
        raise NotImplementedError


class CriterionMethod(LayerwiseMethod):
    """A registered criterion, the engine's exact selection, and baked zeros."""

    comparison: ClassVar[str]

    def prune(
        self, targets: list[Target], stats: BlockStats, sparsity: float | None, pattern: Pattern
    ) -> list[LayerResult]:
        config = PruneConfig(
            method=self.name,
            sparsity=None if isinstance(pattern, NM) else sparsity,
            pattern=pattern,
            comparison=self.comparison,
            allocation="uniform",
        )
        evidence = evidence_from(stats, targets) if self.needs is Needs.NORMS else Evidence(targets[0].module, targets)
        scores = config.criterion_.scores(evidence)
        masks = select_masks(targets, scores, config, config.sparsity)
        for t in targets:
            bake_target(t, masks[t.name])
        return [LayerResult(t.name, config.sparsity) for t in targets]


class MagnitudeMethod(CriterionMethod):
    """|w| ranked over the whole layer, as the magnitude baseline of the Wanda paper."""

    name = "magnitude"
    comparison = "layer"


class WandaMethod(CriterionMethod):
    """|W_ij| * ||X_j||_2 ranked within each output row (Sun et al. 2023, arXiv:2306.11695)."""

    name = "wanda"
    needs = Needs.NORMS
    comparison = "row"


class SparseGPTMethod(LayerwiseMethod):
    """OBS prune-and-reconstruct per layer (Frantar & Alistarh 2023, arXiv:2301.00774)."""

    name = "sparsegpt"
    needs = Needs.HESSIAN
    options: ClassVar[dict[str, type]] = {"blocksize": int, "dampening": float, "max_retries": int}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.blocksize = int(self.settings.get("blocksize", 128))
        self.dampening = float(self.settings.get("dampening", 0.01))
        self.max_retries = int(self.settings.get("max_retries", 5))
        if self.blocksize < 1 or not self.dampening > 0 or self.max_retries < 0:
            raise ConfigError(
                f"SparseGPT needs blocksize >= 1, dampening > 0 and max_retries >= 0; got "
                f"{self.blocksize}, {self.dampening}, {self.max_retries} (paper: 128, 0.01)"
            )

    def prune(
        self, targets: list[Target], stats: BlockStats, sparsity: float | None, pattern: Pattern
    ) -> list[LayerResult]:
        factors: dict[int, InverseFactor] = {}  # one inverse per distinct Hessian (q/k/v share)
        results = []
        nm = pattern if isinstance(pattern, NM) else None
        for t in targets:
            accumulator = stats.hessians.get(t.name)
            if accumulator is None:
                raise DataRequiredError(f"no calibration input reached {t.module_name!r}; is it used in the block?")
            key = id(accumulator)
            if key not in factors:
                factors[key] = inverse_factor(accumulator.hessian, self.dampening, self.max_retries)
            factor = factors[key]
            weight2 = to_canonical(t.parameter.detach(), t.layout).squeeze(1)
            new, keep, loss = sparsegpt(weight2, factor, None if nm else sparsity, nm, self.blocksize)
            with torch.no_grad():
                t.parameter.copy_(from_canonical(new.unsqueeze(1), t.layout, t.shape))
            bake_target(t, from_canonical(keep.unsqueeze(1), t.layout, t.shape))
            results.append(
                LayerResult(t.name, 1.0 - nm.density if nm else sparsity, factor.dampening, factor.retries, loss)
            )
        return results


METHODS: dict[str, type[LayerwiseMethod]] = {cls.name: cls for cls in (MagnitudeMethod, WandaMethod, SparseGPTMethod)}


def make_method(name: str, options: dict[str, Any] | None = None) -> LayerwiseMethod:
    if name not in METHODS:
        raise ConfigError(f"unknown LLM pruning method {name!r}; valid: {choices(METHODS)}")
    return METHODS[name](**(options or {}))
