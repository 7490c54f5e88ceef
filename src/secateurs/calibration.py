"""Calibration data for post-training LLM pruning: N segments of L tokens.

The protocol is the one SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774) and
Wanda (Sun et al. 2023, arXiv:2306.11695) use: join the text, tokenize it once,
and cut ``nsamples`` windows of ``seqlen`` tokens at random starts drawn from a
seeded generator, so the same seed always gives the same segments. The papers use
128 segments of 2048 tokens; the length is capped to the model's context.

Sources: a text file path (``str`` or ``Path``) or a list of ``Path``, a list of texts (``str``), a Hugging Face
``datasets.Dataset`` (its ``text`` column), a 1-D tensor of token ids (a stream to
sample from) or a 2-D ``(N, L)`` tensor of ready segments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, DataRequiredError

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


class CalibrationError(DataRequiredError):
    """The calibration data cannot give the requested segments (too short, unreadable, wrong type)."""


def model_context(model_or_config: Any) -> int | None:
    """The longest sequence the model accepts, read from its (HF) config; None if it does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Counts (nsamples, seqlen, batch size): a positive int, not a bool or float."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def default_seqlen(model: Any = None) -> int:
    """The literature's 2048 tokens, capped to the model's context."""
    context = model_context(model) if model is not None else None
    return min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN


def model_tokenizer(model: Any) -> Any:
    """The tokenizer saved beside ``model`` (its ``name_or_path``), for text calibration."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("text calibration needs a tokenizer; pass tokenizer=AutoTokenizer.from_pretrained(...)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def resolve_seqlen(model: Any, seqlen: int | None) -> int:
    """``seqlen``, or the default; refused if longer than the model's context."""
    if seqlen is None:
        return default_seqlen(model)
    context = model_context(model)
    if context is not None and seqlen > context:
        raise ConfigError(f"seqlen={seqlen} is longer than the model's context of {context} tokens")
    return seqlen


def read_text(source: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """Read one text file, or several joined by a blank line (as WikiText's paragraphs are)."""
    paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    parts = []
    for path in paths:
        try:
            parts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            raise CalibrationError(f"cannot read calibration text {path}: {exc}") from exc
    return "\n\n".join(parts)


def tokenize(text: str, tokenizer: Any) -> Tensor:
    """Token ids of ``text`` as a 1-D long tensor, with the tokenizer's usual special tokens
    (the reference loaders call ``tokenizer(text)`` on the joined corpus)."""
    if tokenizer is None:
        raise CalibrationError("text calibration data needs a tokenizer (pass tokenizer=AutoTokenizer...)")
    encoded = tokenizer(text, verbose=False) if _accepts_verbose(tokenizer) else tokenizer(text)
    ids = encoded["input_ids"] if not isinstance(encoded, (list, Tensor)) else encoded
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _accepts_verbose(tokenizer: Any) -> bool:
    # HF tokenizers warn when a corpus is longer than model_max_length; that is expected here
    return hasattr(tokenizer, "model_max_length")


def _is_dataset(source: Any) -> bool:
    return hasattr(source, "column_names") and hasattr(source, "__getitem__") and not isinstance(source, Tensor)


def _is_file(source: str | os.PathLike) -> bool:
    try:
        return Path(source).is_file()
    except OSError:  # e.g. raw text passed as a path: "File name too long"
        return False


def token_stream(source: Any, tokenizer: Any = None, text_column: str = "text") -> Tensor:
    """Any accepted source except ready ``(N, L)`` segments, as one 1-D stream of token ids."""
    if isinstance(source, Tensor):
        if source.ndim != 1 or source.is_floating_point():
            raise CalibrationError(f"a token stream must be a 1-D integer tensor, got {tuple(source.shape)}")
        return source.long()
    if _is_dataset(source):
        if text_column not in source.column_names:
            raise CalibrationError(
                f"the dataset has no {text_column!r} column (it has {source.column_names}); pass text_column=..."
            )
        return tokenize("\n\n".join(source[text_column]), tokenizer)
    if isinstance(source, (str, os.PathLike)):
        if not _is_file(source):
            raise CalibrationError(
                f"calibration file {source} does not exist "
                "(a string is read as a path; pass raw text as a list of strings)"
            )
        return tokenize(read_text(source), tokenizer)
    if isinstance(source, Sequence) and source and all(isinstance(s, os.PathLike) for s in source):
        return tokenize(read_text(source), tokenizer)
    if isinstance(source, Sequence) and source and all(isinstance(s, str) for s in source):
        return tokenize("\n\n".join(source), tokenizer)
    raise CalibrationError(
        f"cannot use {type(source).__name__} as calibration data; pass a text file path, a string, a list of "
        "strings, a datasets.Dataset with a 'text' column, or a tensor of token ids"
    )


def sample_segments(
    source: Any,
    tokenizer: Any = None,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
    text_column: str = "text",
) -> Tensor:
    """``(nsamples, seqlen)`` token ids cut from ``source`` at seeded random starts.

    A 2-D tensor is taken as ready segments (its first ``nsamples`` rows, cut to
    ``seqlen``). Raises :class:`CalibrationError` with the numbers when the source is
    shorter than one segment.
    """
    positive_int("nsamples", nsamples)
    positive_int("seqlen", seqlen)
    if isinstance(source, Tensor) and source.ndim == 2:
        if source.is_floating_point():
            raise CalibrationError("calibration segments must be integer token ids, got a float tensor")
        if source.shape[1] < seqlen:
            raise CalibrationError(
                f"calibration segments have {source.shape[1]} tokens each, but seqlen={seqlen} was asked; "
                f"pass seqlen={source.shape[1]} or longer segments"
            )
        return source[:nsamples, :seqlen].long().contiguous()
    stream = token_stream(source, tokenizer, text_column)
    total = stream.numel()
    if total < seqlen:
        raise CalibrationError(
            f"the calibration data has {total} tokens, but one segment needs seqlen={seqlen} tokens; "
            f"give more text (at least {seqlen} tokens; {nsamples} x {seqlen} = {nsamples * seqlen} avoids "
            f"overlapping segments) or lower seqlen (--seqlen)"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
