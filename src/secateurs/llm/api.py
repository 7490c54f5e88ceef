"""``prune_llm()``: one call to prune a Hugging Face causal or masked LM layer by layer."""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import resolve_seqlen, sample_segments
from ..errors import ConfigError, choices
from ..report import JsonReport, Report, build_report
from .config import LLMPruneConfig
from .methods import LayerResult
from .runner import run


@dataclass
class LLMReport(JsonReport):
    """What :func:`prune_llm` did: the per-layer sparsity report plus the layerwise details."""

    report: Report
    blocks: str
    block_sparsities: list[float]
    layers: list[LayerResult]
    seconds: float
    calibration: dict[str, int] = field(default_factory=dict)
    outlier_ratios: list[float] | None = None

    @property
    def sparsity(self) -> float:
        return self.report.sparsity

    @property
    def config(self) -> dict[str, Any]:
        return self.report.config

    @property
    def dampening_raised(self) -> list[LayerResult]:
        """SparseGPT layers whose Hessian needed more dampening than asked."""
        return [layer for layer in self.layers if layer.retries]

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "report"}
        data["report"] = self.report.to_dict()
        data["sparsity"] = self.sparsity
        return data

    def table(self) -> str:
        lines = [self.report.table()]
        method = self.config.get("method")
        lines.append(f"{method}: {len(self.block_sparsities)} blocks of {self.blocks!r} in {self.seconds:.1f} s")
        if self.calibration:
            lines.append(f"calibration: {self.calibration['nsamples']} x {self.calibration['seqlen']} tokens")
        if self.outlier_ratios is not None:
            pairs = ", ".join(f"{r:.2%}->{s:.1%}" for r, s in zip(self.outlier_ratios, self.block_sparsities))
            lines.append(f"OWL outlier ratio -> block sparsity: {pairs}")
        for layer in self.dampening_raised:
            lines.append(
                f"NOTE {layer.name}: Hessian not positive definite; dampening raised to {layer.dampening:g} "
                f"({layer.retries} retr{'y' if layer.retries == 1 else 'ies'})"
            )
        return "\n".join(lines)


def _default_tokenizer(model: nn.Module) -> Any:
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ConfigError("text calibration needs a tokenizer; pass tokenizer=AutoTokenizer.from_pretrained(...)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def calibration_segments(
    model: nn.Module, calibration: Any, tokenizer: Any, config: LLMPruneConfig
) -> tuple[Tensor, int]:
    """The ``(nsamples, seqlen)`` segments the run calibrates on, and the seqlen used."""
    seqlen = resolve_seqlen(model, config.seqlen)
    if isinstance(calibration, Tensor) and calibration.ndim == 2 and config.seqlen is None:
        seqlen = min(seqlen, calibration.shape[1])
    needs_tokenizer = not isinstance(calibration, Tensor)
    if needs_tokenizer and tokenizer is None:
        tokenizer = _default_tokenizer(model)
    segments = sample_segments(calibration, tokenizer, config.nsamples, seqlen, config.seed)
    return segments, seqlen


def prune_llm(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | None = None,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    rollback: bool = True,
    progress: bool = True,
    **options: Any,
) -> LLMReport | Any:
    """Prune a transformer in place, one block at a time, and report what changed.

    ``options`` are the other :class:`LLMPruneConfig` fields (``pattern``, ``allocation``,
    ``owl_m``, ``owl_lambda``, ``nsamples``, ``seqlen``, ``batch_size``, ``seed``, ``blocks``,
    ``scope``, ``method_options``), so a recipe maps one to one:
    ``prune_llm(model, **load_recipe("r.yaml", LLMPruneConfig), calibration="calib.txt")``.

    Args:
        calibration: a text file path, a list of texts, a ``datasets.Dataset`` with a ``text``
            column, a 1-D token-id stream or ``(N, L)`` token-id segments. Not needed for
            uniform magnitude pruning.
        tokenizer: for text calibration; default: loaded from the model's own directory.
        device: where each block is processed (e.g. ``'cuda'`` for a model kept on the CPU).
        rollback: keep the original weights until the run ends, so a failure leaves the
            model bit-identical (costs a CPU copy of the pruned weights).
        progress: show a progress bar over the blocks.

    Returns an :class:`LLMReport`; for ``'flap'`` and ``'shortgpt'`` (structures really removed
    by :mod:`secateurs.structural`) its :class:`~secateurs.structural.StructuralReport`.
    """
    unknown = set(options) - set(LLMPruneConfig.keys())
    if unknown:
        raise ConfigError(f"unknown argument(s) {sorted(unknown)}; valid: {choices(LLMPruneConfig.keys())}")
    config = LLMPruneConfig(method=method, sparsity=sparsity, **options)
    segments, seqlen = None, None
    if config.needs_calibration:
        if calibration is None:
            raise ConfigError(
                f"method {config.method!r}{' with OWL' if config.allocation == 'owl' else ''} needs calibration "
                "data: pass calibration='calib.txt' (CLI: --calib calib.txt)"
            )
        segments, seqlen = calibration_segments(model, calibration, tokenizer, config)
    if config.structural:
        from .structured import remove_structures

        return remove_structures(model, config, segments, progress)
    start = time.perf_counter()
    result = run(model, config, segments, device=device, rollback=rollback, show_progress=progress)
    seconds = time.perf_counter() - start
    report = build_report(model, result.targets, config.pattern_, config=config.to_dict())
    llm_report = LLMReport(
        report=report,
        blocks=result.blocks_name,
        block_sparsities=result.block_sparsities,
        layers=result.layers,
        seconds=seconds,
        calibration={"nsamples": int(segments.shape[0]), "seqlen": int(seqlen)} if segments is not None else {},
        outlier_ratios=result.outlier_ratios,
    )
    for layer in llm_report.dampening_raised:
        warnings.warn(
            f"SparseGPT: the Hessian of {layer.name} was not positive definite; dampening raised to "
            f"{layer.dampening:g} after {layer.retries} retr{'y' if layer.retries == 1 else 'ies'}",
            stacklevel=2,
        )
    return llm_report
