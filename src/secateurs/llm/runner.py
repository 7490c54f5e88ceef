"""The layerwise runner: prune a transformer one block at a time in bounded memory.

As in SparseGPT (arXiv:2301.00774) and Wanda (arXiv:2306.11695): capture the first block's
inputs for every calibration segment, then for each block in turn gather its layers' input
statistics with hooks, prune them, and recompute the block's outputs *with the pruned
weights*, which become the next block's inputs. Only one block's activations are alive at a
time (updated in place), so peak memory is one block plus the calibration activations.

Everything that can be refused is checked before the first weight changes; the original
weights of processed blocks are kept (on the CPU) until the run ends, so an error or an
interrupt puts the model back bit-identical (``rollback=False`` saves that copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..batches import model_device, to_device
from ..criteria import Wanda
from ..errors import DataRequiredError
from ..progress import progress as progress_bar
from ..scope import Target, resolve
from ..selection import check_finite
from .blocks import BlockDiscoveryError, BlockInputs, Call, batched, capture_inputs, find_blocks
from .config import LLMPruneConfig
from .methods import LayerResult, evidence_from
from .owl import outlier_ratio, owl_sparsities
from .stats import Needs, gather


@dataclass
class RunResult:
    """What the runner did: the blocks, their targets and per-layer results."""

    blocks_name: str
    targets: list[Target]
    block_sparsities: list[float]
    layers: list[LayerResult] = field(default_factory=list)
    outlier_ratios: list[float] | None = None


def block_targets(model: nn.Module, config: LLMPruneConfig) -> tuple[str, list[nn.Module], list[list[Target]]]:
    """The blocks and, per block, the weights the scope selects inside it (resolved once)."""
    name, blocks = find_blocks(model, config.blocks)
    targets = resolve(model, config.scope_)
    owners = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    grouped: list[list[Target]] = [[] for _ in blocks]
    for t in targets:
        if id(t.module) in owners:
            grouped[owners[id(t.module)]].append(t)
    if not any(grouped):
        raise BlockDiscoveryError(
            f"the scope selects no Linear/Conv1D layer inside the blocks {name!r}; check scope include/exclude"
        )
    return name, blocks, grouped


def validate(groups: list[list[Target]], config: LLMPruneConfig) -> None:
    """Pattern fit and finite weights, for every target, before anything changes."""
    for group in groups:
        for t in group:
            config.pattern_.check(t.name, t.canonical_shape, "row")
            check_finite(t.weight.detach(), f"weight {t.name}")


def _move_call(call: Call, device: torch.device) -> Call:
    return Call(call.hidden_in_kwargs, to_device(call.args, device), to_device(call.kwargs, device))


def _to(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """Put the captured activations and calls on the device blocks are processed on."""
    moved: dict[int, Call] = {}  # batches that share one call object (masks, positions) move it once
    for c in inputs.calls:
        if id(c) not in moved:
            moved[id(c)] = _move_call(c, device)
    calls = [moved[id(c)] for c in inputs.calls]
    own = {i: {s: _move_call(c, device) for s, c in per.items()} for i, per in inputs.own_calls.items()}
    return BlockInputs([h.to(device) for h in inputs.hidden], calls, own)


def capture(model: nn.Module, blocks: list[nn.Module], segments: Tensor, batch_size: int, device) -> BlockInputs:
    home = model_device(model)
    batches = [b.to(home) for b in batched(segments, batch_size)]
    inputs = capture_inputs(model, blocks, batches)
    return _to(inputs, device) if device != home else inputs


@contextlib.contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """Process a block on ``device`` and put it back where it lives (offloaded models)."""
    home = model_device(block)
    if home == device:
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def propagate(block: nn.Module, index: int, inputs: BlockInputs) -> None:
    """Replace each batch's hidden states by the block's output (in place: bounded memory)."""
    with torch.no_grad():
        for b in range(len(inputs.hidden)):
            inputs.hidden[b] = inputs.call(index, b).invoke(block, inputs.hidden[b])


def owl_pass(
    blocks: list[nn.Module], groups: list[list[Target]], inputs: BlockInputs, config: LLMPruneConfig, device, show
) -> tuple[list[float], list[float]]:
    """Outlier ratio of every block on the dense model (OWL measures before pruning)."""
    ratios = []
    criterion = Wanda()
    for i, block in enumerate(progress_bar(blocks, "OWL outlier ratios", show)):
        with on_device(block, device):
            stats = gather(block, i, groups[i], inputs, Needs.NORMS)
            scores = criterion.scores(evidence_from(stats, groups[i]))
            ratios.append(outlier_ratio(list(scores.values()), float(config.owl_m)))
            if i + 1 < len(blocks):
                propagate(block, i, inputs)
    return ratios, owl_sparsities(ratios, config.sparsity, float(config.owl_lambda))


def run(
    model: nn.Module,
    config: LLMPruneConfig,
    segments: Tensor | None,
    device: torch.device | str | None = None,
    rollback: bool = True,
    show_progress: bool = True,
) -> RunResult:
    """Prune ``model`` in place, block by block. ``segments`` are ``(N, L)`` token ids."""
    name, blocks, groups = block_targets(model, config)
    validate(groups, config)
    device = torch.device(device) if device is not None else model_device(model)
    method = config.method_
    needs_data = config.needs_calibration
    if needs_data and segments is None:
        raise DataRequiredError(f"method {config.method!r} ({config.allocation} allocation) needs calibration data")
    sparsities = [config.sparsity] * len(blocks)
    result = RunResult(name, [t for g in groups for t in g], sparsities)
    was_training = model.training
    model.eval()
    backups: dict[str, Tensor] = {}
    try:
        if config.allocation == "owl":
            inputs = capture(model, blocks, segments, config.batch_size, device)
            result.outlier_ratios, sparsities = owl_pass(blocks, groups, inputs, config, device, show_progress)
            result.block_sparsities = sparsities
            del inputs
        inputs = None
        if method.needs is not Needs.NOTHING:
            inputs = capture(model, blocks, segments, config.batch_size, device)
        for i, block in enumerate(progress_bar(blocks, f"{config.method} blocks", show_progress)):
            if rollback:
                for t in groups[i]:
                    backups[t.name] = t.parameter.detach().to("cpu", copy=True)
            with on_device(block, device):
                stats = gather(block, i, groups[i], inputs, method.needs) if inputs is not None else None
                if groups[i]:
                    result.layers += method.prune(groups[i], stats, sparsities[i], config.pattern_)
                if inputs is not None and i + 1 < len(blocks):
                    propagate(block, i, inputs)
    except BaseException:
        _restore(result.targets, backups)
        raise
    finally:
        model.train(was_training)
    return result


def _restore(targets: list[Target], backups: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for t in targets:
            saved = backups.get(t.name)
            if saved is not None:
                t.parameter.copy_(saved.to(t.parameter.device))
