"""Supervised tasks built from the Python-docs text here, for fine-tuning MiniLM.

The text is cut into sections at reStructuredText headings, each section's prose into segments of
``words`` words. Three tasks share that segmentation:

- **word_order** (``word_order``, one segment): "are these words in their original order?";
  negatives are permutations of a segment's words (see there). The one the benchmark uses;
- **same_section** (``same_section_pairs``, bi-encoder): "are segments A and B from the same
  section?"; negatives come from a nearby section (see there);
- **adjacent** (``pairs``, cross-encoder): "does segment B directly follow segment A?"; a negative
  is half a non-adjacent segment of the *same* section (same topic and vocabulary), half a segment
  of another section.

Labels are balanced, so chance is 50% and the initial loss of a fresh classification head is ln 2
(not zero, unlike self-distillation, where movement pruning's scores ``-W * dL/dW`` have no signal
at the start). Train examples come from ``pydoc-calib.txt``, dev examples from ``pydoc-test.txt``:
no document (not even a line) is shared.

Why three: on the adjacency task even the dense model reached only 50-58% after 100-200 steps of
batch 8; on the same-section task it fit the training file in 300 steps of batch 16 but reached
60% on the dev file (topics of one file do not carry to another). Word order is learned in 200
steps (95% on dev) and not by the frozen embeddings (59%), so the encoder has to adapt, which is
what movement pruning is about. The other two stay to reproduce the recorded runs.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch
from torch import nn

_HEADING = re.compile(r"([=\-*~^#\"'`+])\1{3,}")


def sections(path: Path) -> list[list[str]]:
    """Each section's prose words (directives, labels and heading lines dropped)."""
    out: list[list[str]] = [[]]
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        text = line.strip()
        if _HEADING.fullmatch(text):
            if out[-1]:
                out.append([])
            continue
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if text.startswith("..") or text.startswith(":") or _HEADING.fullmatch(following):
            continue  # a directive, a field, or a heading's title
        out[-1].extend(text.split())
    return [s for s in out if s]


def segments(path: Path, words: int) -> list[list[str]]:
    """Each section cut into consecutive segments of ``words`` words (the short tail dropped)."""
    return [[" ".join(s[i : i + words]) for i in range(0, len(s) - words + 1, words)] for s in sections(path)]


def pairs(path: Path, count: int, words: int, seed: int) -> list[tuple[str, str, int]]:
    """``count`` balanced (a, b, label) pairs, label 1 when b directly follows a."""
    rng = random.Random(seed)
    segs = [s for s in segments(path, words) if len(s) >= 2]
    flat = [(i, j) for i, s in enumerate(segs) for j in range(len(s) - 1)]
    out = []
    while len(out) < count:
        i, j = rng.choice(flat)
        a = segs[i][j]
        if len(out) % 2 == 0:
            out.append((a, segs[i][j + 1], 1))
            continue
        far = [k for k in range(len(segs[i])) if abs(k - j) >= 2]
        if far and rng.random() < 0.5:  # hard negative: same section, not adjacent
            out.append((a, segs[i][rng.choice(far)], 0))
        else:
            other = rng.choice([k for k in range(len(segs)) if k != i])
            out.append((a, rng.choice(segs[other]), 0))
    rng.shuffle(out)
    return out


def same_section_pairs(path: Path, count: int, words: int, seed: int, near: int) -> list[tuple[str, str, int]]:
    """``count`` balanced (a, b, label) pairs, label 1 when a and b are two segments of one section.

    A negative's b comes from another section at most ``near`` sections away in the file (0: any
    other section). Nearby sections are mostly of the same document, so they share its topic and
    vocabulary: the frozen all-MiniLM-L6-v2 embeddings, made for topical similarity, separate them
    far less well than random sections (cosine threshold ~67% vs ~79% on the dev pairs).
    """
    if near < 0:
        raise ValueError(f"near must be >= 0 (0: any other section), got {near}")
    rng = random.Random(seed)
    segs = [s for s in segments(path, words) if len(s) >= 2]
    out = []
    while len(out) < count:
        i = rng.randrange(len(segs))
        j, k = rng.sample(range(len(segs[i])), 2)
        if len(out) % 2 == 0:
            out.append((segs[i][j], segs[i][k], 1))
            continue
        lo, hi = (0, len(segs)) if near == 0 else (max(0, i - near), min(len(segs), i + near + 1))
        other = rng.choice([c for c in range(lo, hi) if c != i])
        out.append((segs[i][j], rng.choice(segs[other]), 0))
    rng.shuffle(out)
    return out


