"""Eigenpruning's task data: prompts whose answer is one token, and the corrupted prompts they are
compared with (attribution patching needs the two runs position by position).

Validated entirely before the model is touched; every refusal names the offending example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError


class TaskError(ConfigError):
    """Eigenpruning's prompts, answers or corrupted prompts are unusable as given."""


@dataclass(frozen=True)
class TaskBatch:
    """Prompts of one token length: ``clean``/``corrupted`` ``(n, length)``, ``answers`` ``(n,)``."""

    clean: Tensor
    corrupted: Tensor
    answers: Tensor


Prompt = str | Sequence[int]


def _ids(prompt: Prompt, tokenizer: Any, what: str) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TaskError(f"{what} is text ({prompt[:40]!r}) but no tokenizer was given: pass tokenizer=")
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise TaskError(f"{what} is empty: every prompt needs at least one token")
    return ids


def _answer(answer: str | int, tokenizer: Any, index: int) -> int:
    if isinstance(answer, str):
        if tokenizer is None:
            raise TaskError(f"answers[{index}]={answer!r} is text but no tokenizer was given: pass tokenizer=")
        ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = [tokenizer.decode([t]) for t in ids]
            raise TaskError(
                f"answers[{index}]={answer!r} is {len(ids)} tokens {pieces!r}, not one: eigenpruning scores the "
                "logit of a single next token. Use answers that are single tokens (often with a leading space) "
                "or drop this example"
            )
        return ids[0]
    return int(answer)


def encode_task(
    prompts: Sequence[Prompt],
    answers: Sequence[str | int],
    corrupted: Sequence[Prompt] | None,
    tokenizer: Any,
    vocab_size: int,
) -> list[TaskBatch]:
    """Token ids grouped by prompt length (no padding, so positions line up exactly).

    With ``corrupted=None`` each prompt is corrupted by another prompt of the same length, as the
    reference code does (it rolls the batch by one), so each length needs two prompts or more.
    """
    if len(prompts) == 0:
        raise TaskError("prompts is empty: eigenpruning needs task examples to score singular values on")
    if len(answers) != len(prompts):
        raise TaskError(f"{len(prompts)} prompts but {len(answers)} answers: give one answer per prompt")
    if corrupted is not None and len(corrupted) != len(prompts):
        raise TaskError(
            f"{len(prompts)} clean prompts but {len(corrupted)} corrupted prompts: attribution patching compares "
            "each clean prompt with its own corrupted one, so give exactly one corrupted prompt per clean prompt "
            "(or corrupted=None to pair each prompt with another one of the same length)"
        )
    clean = [_ids(p, tokenizer, f"prompts[{i}]") for i, p in enumerate(prompts)]
    targets = [_answer(a, tokenizer, i) for i, a in enumerate(answers)]
    bad = [(i, t) for i, t in enumerate(targets) if not 0 <= t < vocab_size]
    if bad:
        raise TaskError(f"answer token {bad[0][1]} (answers[{bad[0][0]}]) is outside the vocabulary of {vocab_size}")
    dirty = None
    if corrupted is not None:
        dirty = [_ids(p, tokenizer, f"corrupted[{i}]") for i, p in enumerate(corrupted)]
        for i, (c, d) in enumerate(zip(clean, dirty, strict=True)):
            if len(c) != len(d):
                raise TaskError(
                    f"prompts[{i}] is {len(c)} tokens but corrupted[{i}] is {len(d)}: a corrupted prompt must have "
                    "as many tokens as its clean prompt, so activations can be compared position by position"
                )
    for i, ids in enumerate(clean + (dirty or [])):
        if max(ids) >= vocab_size or min(ids) < 0:
            raise TaskError(f"prompt {i} holds a token id outside the vocabulary of {vocab_size}")
    return _group(clean, dirty, targets)


def _group(clean: list[list[int]], dirty: list[list[int]] | None, targets: list[int]) -> list[TaskBatch]:
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(clean):
        by_length.setdefault(len(ids), []).append(i)
    batches = []
    for length, members in sorted(by_length.items()):
        ids = torch.tensor([clean[i] for i in members])
        if dirty is None:
            if len(members) < 2:
                raise TaskError(
                    f"only one prompt is {length} tokens long (prompts[{members[0]}]); with corrupted=None each prompt "
                    "is corrupted by another prompt of the same length, so give corrupted prompts explicitly"
                )
            other = ids.roll(1, dims=0)
        else:
            other = torch.tensor([dirty[i] for i in members])
        batches.append(TaskBatch(ids, other, torch.tensor([targets[i] for i in members])))
    return batches
