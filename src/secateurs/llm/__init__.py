"""Post-training pruning of large language models, one transformer block at a time.

``prune_llm(model, "sparsegpt", 0.5, calibration="calib.txt")`` runs any registered method
(magnitude, Wanda, SparseGPT ..., unstructured or N:M, optionally with OWL layer sparsities) over
any Hugging Face causal or masked LM through the block runner of the one pipeline, and FLAP /
ShortGPT remove heads, neurons or blocks; :func:`perplexity` evaluates with the papers' protocol.
"""

from __future__ import annotations

from ..blocks import BlockDiscoveryError, find_blocks
from .api import prune_llm
from .cloze import cloze_task
from .config import LLMPruneConfig
from .perplexity import Perplexity, perplexity
from .search import search_allocation
from .structured import prune_heads_and_neurons, remove_layers
from .zeroshot import zero_shot

__all__ = [
    "BlockDiscoveryError",
    "LLMPruneConfig",
    "Perplexity",
    "cloze_task",
    "find_blocks",
    "perplexity",
    "prune_heads_and_neurons",
    "prune_llm",
    "remove_layers",
    "search_allocation",
    "zero_shot",
]
