"""Post-training pruning of large language models, one transformer block at a time.

``prune_llm(model, "sparsegpt", 0.5, calibration="calib.txt")`` runs magnitude, Wanda or
SparseGPT (unstructured or N:M, optionally with OWL layer sparsities) over any Hugging Face
causal or masked LM; :func:`perplexity` evaluates with the papers' protocol.
"""

from __future__ import annotations

from .api import LLMReport, prune_llm
from .blocks import BlockDiscoveryError, find_blocks
from .cloze import cloze_task
from .config import LLMPruneConfig
from .methods import METHODS
from .perplexity import Perplexity, perplexity
from .zeroshot import zero_shot

__all__ = [
    "METHODS",
    "BlockDiscoveryError",
    "LLMPruneConfig",
    "LLMReport",
    "Perplexity",
    "cloze_task",
    "find_blocks",
    "perplexity",
    "prune_llm",
    "zero_shot",
]
