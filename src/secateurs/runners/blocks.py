"""The block runner: prune a model one repeated block at a time in bounded memory (LLMs).

As in SparseGPT (arXiv:2301.00774) and Wanda (arXiv:2306.11695): capture the first block's inputs
for every calibration batch, then for each block in turn gather its layers' statistics with hooks,
prune them (the same score -> allocate -> select -> apply stages as the whole-model runner), and
recompute the block's outputs *with the pruned weights*, which become the next block's inputs.
Only one block's activations are alive at a time (updated in place), so peak memory is one block
plus the calibration activations. An allocation that observes the dense model (OWL) gets a dense
pass over every block first, as OWL's reference code measures before pruning.

Everything that can be refused is checked before the first weight changes; the original weights
of processed blocks are kept (on the CPU) until the run ends, so an error or an interrupt puts the
model back bit-identical (``rollback=False`` saves that copy).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ..batches import model_device, to_device
from ..blocks import BlockDiscoveryError, BlockInputs, Call, block_owners, capture_inputs, find_blocks
from ..collapse import collapsed_targets, refuse_collapse
from ..config import Plan, PruneConfig
from ..distributed import Group, OwnerSolver, reduce_evidence
from ..distributed import gather_block as gather_block_ranks
from ..errors import ScopeError
from ..evidence import Evidence, Need, gather_block
from ..masking import Rollback
from ..pipeline import Context, Data, apply, check, decide, refuse_lower, seeded
from ..progress import progress as progress_bar
from ..report import LayerResult, Report, RunDetails, build_report
from ..runner import implements
from ..scope import ScopeSpec, Target, resolve
from .model import layer_sparsities


@implements("blocks")
def run_blocks(model: nn.Module, config: PruneConfig, data: Data) -> Report:
    """The block runner: one repeated block at a time, with recomputed inputs."""
    container, blocks, scoped, outside = block_targets(model, config)
    plans = config.plans(scoped)
    targets = [t for plan in plans for t in plan.targets]  # an override at sparsity 0 leaves its layers alone
    check(plans, config, data)
    refuse_lower(plans, config, config.final_sparsity)
    owner = block_owners(blocks)
    per_block: list[list[Target]] = [[] for _ in blocks]
    for t in targets:
        per_block[owner[id(t.module)]].append(t)
    device = data.device if data.device is not None else model_device(model)
    layer_of = {t.name: f"{container}.{owner[id(t.module)]}" for t in targets}
    context = Context(all_targets={id(p): p.targets for p in plans}, layer_of=layer_of)
    start = time.perf_counter()
    solved: list[LayerResult] = []
    allocated: dict[str, float] = {}
    rollback = Rollback(config.application_.writes_weights)
    was_training = model.training
    model.eval()
    try:
        observed = {t.name for t in config.observed_targets(plans)}
        if observed:
            watched = [[t for t in group if t.name in observed] for group in per_block]
            context.observed = _observe(model, blocks, watched, config, data, device, layer_of)
        needs = config.target_needs(plans)
        inputs = _capture(model, blocks, data.batches, device) if config.needs else None
        for i, block in enumerate(progress_bar(blocks, f"{config.criterion_.name} blocks", data.show_progress)):
            if data.rollback:
                rollback.save(per_block[i])
            with on_device(block, device):
                results, sparsities = prune_block(
                    block, i, per_block[i], plans, inputs, config, context, needs, data.group
                )
                solved += results
                allocated.update(sparsities)
                if inputs is not None and i + 1 < len(blocks):
                    propagate(block, i, inputs)
        if not data.allow_collapse:  # inside the try: a refusal puts the original weights back
            refuse_collapse(collapsed_targets(targets), None, restored=data.rollback)
    except BaseException:
        rollback.restore()
        raise
    finally:
        model.train(was_training)
    patterns = {t.name: plan.pattern for plan in plans for t in plan.targets}
    details = RunDetails(
        runner="blocks", blocks=container, layer_sparsities=layer_sparsities(allocated, layer_of),
        observed=context.observed, solved=solved, seconds=time.perf_counter() - start, outside_blocks=outside,
    )  # fmt: skip
    return build_report(model, targets, patterns, None, config.to_dict(), details)


def block_targets(
    model: nn.Module, config: PruneConfig, allow_meta: bool = False
) -> tuple[str, list[nn.Module], list[Target], list[str]]:
    """The blocks, the weights the scope selects inside them, and the names of those it selects outside.

    Layers outside the blocks (an LM head, a pooler) are not what the block runner prunes: with the
    front door's ``include`` (everything) they stay dense and the report names them; include patterns
    that select one are refused rather than silently half-applied. ``allow_meta``: blocks still on disk (meta)."""
    name, blocks = find_blocks(model, config.blocks)
    owner = block_owners(blocks)
    scoped = resolve(model, config.scope_, allow_meta)
    inside = [t for t in scoped if id(t.module) in owner]
    outside = [t.name for t in scoped if id(t.module) not in owner]
    if outside and config.scope_.include != ScopeSpec().include:
        shown = ", ".join(outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
        raise ScopeError(
            f"the scope includes {shown}, outside the blocks {name!r} that runner='blocks' prunes one at a time; "
            "exclude them (scope exclude), or prune them with runner='model'"
        )
    if not inside:
        raise BlockDiscoveryError(
            f"the scope selects no prunable layer inside the blocks {name!r}; check scope include/exclude"
        )
    return name, blocks, inside, outside


def prune_block(
    block: nn.Module, index: int, targets: list[Target], plans: Sequence[Plan], inputs: BlockInputs | None,
    config: PruneConfig, context: Context, needs: dict[str, frozenset[Need]], group: Group | None = None,
) -> tuple[list[LayerResult], dict[str, float]]:  # fmt: skip
    """Prune one block's ``targets`` from its captured ``inputs``. Under a distributed ``group`` the inputs are
    this rank's shard: the statistics are added over the ranks, and each layer is solved on one rank."""
    if not targets:
        return [], {}
    mine = {t.name for t in targets}
    activations, hessians = {}, {}
    if inputs is not None:
        gather = gather_block if group is None else partial(gather_block_ranks, group)
        activations, hessians = gather(block, index, targets, inputs, needs)
    solver = OwnerSolver(config.solver_, group) if group is not None and config.solver_ is not None else None
    evidence = Evidence(model=block, targets=targets, activations=activations, hessians=hessians,
                        generator=seeded(config, index), show_progress=False)  # fmt: skip
    pairs = [(plan, [t for t in plan.targets if t.name in mine]) for plan in plans]
    results, sparsities = apply(decide(pairs, evidence, config, config.final_sparsity, context), config, solver)
    config.application_.finish(targets)
    return results, sparsities


