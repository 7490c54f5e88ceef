"""What ``mode='remove'`` removes (granularities) and the options of removal, validated once.

Below the configuration and the structural package, so both read it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, choices
from .spec import Spec, boolean, integer, number, one_of, option

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
    if isinstance(value, str):
        parts: list[Any] = value.replace(",", "+").split("+")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ConfigError(
            f"mode='remove' takes a granularity name as pattern ({choices(GRANULARITY_NAMES)}), got {value!r}"
        )
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
class StructuralOptions(Spec):
    """Options of ``mode='remove'`` (the ``structural`` key of a recipe).

    Args:
        round_to: channel and hidden counts that stay are rounded to a multiple of this
            (e.g. 8 for tensor cores / SIMD); the nearest multiple, never below one multiple.
        max_ratio: at most this fraction of any group is removed (per-layer cap).
        keep_at_least: every group keeps at least this many units (per KV group, for heads).
        gqa: attention with grouped KV heads: ``'kv_groups'`` removes whole KV groups with their
            query heads, ``'query_heads'`` removes query heads evenly inside every KV group;
            ``'auto'``: query heads when groups hold several, else whole groups (plain MHA).
        check: run the pruned model on the example inputs and restore it if that fails.
        latency: time a copy of the dense model against the pruned one, alternately, for the report
            (the copy holds a second set of weights during the prune: turn off near the memory limit).

    Bias compensation is a solver (``solver='bias_compensation'``, FLAP's default) and the block
    container a top-level option (``blocks=``).
    """

    _prefix = "structural."

    round_to: int = option(1, check=integer(1))
    max_ratio: float = option(1.0, check=number(0.0, 1.0, low_open=True))
    keep_at_least: int = option(1, check=integer(1, what="an integer >= 1 (a layer cannot lose every unit)"))
    gqa: str = option("auto", check=one_of(GQA_MODES))
    check: bool = option(True, check=boolean())
    latency: bool = option(True, check=boolean())
