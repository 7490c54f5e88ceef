"""Perplexity with the protocol of the Wanda and SparseGPT papers.

Join the evaluation text, tokenize it once, cut it into non-overlapping windows of the
context length (the tail shorter than a window is dropped), and report
``exp(mean NLL)`` over every predicted token; each window predicts its tokens 2..L from the
ones before it, with no context carried across windows. Any text file works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import model_device
from ..calibration import CalibrationError, resolve_seqlen, token_stream
from ..errors import ConfigError
from ..progress import progress as progress_bar


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seqlen: int
    tokens: int  # tokens of the text (the tail past the last full window is not scored)
    #: mean NLL per predicted token of each window, in order: two models scored on the same text are
    #: compared window by window (a paired test), not only by their means
    window_nll: list[float] = field(default_factory=list)


def is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    config = getattr(model, "config", None)
    return name.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(config, "is_decoder", False))


def perplexity(
    model: nn.Module,
    text: Any,
    tokenizer: Any = None,
    seqlen: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> Perplexity:
    """Perplexity of a causal LM on ``text`` (a file path, list of texts, dataset or token ids)."""
    if not is_causal_lm(model):
        raise ConfigError(
            f"perplexity needs a causal language model with an LM head; {type(model).__name__} is not one "
            "(masked LMs such as BERT have no left-to-right perplexity)"
        )
    seqlen = resolve_seqlen(model, seqlen)
    stream = token_stream(text, tokenizer)
    windows = stream.numel() // seqlen
    if windows == 0:
        raise CalibrationError(
            f"the evaluation text has {stream.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    ids = stream[: windows * seqlen].reshape(windows, seqlen)
    device = model_device(model)
    was_training = model.training
    model.eval()
    sums: list[float] = []
    try:
        with torch.no_grad():
            for start in progress_bar(range(0, windows, batch_size), "perplexity", progress):
                batch = ids[start : start + batch_size].to(device)
                logits = model(batch, use_cache=False).logits.float()
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
                )
                sums += nll.reshape(len(batch), -1).double().sum(1).tolist()
    finally:
        model.train(was_training)
    mean = math.fsum(sums) / (windows * (seqlen - 1))
    per_window = [v / (seqlen - 1) for v in sums]
    return Perplexity(math.exp(mean), mean, windows, seqlen, stream.numel(), per_window)
