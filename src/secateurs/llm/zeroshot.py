"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, when it is installed.

The Wanda, SparseGPT and OWL papers report zero-shot accuracy on BoolQ, RTE, HellaSwag,
WinoGrande, ARC and OpenBookQA next to perplexity. lm-eval downloads those task datasets
itself, so this needs lm-eval (``pip install lm-eval``) and network access to the datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError


def zero_shot(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], batch_size: int = 1, limit: int | None = None
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for the in-memory ``model`` (pruned or not)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ConfigError(
            "zero-shot evaluation needs lm-eval: pip install 'lm-eval[hf]' (its tasks download their datasets)"
        ) from exc
    if not tasks:
        raise ConfigError("name at least one lm-eval task, e.g. --tasks arc_easy,hellaswag")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
