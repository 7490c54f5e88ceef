"""An allocation searched before ``prune_llm`` prunes: SPDY (:func:`secateurs.analysis.spdy_search`) on the
very calibration batches the prune will read.

Why a front-door step: the search must see the segments and batches ``prune_llm`` cuts from the same
text with the same ``nsamples``, ``seqlen``, ``batch_size`` and ``seed``, or its database (every block
pruned at every grid sparsity by the sequential runner) is not the prune that follows. The result's
profile then goes to ``allocation='sensitivity'``, which reproduces the searched allocation exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..analysis.search import SearchResult, spdy_search
from ..blocks import batched
from ..errors import ConfigError
from .api import calibration_segments, ready_batches
from .config import LLMPruneConfig

#: the searches the front door runs, by name (the CLI's ``--search`` choices)
SEARCHES = ("spdy",)
# what the search decides or reads itself, so a recipe may not set it
_DECIDED = ("allocation", "allocation_options", "runner")
_LLM_ONLY = ("nsamples", "seqlen", "batch_size", "min_expert_tokens", "seed")


def search_allocation(
    model: nn.Module,
    recipe: Mapping[str, Any],
    *,
    calibration: Any,
    tokenizer: Any = None,
    search: str = "spdy",
    evaluations: int = 60,
    progress: bool = True,
) -> SearchResult:
    """Search per-block sparsities for ``recipe`` (the :class:`LLMPruneConfig` fields ``prune_llm`` takes),
    scored by the calibration loss; the model is left as it was.

    Text calibration is cut into segments as ``prune_llm`` cuts it (the batches every prune of the search
    reads); the candidates are scored by their language-model loss on as many further segments of the same
    text, sampled with ``seed + 1``. Calibration that is already model inputs is both read and scored.

    Pass ``allocation='sensitivity', allocation_options={'profile': result.profile}`` with the same recipe
    and calibration to ``prune_llm`` to prune with the searched allocation.

    Args:
        search: ``'spdy'`` (SPDY, Frantar & Alistarh, arXiv:2201.13096).
        evaluations: distinct candidate allocations scored (one forward pass over the batches each).
    """
    if search not in SEARCHES:
        raise ConfigError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    LLMPruneConfig.check_keywords(dict(recipe), "search_allocation()")
    for key in _DECIDED:
        if recipe.get(key) is not None:
            raise ConfigError(
                f"the {search} search chooses the allocation itself with the block runner; drop {key}="
                f"{recipe[key]!r} (or drop the search and allocate with {key})"
            )
    config = LLMPruneConfig(**recipe)
    if config.sparsity is None:
        raise ConfigError(f"the {search} search needs the average sparsity to allocate, e.g. sparsity=0.7")
    if calibration is None:
        raise ConfigError(f"the {search} search scores candidates on calibration data: pass calibration='calib.txt'")
    batches, evaluation = ready_batches(calibration, config), None
    if batches is None:
        segments, _ = calibration_segments(model, calibration, tokenizer, config)
        batches = list(batched(segments, config.batch_size))
        # candidates are scored on other segments of the same text (the next seed), as language-model losses:
        # scored on the segments the prune reads, the search would favour what fits those alone
        held = LLMPruneConfig(**{**recipe, "seed": config.seed + 1})
        held_segments, _ = calibration_segments(model, calibration, tokenizer, held)
        evaluation = [{"input_ids": b, "labels": b} for b in batched(held_segments, config.batch_size)]
    options = {k: v for k, v in recipe.items() if k not in ("method", "sparsity", *_LLM_ONLY) and v is not None}
    return spdy_search(
        model,
        batches,
        evaluation=evaluation,
        method=config.method,
        sparsity=config.sparsity,
        evaluations=evaluations,
        seed=config.seed,
        progress=progress,
        **options,
    )
