"""LLMPruneConfig: every argument of a layerwise LLM pruning run, validated once.

Its own dataclass rather than more fields on :class:`~secateurs.PruneConfig`: a layerwise
run has knobs a generic run does not (calibration segments, the block container, OWL,
SparseGPT's solver options), SparseGPT is a solver rather than a criterion, and most
generic options (schedules, global allocation, channel patterns) have no meaning here.
It behaves the same way: ``prune_llm()``, recipe files and ``secateurs prune --calib``
build one, unknown keys are refused with the valid ones, and ``to_dict()`` round-trips.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..calibration import positive_int
from ..config import RecipeConfig, check_sparsity
from ..errors import ConfigError, choices
from ..patterns import NM, Element, Pattern, parse_pattern
from ..scope import ScopeSpec
from .methods import METHODS, LayerwiseMethod, make_method
from .owl import DEFAULT_LAMBDA, DEFAULT_M, check_lambda

ALLOCATIONS = ("uniform", "owl")
#: structured methods of the structural module, run on the same calibration segments
STRUCTURAL_METHODS = ("flap", "shortgpt")
STRUCTURAL_ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class LLMPruneConfig(RecipeConfig):
    """Arguments of :func:`secateurs.llm.prune_llm`.

    Args:
        method: ``'magnitude'``, ``'wanda'`` or ``'sparsegpt'`` (layerwise, unstructured or N:M);
            ``'flap'`` (remove heads and MLP neurons) or ``'shortgpt'`` (remove whole blocks),
            which run the structural module's removal on the same calibration segments.
        sparsity: fraction of each block's weights to remove, in [0, 1); implied by N:M. For
            ``flap`` the fraction of head and neuron parameters, for ``shortgpt`` of the blocks.
        pattern: ``'element'`` (unstructured) or ``'N:M'`` such as ``'2:4'``.
        allocation: ``'uniform'`` (every block at ``sparsity``) or ``'owl'`` (outlier-weighted);
            for ``flap`` ``'global'`` (its adaptive ranking, the default) or ``'uniform'``.
        owl_m: OWL's outlier threshold M (a score above M x the mean is an outlier).
        owl_lambda: OWL's lambda: block sparsities range over ``sparsity +- lambda``.
        nsamples: calibration segments (the literature's 128).
        seqlen: tokens per segment; None: 2048 capped to the model's context.
        batch_size: segments per forward pass.
        seed: picks the calibration segments.
        blocks: qualified name of the container of repeated blocks; None: found automatically.
        scope: which layers inside the blocks: a :class:`ScopeSpec`, a dict of its fields, or
            a list of include globs (module names such as ``'*.mlp.*'``).
        method_options: SparseGPT's ``blocksize`` (128), ``dampening`` (0.01), ``max_retries`` (5).
    """

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | Mapping | Pattern = "element"
    allocation: str | None = None
    owl_m: float = DEFAULT_M
    owl_lambda: float = DEFAULT_LAMBDA
    nsamples: int = 128
    seqlen: int | None = None
    batch_size: int = 1
    seed: int = 0
    blocks: str | None = None
    scope: ScopeSpec | Mapping | list | str | None = None
    method_options: Mapping[str, Any] | None = None
    # resolved views
    method_: LayerwiseMethod | None = field(init=False, repr=False, compare=False)  # None: FLAP, ShortGPT
    pattern_: Pattern = field(init=False, repr=False, compare=False)
    scope_: ScopeSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS and self.method not in STRUCTURAL_METHODS:
            valid = choices((*METHODS, *STRUCTURAL_METHODS))
            raise ConfigError(f"unknown LLM pruning method {self.method!r}; valid: {valid}")
        positive_int("nsamples", self.nsamples)
        positive_int("seqlen", self.seqlen, allow_none=True)
        positive_int("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise ConfigError(f"blocks must be a module name such as 'model.layers', got {self.blocks!r}")
        if self.method in STRUCTURAL_METHODS:
            self._init_structural()
            return
        method = make_method(self.method, dict(self.method_options or {}))
        pattern = parse_pattern(self.pattern)
        if not isinstance(pattern, (Element, NM)):
            raise ConfigError(
                f"layerwise LLM pruning takes pattern 'element' or N:M (e.g. '2:4'), not {pattern.spec()!r}; "
                "structured removal is the structural module's job"
            )
        sparsity = self._check_sparsity(pattern)
        object.__setattr__(self, "allocation", self.allocation or "uniform")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; valid: {choices(ALLOCATIONS)}")
        if self.allocation == "owl":
            if isinstance(pattern, NM):
                raise ConfigError("OWL varies sparsity per block, but N:M fixes it; use allocation='uniform' with N:M")
            if not isinstance(self.owl_m, (int, float)) or not self.owl_m > 0:
                raise ConfigError(f"owl_m must be positive, got {self.owl_m!r} (the paper uses 5)")
            check_lambda(float(self.owl_lambda), sparsity)
        scope = ScopeSpec.from_value(self.scope)
        scope = replace(scope, skip_first=False, skip_last=False, types=("Linear", "Conv1D"), embeddings=False)
        set_ = object.__setattr__
        set_(self, "sparsity", sparsity)
        set_(self, "method_", method)
        set_(self, "pattern_", pattern)
        set_(self, "scope_", scope)

    def _init_structural(self) -> None:
        """FLAP / ShortGPT: removal by the structural module; only the shared keys apply."""
        pattern = parse_pattern(self.pattern)
        if not isinstance(pattern, Element):
            raise ConfigError(f"{self.method} removes whole structures; drop pattern={pattern.spec()!r}")
        allocation = self.allocation or ("global" if self.method == "flap" else "uniform")
        allowed = STRUCTURAL_ALLOCATIONS if self.method == "flap" else ("uniform",)
        if allocation not in allowed:
            raise ConfigError(f"{self.method} takes allocation {choices(allowed)}, not {allocation!r}")
        if self.method_options:
            raise ConfigError(f"{self.method} takes no method_options here (see docs/structural.md for its API)")
        sparsity = self._check_sparsity(pattern)
        if not sparsity > 0:
            raise ConfigError(f"{self.method} needs a sparsity above 0, got {sparsity}")
        set_ = object.__setattr__
        set_(self, "sparsity", sparsity)
        set_(self, "allocation", allocation)
        set_(self, "method_", None)
        set_(self, "pattern_", pattern)
        set_(self, "scope_", ScopeSpec.from_value(self.scope))

    @property
    def structural(self) -> bool:
        return self.method in STRUCTURAL_METHODS

    def _check_sparsity(self, pattern: Pattern) -> float:
        return float(check_sparsity(self.sparsity, pattern, required=True))  # type: ignore[arg-type]

    @property
    def needs_calibration(self) -> bool:
        if self.method_ is None:  # FLAP and ShortGPT measure activations
            return True
        return self.method_.needs.value != "nothing" or self.allocation == "owl"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a valid recipe) that rebuilds this config."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "pattern": self.pattern_.spec(),
            "allocation": self.allocation,
            "owl_m": self.owl_m,
            "owl_lambda": self.owl_lambda,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "blocks": self.blocks,
            "scope": {k: v for k, v in self.scope_.to_dict().items() if k in ("include", "exclude")},
            "method_options": dict(self.method_options) if self.method_options else None,
        }
