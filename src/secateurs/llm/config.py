"""LLMPruneConfig: the configuration of ``prune_llm()``, the one pipeline's LLM front door.

It is a :class:`~secateurs.PruneConfig` (same keys, same checks, same resolution) with the LLM
front door's defaults and the knobs that turn calibration text into token segments:

- ``method='wanda'``, ``mode`` ``'bake'`` (zeros in the weights; SparseGPT reconstructs, FLAP and
  ShortGPT remove), ``runner='blocks'`` (one transformer block at a time with recomputed inputs;
  removal ranks on the dense model in one whole-model pass, as FLAP and ShortGPT do);
- the scope is every Linear / Conv1D inside the repeated blocks (the LM head and embeddings
  stay dense, as in the papers); a scope the user gives keeps these defaults for the fields it
  leaves out;
- ``nsamples`` segments of ``seqlen`` tokens, ``batch_size`` segments per forward pass;
- removal reports no latency unless asked (``structural={"latency": True}``): timing needs a dense
  copy of the model beside the pruned one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import PruneConfig
from ..criteria import Criterion
from ..scope import ScopeSpec
from ..spec import instance, integer, option

_LLM_SCOPE = {"skip_first": False, "skip_last": False, "types": ("Linear", "Conv1D"), "embeddings": False}


@dataclass(frozen=True)
class LLMPruneConfig(PruneConfig):
    """Arguments of :func:`secateurs.llm.prune_llm`: every :class:`~secateurs.PruneConfig` field, plus

    Args:
        nsamples: calibration segments (the literature's 128).
        seqlen: tokens per segment; None: 2048 capped to the model's context.
        batch_size: segments per forward pass.
        min_expert_tokens: a mixture-of-experts model's routed expert that sees fewer calibration tokens
            is pruned by magnitude instead (reported in ``details.fallbacks``); None: the hidden size.
    """

    default_mode = "bake"
    # timing dense against pruned needs a second copy of every weight during the removal, and an LLM
    # forward per repeat: an opt-in (structural={"latency": True}) for models of this size
    default_structural: ClassVar[Mapping[str, Any]] = {"latency": False}

    method: str | Criterion = option("wanda", check=instance((str, Criterion), "a method name or a Criterion"))
    nsamples: int = option(128, check=integer(1))
    seqlen: int | None = option(None, check=integer(1, optional=True))
    batch_size: int = option(1, check=integer(1))
    min_expert_tokens: int | None = option(None, check=integer(1, optional=True))

    def _runner(self) -> str:
        if self.runner is not None:
            return self.runner
        return "model" if self.application_.structural else "blocks"

    def _scope(self) -> ScopeSpec:
        if self.application_.structural:
            return ScopeSpec.from_value(self.scope)
        # the layers inside the transformer blocks (the block runner leaves the LM head and embeddings
        # dense); only the fields the user did not give take these defaults
        if isinstance(self.scope, ScopeSpec):
            return self.scope
        if isinstance(self.scope, Mapping):
            given = dict(self.scope)
        else:  # a glob or an iterable of globs, checked and made a tuple as prune() does
            given = {} if self.scope is None else {"include": ScopeSpec.from_value(self.scope).include}
        return ScopeSpec.from_value({**_LLM_SCOPE, **given})

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.update(nsamples=self.nsamples, seqlen=self.seqlen, batch_size=self.batch_size,
                    min_expert_tokens=self.min_expert_tokens)  # fmt: skip
        return data
