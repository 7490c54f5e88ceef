"""``prune_llm()``: one call to prune a Hugging Face causal or masked LM, the one pipeline's LLM front door.

It turns calibration text into token segments (the SparseGPT / Wanda protocol) and runs an
:class:`LLMPruneConfig` through its runner: the block runner for masks, zeros and reconstruction
(magnitude, Wanda, SparseGPT, any registered criterion; OWL allocation), the whole-model runner
for structural removal (FLAP, ShortGPT).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis.measured import measure_profile, measures
from ..batches import model_device
from ..blocks import batched
from ..calibration import model_tokenizer as _default_tokenizer
from ..calibration import resolve_seqlen, sample_segments
from ..distributed import Group, agree, detect, fingerprint, shard
from ..errors import ConfigError, DataRequiredError
from ..evidence import DATA_NEEDS, HOOKED, Need
from ..guards import outside_inference_mode
from ..pipeline import Data
from ..report import Report
from ..runners import run
from ..structural.criteria import as_group_criterion
from ..structural.report import StructuralReport
from .config import LLMPruneConfig
from .moe import MoEBlock, expert_statistics, find_moe_blocks, starved_experts, unfused_experts


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


def ready_batches(calibration: Any, config: LLMPruneConfig) -> list[Any] | None:
    """Calibration that is already model inputs (images, dicts, a list of batches), or None for text and
    token ids (cut into segments)."""
    if isinstance(calibration, Tensor) and calibration.is_floating_point():
        return list(batched(calibration[: config.nsamples], config.batch_size))
    if (
        isinstance(calibration, (list, tuple))
        and calibration
        and all(
            isinstance(b, (Tensor, Mapping)) or (isinstance(b, (list, tuple)) and b and isinstance(b[0], Tensor))
            for b in calibration
        )
    ):
        return list(calibration)
    return None


@outside_inference_mode
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
    allow_collapse: bool = False,
    process_group: Any = None,
    **options: Any,
) -> Report | StructuralReport:
    """Prune a transformer in place, one block at a time, and report what changed.

    ``options`` are the other :class:`LLMPruneConfig` fields (``pattern``, ``allocation``,
    ``allocation_options``, ``mode``, ``solver``, ``solver_options``, ``nsamples``, ``seqlen``,
    ``batch_size``, ``seed``, ``blocks``, ``scope``, ``overrides``, ``method_options`` ...), so a recipe maps
    one to one: ``prune_llm(model, **load_recipe("r.yaml", LLMPruneConfig), calibration="calib.txt")``.

    Args:
        calibration: a text file path, a list of texts, a ``datasets.Dataset`` with a ``text``
            column, a 1-D token-id stream or ``(N, L)`` token-id segments; or, for models that do
            not read tokens (a ViT), a float tensor of inputs (split into ``batch_size`` batches) or
            a list of ready batches (tensors or dicts of them). Not needed for uniform magnitude
            pruning.
        tokenizer: for text calibration; default: loaded from the model's own directory.
        device: where each block is processed (e.g. ``'cuda'`` for a model kept on the CPU).
        rollback: keep the original weights until the run ends, so a failure leaves the
            model bit-identical (costs a CPU copy of the pruned weights).
        progress: show a progress bar over the blocks.
        allow_collapse: accept a layer left with no weight (a :class:`~secateurs.LayerCollapseError`
            otherwise, raised before the model changes).
        process_group: spread the run over these ``torch.distributed`` ranks; by default the initialised
            default group, or one started from ``torchrun``'s environment (gloo on CPU, NCCL for a CUDA
            ``device``). Each rank calibrates on its share of the segments, statistics are added over the
            ranks and each layer is solved on one rank (:mod:`secateurs.distributed`); every rank ends with
            the same pruned model. A single process runs as before.

    ``allocation='sensitivity'`` without ``allocation_options['profile']`` measures the blocks' profile first, on
    the same calibration batches, by default scoring each block by its reconstruction error on its own dense
    inputs (``local=True``, fast: no whole-model pass per cell); ``report.config['allocation_options']`` holds it.
    A learned alternative is :func:`~secateurs.llm.search_allocation` (``secateurs prune --search spdy``).

    Returns a :class:`~secateurs.Report` (its ``details`` say the blocks, per-block sparsities, OWL's
    outlier ratios and SparseGPT's dampening); for removal (``'flap'``, ``'shortgpt'``) the
    :class:`~secateurs.structural.StructuralReport`.
    """
    LLMPruneConfig.check_keywords(options, "prune_llm()")
    group = detect(process_group, device)
    if group is not None:  # before the config is checked: a rank refusing alone would leave the others waiting
        agree(group, run_fingerprint(model, method, sparsity, options, calibration))
        progress = progress and group.writer  # one progress bar, not one per rank
    config = LLMPruneConfig(method=method, sparsity=sparsity, **options)
    batches: list[Tensor] = []
    calibrated: dict[str, int] = {}
    needs = config.needs & DATA_NEEDS
    if needs:
        if calibration is None:
            raise ConfigError(
                f"{config.describe_needs(needs)} needs calibration data: pass calibration='calib.txt' "
                "(CLI: --calib calib.txt)"
            )
        given = ready_batches(calibration, config)
        if given is not None:
            batches = given
            calibrated = {"batches": len(batches)}
        else:
            segments, seqlen = calibration_segments(model, calibration, tokenizer, config)
            batches = list(batched(segments, config.batch_size))
            calibrated = {"nsamples": int(segments.shape[0]), "seqlen": int(seqlen)}
    data = Data.from_user(config, batches, None, None, progress, allow_collapse)  # example inputs: the first segment
    experts = find_moe_blocks(model, fused_only=True)  # unknown fused experts are refused before anything changes
    if measures(config):  # allocation='sensitivity' without a profile: measured now on these very batches
        _refuse_measuring(model, group, experts, config, device)
        config = measure_profile(model, config, data)
    if group is not None:
        data.batches = _shard(data.batches, group, config)
    data.group = group
    data.device = torch.device(device) if device is not None else None
    data.rollback = rollback
    if experts and config.mode_ != "remove":
        if group is not None:  # each rank would count routed tokens on its own shard and pick its own fallbacks
            raise ConfigError(
                f"{experts[0].name!r} holds fused mixture-of-experts weights, which a distributed run does not "
                f"split yet; prune this model in one process (without torchrun / process_group)"
            )
        report = _prune_with_experts(model, config, data, experts, batches, method, sparsity, options)
    else:
        report = run(model, config, data)
    if isinstance(report, StructuralReport):
        report.calibration = calibrated
    if isinstance(report, Report):
        report.details.calibration = calibrated
        for layer in report.dampening_raised:
            warnings.warn(
                f"the Hessian of {layer.name} was not positive definite; dampening raised to "
                f"{layer.dampening:g} after {layer.retries} retr{'y' if layer.retries == 1 else 'ies'}",
                stacklevel=2,
            )
    return report


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when the current device is 0."""

    def indexed(d: torch.device) -> torch.device:
        if d.type == "cuda" and d.index is None:
            return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return d

    return indexed(a) == indexed(b)


def _refuse_measuring(
    model: nn.Module,
    group: Group | None,
    experts: list[MoEBlock],
    config: LLMPruneConfig,
    device: torch.device | str | None,
) -> None:
    """An on-the-fly sensitivity profile is measured in one process on the model as it is, where it is."""
    where = None
    own = model_device(model)
    if group is not None:
        where = f"a distributed run ({group.world} ranks) would measure it once per rank"
    elif device is not None and not _same_device(torch.device(device), own):
        where = (
            f"its cells run where the model is ({own}), not on device={str(device)!r} where the blocks are pruned "
            f"(move the model to {str(device)!r} first if it fits, or expect a slow measurement there)"
        )
    elif experts and config.mode_ != "remove":
        where = f"{experts[0].name!r} holds fused mixture-of-experts weights, which the analysis does not unfuse"
    if where is not None:
        raise ConfigError(
            f"allocation 'sensitivity' without a profile measures one before pruning, but {where}; measure it first "
            "(secateurs.analysis.sensitivity, or search_allocation / `secateurs prune --search spdy`) and pass "
            "allocation_options={'profile': ...}"
        )


def run_fingerprint(model: nn.Module, method: str, sparsity: Any, options: Mapping[str, Any], calibration: Any) -> dict:
    """What every rank of a distributed run must agree on: the model's weights, the configuration as given
    and the calibration (a text file by its contents)."""
    if isinstance(calibration, (str, os.PathLike)) and os.path.isfile(calibration):
        with open(calibration, "rb") as handle:
            described: Any = hashlib.sha256(handle.read()).hexdigest()
    elif isinstance(calibration, Tensor):
        described = fingerprint(calibration)
    elif isinstance(calibration, (list, tuple)):
        described = [fingerprint(b) if isinstance(b, Tensor) else b for b in calibration]
    else:
        described = repr(calibration)
    config = {"method": method, "sparsity": sparsity, **options}
    return {"model": fingerprint(model), "config": fingerprint(config), "calibration": fingerprint(described)}


def _shard(batches: list[Any], group: Group, config: LLMPruneConfig) -> list[Any]:
    """This rank's share of the batches; refused for a method whose statistics are not sums added over ranks."""
    refusal = _not_distributable(config)
    if refusal:
        raise ConfigError(
            f"a distributed run ({group.world} ranks) adds statistics over the ranks; {refusal}: run it in one process"
        )
    return shard(batches, group) if batches else batches


def _not_distributable(config: LLMPruneConfig) -> str | None:
    """Why ``config`` cannot spread its calibration over ranks (None: it can). The block runner's evidence and a
    removal's hooked statistics (FLAP) are sums with counts, added over the ranks; a removal criterion running
    its own passes declares whether it adds them (``passes_add_over_ranks``: ShortGPT)."""
    if config.runner_.name == "blocks":
        return None
    if not config.application_.structural:
        return f"{config.method!r} runs on the whole model (runner={config.runner_.name!r})"
    criterion = as_group_criterion(config.criterion_)
    own = criterion.needs - HOOKED
    if own and not (own == {Need.DATA_PASSES} and criterion.passes_add_over_ranks):
        return f"removal by {criterion.name!r} reads {sorted(n.value for n in own)}, which are not added over ranks"
    solver = config.solver_
    if solver is not None and solver.needs - HOOKED:
        return f"solver {solver.name!r} reads {sorted(n.value for n in solver.needs - HOOKED)}, not added over ranks"
    return None


def _prune_with_experts(
    model: nn.Module, config: LLMPruneConfig, data: Data, experts: list[MoEBlock], batches: list[Any],
    method: str, sparsity: float | None, options: dict[str, Any],
) -> Report:  # fmt: skip
    """Prune a mixture-of-experts model: every routed expert's slices are targets of their own (per-expert
    statistics over the tokens routed to it). An expert that saw fewer than ``min_expert_tokens`` calibration
    tokens is pruned by magnitude instead (at the same sparsity / pattern), and the report names it."""
    from dataclasses import replace

    from ..config import PruneConfig
    from ..scope import ScopeSpec

    if config.mode_ == "mask":
        raise ConfigError(
            "mode='mask' keeps a mask on every pruned weight, which the fused expert parameters of "
            f"{experts[0].name!r} cannot hold; prune this mixture-of-experts model with mode='bake' or 'reconstruct'"
        )
    starved: dict[str, int] = {}
    if batches and config.needs & DATA_NEEDS:
        starved = starved_experts(expert_statistics(model, batches, experts, outputs=False), experts,
                                  config.min_expert_tokens)  # fmt: skip
    # routers and shared-expert gates decide where tokens go: pruning them changes the routing, not one expert
    routers = tuple(
        f"{b.name}.{name}" for b in experts for name, child in b.block.named_children()
        if isinstance(child, nn.Linear) and (child is b.router or name.endswith("expert_gate"))
    )  # fmt: skip
    excluded = (*starved, *routers)
    if excluded:  # the same run without them; starved experts get the declared fallback below
        scope = config.scope
        if isinstance(scope, ScopeSpec):
            scope = replace(scope, exclude=(*scope.exclude, *excluded))
        elif isinstance(scope, Mapping):
            scope = {**scope, "exclude": (*ScopeSpec.from_value(dict(scope)).exclude, *excluded)}
        else:
            scope = {"include": ScopeSpec.from_value(scope).include, "exclude": excluded}
        config = LLMPruneConfig(method=method, sparsity=sparsity, **{**options, "scope": scope})
    given = config.to_dict()
    with unfused_experts(model, experts):
        extra = None
        if starved:  # first: a failure of either run leaves the fused experts unwritten (``unfused_experts``)
            # and the main run's own rollback restores everything else; starved experts are outside its scope
            fallback = PruneConfig(
                method="magnitude", sparsity=given.get("sparsity"), pattern=given.get("pattern"),
                mode="bake", scope={"include": tuple(starved), "skip_first": False, "skip_last": False},
            )  # fmt: skip
            extra = run(model, fallback, Data.from_user(fallback, [], None, None, False, data.allow_collapse))
        try:
            report = run(model, config, data)
        except DataRequiredError as error:
            if ".experts." not in str(error):
                raise
            raise DataRequiredError(
                f"{error}: an expert got no routed calibration tokens in the sequential pass (routing shifts as "
                "earlier blocks are pruned, so the dense count that picks the magnitude fallbacks can miss it); "
                "raise min_expert_tokens or pass more calibration text"
            ) from error
        if extra is not None:
            report.layers += extra.layers
            report.target_params += extra.target_params
            report.target_nonzeros += extra.target_nonzeros
            for name, tokens in starved.items():
                report.details.fallbacks[name] = (
                    f"{tokens} routed calibration tokens (< {config.min_expert_tokens or 'the hidden size'}): "
                    "pruned by magnitude at the run's sparsity instead of by " + repr(config.criterion_.name)
                )
    return report
