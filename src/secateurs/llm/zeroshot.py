"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, when it is installed.

The Wanda, SparseGPT and OWL papers report zero-shot accuracy on BoolQ, RTE, HellaSwag,
WinoGrande, ARC and OpenBookQA next to perplexity. lm-eval downloads those task datasets
itself, so this needs lm-eval (``pip install lm-eval``) and network access to the datasets,
or ``include_path``: a folder of your own lm-eval task YAMLs over local files, which runs offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError


def require_lm_eval() -> None:
    """Refuse, before any model is loaded, when lm-eval or its Hugging Face backend is missing."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"zero-shot evaluation needs lm-eval with its Hugging Face backend ({exc}): pip install 'lm-eval[hf]' "
            "(or secateurs[eval]; its standard tasks download their datasets)"
        ) from exc


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    batch_size: int = 1,
    limit: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for the in-memory ``model`` (pruned or not); ``include_path``
    adds folders of task YAMLs (e.g. from :func:`~secateurs.llm.cloze.cloze_task`) to lm-eval's registry."""
    folders = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    for folder in folders:
        if not Path(folder).is_dir():
            raise ConfigError(f"lm-eval include path {str(folder)!r} is not a folder of task YAML files")
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("name at least one lm-eval task, e.g. --tasks arc_easy,hellaswag")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=[str(f) for f in folders]) if folders else None
    results = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit, task_manager=manager)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        out[task] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
