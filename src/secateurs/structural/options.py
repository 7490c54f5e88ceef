"""What ``mode='remove'`` accepts: granularities and the ``structural`` options, validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError, choices

_ALIASES = {
    "channel": "channel", "channels": "channel", "output_channel": "channel", "neuron": "channel",
    "neurons": "channel", "filter": "channel", "filters": "channel",
    "head": "head", "heads": "head",
    "hidden": "hidden", "embedding": "hidden", "hidden_dim": "hidden",
    "layer": "layer", "layers": "layer", "block": "layer", "blocks": "layer",
}  # fmt: skip
GRANULARITY_NAMES = ("channel", "head", "hidden", "layer")
GQA_MODES = ("auto", "kv_groups", "query_heads")


@dataclass(frozen=True)
class Granularity:
    """What to remove: any of ``channel`` (neurons, filters), ``head``, ``hidden`` (the embedding /
    residual dimension), combined with ``+`` (``'head+channel'``), or ``layer`` (whole blocks)."""

    kinds: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.spec()

    def spec(self) -> str:
        return "+".join(self.kinds)

    def __repr__(self) -> str:
        return self.spec()


def parse_granularity(value: Any) -> Granularity:
    if value is None or isinstance(value, Granularity):
        return value or Granularity(("channel",))
    parts = value.replace(",", "+").split("+") if isinstance(value, str) else list(value)
    kinds = []
    for part in parts:
        key = str(part).strip().lower()
        if key not in _ALIASES:
            raise ConfigError(
                f"mode='remove' removes whole structures; pattern {value!r} is not one of "
                f"{choices(GRANULARITY_NAMES)} (combine with '+', e.g. 'head+channel')"
            )
        kinds.append(_ALIASES[key])
    kinds = list(dict.fromkeys(kinds))
    if "layer" in kinds and len(kinds) > 1:
        raise ConfigError("pattern 'layer' removes whole blocks and cannot be combined with other granularities")
    return Granularity(tuple(kinds))


@dataclass(frozen=True)
class StructuralOptions:
    """Options of ``mode='remove'`` (the ``structural`` key of a recipe).

    Args:
        round_to: channel and hidden counts that stay are rounded to a multiple of this
            (e.g. 8 for tensor cores / SIMD); the nearest multiple, never below one multiple.
        max_ratio: at most this fraction of any group is removed (per-layer cap).
        keep_at_least: every group keeps at least this many units (per KV group, for heads).
        gqa: attention with grouped KV heads: ``'kv_groups'`` removes whole KV groups with their
            query heads, ``'query_heads'`` removes query heads evenly inside every KV group;
            ``'auto'``: query heads when groups hold several, else whole groups (plain MHA).
        bias_compensation: add the mean contribution of removed inputs to the next bias
            (FLAP); None: the method's default.
        check: run the pruned model on the example inputs and restore it if that fails.
        latency: time a copy of the dense model against the pruned one, alternately, for the report
            (the copy holds a second set of weights during the prune: turn off near the memory limit).
        blocks: qualified name of the container of repeated blocks for ``pattern='layer'``
            (``'model.layers'``); None: found automatically.
    """

    round_to: int = 1
    max_ratio: float = 1.0
    keep_at_least: int = 1
    gqa: str = "auto"
    bias_compensation: bool | None = None
    check: bool = True
    latency: bool = True
    blocks: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"structural.round_to must be a positive integer, got {self.round_to!r}")
        if not isinstance(self.max_ratio, (int, float)) or not 0.0 < self.max_ratio <= 1.0:
            raise ConfigError(f"structural.max_ratio must be in (0, 1], got {self.max_ratio!r}")
        if not isinstance(self.keep_at_least, int) or self.keep_at_least < 1:
            raise ConfigError(
                f"structural.keep_at_least must be >= 1 (a layer cannot lose every unit), got {self.keep_at_least!r}"
            )
        if self.gqa not in GQA_MODES:
            raise ConfigError(f"structural.gqa must be one of {choices(GQA_MODES)}, got {self.gqa!r}")

    @classmethod
    def from_value(cls, value: StructuralOptions | Mapping[str, Any] | None) -> StructuralOptions:
        if value is None:
            return cls()
        if isinstance(value, StructuralOptions):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"structural must be a mapping of options, got {type(value).__name__}")
        valid = {f.name for f in fields(cls)}
        unknown = set(value) - valid
        if unknown:
            raise ConfigError(f"unknown structural option(s) {sorted(unknown)}; valid: {choices(valid)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_remove(config: Any) -> None:
    """Checks of a :class:`~secateurs.PruneConfig` with ``mode='remove'`` beyond the common ones."""
    from ..allocation import ERK

    criterion, granularity = config.criterion_, config.pattern_
    if isinstance(config.allocation_, ERK):
        raise ConfigError("allocation 'erk' sizes weight tensors, not groups of channels; use 'uniform' or 'global'")
    if config.iterations not in (None, 1):
        raise ConfigError(
            "mode='remove' prunes in one round; for iterative removal use "
            "secateurs.Pruner(..., mode='remove', schedule=...) in your training loop"
        )
    layer_only = getattr(criterion, "granularity", None) == "layer"
    if granularity.kinds == ("layer",) and not (layer_only or criterion.name == "random"):
        raise ConfigError(
            f"pattern 'layer' ranks whole blocks; method {criterion.name!r} scores channels. "
            "Use method='block_influence' (ShortGPT) or 'random'"
        )
    if layer_only and granularity.kinds != ("layer",):
        raise ConfigError(f"method {criterion.name!r} scores whole blocks; use pattern='layer'")