def word_order(path: Path, count: int, words: int, seed: int) -> list[tuple[str, int]]:
    """``count`` balanced (segment, label) examples, label 1 when the words are in their original order.

    A negative is a segment with its words randomly permuted (never the identity): the same words,
    so a bag of words cannot tell them apart, and mean-pooled sentence embeddings, trained to be
    about topic, barely can. Telling grammar from word salad does not depend on the document, so
    what is learned on one file carries over to another (the same-section task did not).
    """
    rng = random.Random(seed)
    flat = [seg for section in segments(path, words) for seg in section]
    out = []
    while len(out) < count:
        text = rng.choice(flat)
        if len(out) % 2 == 0:
            out.append((text, 1))
            continue
        tokens = text.split()
        if len(set(tokens)) < 2:  # no permutation differs from the original: not a usable negative
            continue
        shuffled = tokens[:]
        while shuffled == tokens:
            rng.shuffle(shuffled)
        out.append((" ".join(shuffled), 0))
    rng.shuffle(out)
    return out


def single_batches(tokenizer, data: list[tuple[str, int]], size: int, max_length: int) -> list[dict]:
    """Single-segment batches (``[CLS] text [SEP]``), padded to the longest, with labels."""
    out = []
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        enc = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")  # fmt: skip
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([y for _, y in chunk])})  # fmt: skip
    return out


def batches(tokenizer, data: list[tuple[str, str, int]], size: int, max_length: int) -> list[dict]:
    """Cross-encoder batches: ``[CLS] a [SEP] b [SEP]``, padded to the longest, with labels."""
    out = []
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        enc = tokenizer([a for a, _, _ in chunk], [b for _, b, _ in chunk], padding=True, truncation="longest_first",
                        max_length=max_length, return_tensors="pt")  # fmt: skip
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.tensor([y for _, _, y in chunk])
        out.append(batch)
    return out


def bi_batches(tokenizer, data: list[tuple[str, str, int]], size: int, max_length: int) -> list[dict]:
    """Bi-encoder batches: a and b tokenized apart (``a_*`` and ``b_*`` keys), with labels."""
    out = []
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        batch = {"labels": torch.tensor([y for _, _, y in chunk])}
        for side, texts in (("a", [a for a, _, _ in chunk]), ("b", [b for _, b, _ in chunk])):
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = enc["input_ids"], enc["attention_mask"]
        out.append(batch)
    return out


def mean_pool(encoder: nn.Module, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    """The sentence embedding all-MiniLM-L6-v2 was trained for: the mean of its unmasked token states."""
    hidden = encoder(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
    ).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class PairClassifier(nn.Module):
    """A pretrained encoder, mean pooling, and a fresh linear head over two classes (one or two segments)."""

    def __init__(self, encoder: nn.Module, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None) -> dict:
        logits = self.head(mean_pool(self.encoder, input_ids, attention_mask, token_type_ids))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class BiEncoderClassifier(nn.Module):
    """Sentence-BERT's classification objective: one shared encoder embeds a and b (u, v), a fresh
    linear head reads (u, v, |u - v|, u * v) (Reimers & Gurevych 2019)."""

    def __init__(self, encoder: nn.Module, seed: int) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(4 * encoder.config.hidden_size, 2)

    def forward(self, a_input_ids, a_attention_mask, b_input_ids, b_attention_mask, labels=None) -> dict:
        u = mean_pool(self.encoder, a_input_ids, a_attention_mask)
        v = mean_pool(self.encoder, b_input_ids, b_attention_mask)
        logits = self.head(torch.cat([u, v, (u - v).abs(), u * v], -1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


@torch.no_grad()
def evaluate(model: nn.Module, data: list[dict]) -> dict[str, float]:
    """Dev accuracy and mean cross-entropy, in eval mode."""
    model.eval()
    correct = total = 0
    loss = 0.0
    for batch in data:
        out = model(**batch)
        correct += int((out["logits"].argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
        loss += float(out["loss"]) * len(batch["labels"])
    return {"accuracy": correct / total, "loss": loss / total}