def _observe(
    model: nn.Module, blocks: list[nn.Module], per_block: list[list[Target]], config: PruneConfig, data: Data,
    device: torch.device, layer_of: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """A dense pass over every block for an allocation that observes the model before pruning (OWL)."""
    allocation = config.allocation_
    inputs = _capture(model, blocks, data.batches, device)
    observed: dict[str, Any] = {}
    for i, block in enumerate(progress_bar(blocks, f"{allocation.name} observations", data.show_progress)):
        with on_device(block, device):
            if per_block[i]:
                activations, hessians = gather_block(block, i, per_block[i], inputs, allocation.needs)
                if data.group is not None:
                    reduce_evidence(data.group, activations, hessians, f"block {i} {allocation.name} observations")
                evidence = Evidence(model=block, targets=per_block[i], activations=activations, hessians=hessians)
                observed.update(allocation.observe(per_block[i], evidence, layer_of))
            if i + 1 < len(blocks):
                propagate(block, i, inputs)
    return observed


def _move_call(call: Call, device: torch.device) -> Call:
    return Call(call.hidden_in_kwargs, to_device(call.args, device), to_device(call.kwargs, device))


def to_device_inputs(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """Put the captured activations and calls on the device blocks are processed on."""
    moved: dict[int, Call] = {}  # batches that share one call object (masks, positions) move it once
    for c in inputs.calls:
        if id(c) not in moved:
            moved[id(c)] = _move_call(c, device)
    calls = [moved[id(c)] for c in inputs.calls]
    own = {i: {s: _move_call(c, device) for s, c in per.items()} for i, per in inputs.own_calls.items()}
    return BlockInputs([h.to(device) for h in inputs.hidden], calls, own)


def _capture(model: nn.Module, blocks: list[nn.Module], batches: list[Any], device: torch.device) -> BlockInputs:
    home = model_device(model)
    inputs = capture_inputs(model, blocks, [to_device(b, home) for b in batches])
    return to_device_inputs(inputs, device) if device != home else inputs


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


def prune_block_alone(model: nn.Module, config: PruneConfig, data: Data, index: int, inputs: BlockInputs) -> None:
    """Prune only block ``index`` on ``inputs`` (its captured inputs), the other blocks untouched: the
    sensitivity analysis's local mode, which scores a block by its reconstruction error on its own inputs.
    No rollback: the caller runs it inside a :func:`secateurs.trial`."""
    container, blocks, scoped, _ = block_targets(model, config)
    owner = block_owners(blocks)
    mine = [t for t in scoped if owner[id(t.module)] == index]
    plans = config.plans(mine)
    check(plans, config, data)
    layer_of = {t.name: f"{container}.{index}" for t in mine}
    context = Context(all_targets={id(p): p.targets for p in plans}, layer_of=layer_of)
    device = data.device if data.device is not None else model_device(model)
    with on_device(blocks[index], device):
        prune_block(blocks[index], index, mine, plans, inputs, config, context, config.target_needs(plans))
