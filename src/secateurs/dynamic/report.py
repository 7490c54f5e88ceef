"""The speed/quality curve of activation sparsity: perplexity and batch-1 decode speed per target.

One calibration serves every level (the thresholds come from stored distributions), so the sweep
sets each target in turn on the same model. Speed is greedy decoding with a KV cache at batch 1,
the regime the sparse-input kernel is for; each round decodes at every level, dense (target 0: the
same model, every layer on the plain ``F.linear`` path) included, so a burst of load from other
processes hits all levels alike, and the speed-up is the median of the per-round ratios with its
spread. Beside it stands the physical limit: the weight bytes a dense decode step reads over the
bytes the sparse one needs.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import model_device
from ..errors import ConfigError
from ..evaluation import Spread
from ..io import write_text
from ..plotting import pyplot, save_png
from .activation import ActivationSparsity, check_target


@dataclass
class Level:
    """One target of the sweep."""

    sparsity: float
    measured: float | None  # zeros entering the thresholded layers (weighted by their weights) on the prompt
    quality: float | None  # what quality() returned (perplexity in the CLI)
    tokens_per_s: Spread | None
    speedup: Spread | None  # over target 0, median of per-round ratios
    bytes_limit: float  # dense weight bytes of a decode step over the bytes this level reads


@dataclass
class SpeedQuality:
    """The sweep's table, JSON and plot."""

    method: str
    allocation: str
    threads: int
    levels: list[Level]
    metric: str = "perplexity"

    def table(self) -> str:
        lines = [
            f"activation sparsity ({self.method}, {self.allocation} allocation), batch-1 decode on "
            f"{self.threads} thread(s)",
            f"| target | measured | {self.metric} | tokens/s | speed-up vs dense (IQR) | bytes-read limit |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for lv in self.levels:
            measured = "-" if lv.measured is None else f"{lv.measured:.1%}"
            ppl = "-" if lv.quality is None else f"{lv.quality:.2f}"
            rate = "-" if lv.tokens_per_s is None else f"{lv.tokens_per_s.median:.1f}"
            speed = "-" if lv.speedup is None else f"{lv.speedup.median:.2f}x ({lv.speedup.q1:.2f}-{lv.speedup.q3:.2f})"
            lines.append(f"| {lv.sparsity:.0%} | {measured} | {ppl} | {rate} | {speed} | {lv.bytes_limit:.2f}x |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", overwrite=overwrite)

    def plot(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Perplexity (left axis) and decode speed-up (right axis) against the target sparsity, as PNG."""
        plt = pyplot()
        fig, left = plt.subplots(figsize=(6.5, 4))
        xs = [lv.sparsity for lv in self.levels]
        if any(lv.quality is not None for lv in self.levels):
            left.plot(xs, [lv.quality for lv in self.levels], marker="o", color="tab:red", label=self.metric)
            left.set_ylabel(self.metric, color="tab:red")
        if any(lv.speedup is not None for lv in self.levels):
            right = left.twinx()
            right.plot(xs, [lv.speedup.median if lv.speedup else None for lv in self.levels], marker="s",
                       color="tab:blue", label="measured speed-up")  # fmt: skip
            right.plot(xs, [lv.bytes_limit for lv in self.levels], linestyle="--", color="tab:blue",
                       label="bytes-read limit")  # fmt: skip
            right.set_ylabel("batch-1 decode speed-up vs dense", color="tab:blue")
            right.legend(loc="upper center", fontsize=7)
        left.set_xlabel("target activation sparsity")
        left.set_title(f"{self.method}: quality and speed over sparsity")
        return save_png(fig, path, overwrite)


def weight_bytes(model: nn.Module, sparsities: dict[str, float]) -> tuple[int, float]:
    """Bytes of Linear weights a batch-1 step reads: dense, and with each thresholded layer's share skipped."""
    dense = sparse = 0.0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, Tensor):
            size = weight.numel() * weight.element_size()
            dense += size
            sparse += size * (1 - sparsities.get(name, 0.0))
    return int(dense), sparse


@torch.inference_mode()
def decode_seconds(model: nn.Module, prompt: Tensor, tokens: int) -> float:
    """Seconds per generated token: greedy decoding at batch 1 with a KV cache, prefill excluded."""
    from transformers import DynamicCache

    cache = DynamicCache()
    # transformers >= 5.2x calls the argument ``cache``; earlier versions ``past_key_values``
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    token = model(prompt, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(tokens):
        token = model(token, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / tokens


def speed_quality(
    sparse: ActivationSparsity,
    levels: list[float],
    quality: Callable[[], float] | None = None,
    speed: bool = True,
    tokens: int = 16,
    rounds: int = 5,
    metric: str = "perplexity",
) -> SpeedQuality:
    """``quality()`` (e.g. perplexity on held-out text; lower is better) and batch-1 decode speed (if
    ``speed``) at each of ``levels`` and at 0 (dense). The model is left at the target it had before.

        ppl = lambda: perplexity(model, "test.txt", tokenizer, progress=False).perplexity
        print(speed_quality(sparse, [0.25, 0.4, 0.5], quality=ppl).table())
    """
    if not levels:
        raise ConfigError("the sweep needs at least one target sparsity, e.g. levels=[0.25, 0.4, 0.5]")
    limit = sparse.calibration.max_sparsity()
    levels = sorted({0.0, *(check_target(s, limit) for s in levels)})
    if quality is None and not speed:
        raise ConfigError("nothing to measure: give quality= (e.g. a perplexity function) or speed=True")
    if not isinstance(tokens, int) or tokens < 1 or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"tokens and rounds must be positive integers, got {tokens!r} and {rounds!r}")
    model, before = sparse.model, sparse.sparsity
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 8), generator=g).to(model_device(model))
    probe = torch.randint(0, vocab, (1, max(tokens, 8)), generator=g).to(model_device(model))
    scores: dict[float, float | None] = {}
    measured: dict[float, float | None] = {}
    limits: dict[float, float] = {}
    try:
        for level in levels:
            sparse.set_sparsity(level)
            measured[level] = sparse.measure(probe)["<weighted>"] if level > 0 else 0.0
            dense_bytes, read = weight_bytes(model, sparse.layer_sparsities())
            limits[level] = dense_bytes / read if read else 1.0
            scores[level] = None if quality is None else float(quality())
        times: dict[float, list[float]] = {level: [] for level in levels}
        if speed:
            for level in levels:  # warm-up (and the kernel's build, once)
                sparse.set_sparsity(level)
                decode_seconds(model, prompt, 2)
            for _ in range(rounds):
                for level in levels:
                    sparse.set_sparsity(level)
                    times[level].append(decode_seconds(model, prompt, tokens))
    finally:
        sparse.set_sparsity(before)
    rows = []
    for level in levels:
        rate = Spread.of([1 / t for t in times[level]]) if speed else None
        ratio = Spread.of([d / t for d, t in zip(times[0.0], times[level])]) if speed else None
        rows.append(Level(level, measured[level], scores[level], rate, ratio, limits[level]))
    return SpeedQuality(sparse.method, sparse.allocation, torch.get_num_threads(), rows, metric)
