"""Prune a Hugging Face LLM larger than memory, one block at a time, from its safetensors files on disk.

The model is built as an empty skeleton (``accelerate.init_empty_weights``: every weight on the meta
device); only the embeddings, the final norm and the LM head are read in, plus the calibration
activations. Then each repeated block in turn is read from the memory-mapped safetensors
(``safe_open``, one file handle per block, closed after), pruned by the block runner's own stages
(:func:`secateurs.runners.blocks.prune_block`: statistics from its captured inputs, score, allocate,
select, apply), run over the calibration activations to give the next block's inputs, written to its
own output shard and freed (back to the meta device, and the heap's freed pages handed back to the system:
:func:`secateurs.memory.release_freed_memory`). Peak memory is one block, its statistics and the resident
tensors -- not the model. An allocation that observes the dense model (OWL) gets a dense pass over every
block from disk first.

Every finished block leaves, in a work directory beside the output (``<out>.partial``), its shard, the
activations it produced and a manifest written atomically last; an interrupted run started again with
the same arguments resumes after the last finished block and gives the same bytes as an uninterrupted
one. The output directory appears only when every shard is written (an atomic rename), as a sharded
checkpoint ``from_pretrained`` loads (``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .analysis.measured import measures
from .blocks import BlockInputs, capture_inputs
from .distributed import fingerprint
from .errors import ConfigError, StateError
from .evidence import Evidence, gather_block
from .io import atomic_path, move_dir_into_place, refuse_existing
from .llm.api import calibration_segments
from .llm.config import LLMPruneConfig
from .memory import release_freed_memory
from .ondisk import INDEX, Checkpoint, onload, skeleton
from .pipeline import Context, Data, check
from .progress import progress as progress_bar
from .runners.blocks import block_targets, propagate, prune_block, to_device_inputs
from .scope import resolve

MANIFEST = "manifest.json"


class OutOfSpaceError(StateError, OSError):
    """The output location has not enough free space for the pruned model."""


@dataclass
class OutOfCoreResult:
    """What an out-of-core run wrote."""

    output: str
    blocks: int
    resumed_from: int  # the first block this call pruned (0: a fresh run)
    seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)  # per pruned weight: name, sparsity, solver info

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stand(nn.Module):
    """Stands in for a block still on disk while the first block's inputs and every block's calls are recorded.
    It hands its hidden states on unchanged, shaped as the first (real) block returned them: the forward goes
    on to the next block's call at no cost (the calls -- masks, positions -- depend on shapes, not values),
    and attribute lookups (a layer's attention type) answer as the block it stands for."""

    def __init__(self, first_output: list, stands_for: nn.Module) -> None:
        super().__init__()
        self._pair = (first_output, stands_for)  # a tuple: not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        shaped = self._pair[0][0]
        if isinstance(shaped, tuple):
            return (hidden, *shaped[1:])
        if isinstance(shaped, list):
            return [hidden, *shaped[1:]]
        if isinstance(shaped, Tensor):
            return hidden
        raise ConfigError(
            f"the first block returned a {type(shaped).__name__}; out-of-core pruning reads blocks returning the "
            "hidden states (a tensor or a tuple starting with them)"
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_pair"][1], name)


def _keep_first(store: list):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not store:
            store.append(output)

    return hook


def _capture(
    model: nn.Module, container: str, blocks: list, batches: list[Tensor], checkpoint: Checkpoint
) -> BlockInputs:
    """The first block's inputs and every block's calls, from one forward per batch shape through the first block
    (read from disk for this, and freed after) and its stand-ins."""
    onload(model, f"{container}.0.", checkpoint, torch.device("cpu"))
    stack = model.get_submodule(container)
    first_output: list = []
    keep = blocks[0].register_forward_hook(_keep_first(first_output))
    stands = [blocks[0]] + [_Stand(first_output, b) for b in blocks[1:]]
    for i, s in enumerate(stands):
        stack[i] = s
    try:
        return capture_inputs(model, stands, batches)
    finally:
        keep.remove()
        for i, b in enumerate(blocks):
            stack[i] = b
        blocks[0].to("meta")


# -- resume state ----------------------------------------------------------------------------------------
def _save_inputs(path: Path, inputs: BlockInputs) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, overwrite=True) as tmp:
        save_file({f"hidden.{b}": h.detach().cpu().contiguous() for b, h in enumerate(inputs.hidden)}, str(tmp))


def _load_inputs(path: Path, inputs: BlockInputs) -> None:
    from .loading import load_safetensors

    saved = load_safetensors(path)
    for b in range(len(inputs.hidden)):
        inputs.hidden[b] = saved[f"hidden.{b}"].to(inputs.hidden[b].device, inputs.hidden[b].dtype)


def _write_json(path: Path, value: Any) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(value, indent=1, default=str))


def check_space(where: Path, needed: int, have: int = 0) -> None:
    """Refuse before the long work when ``where`` lacks ``needed`` bytes (``have``: already written there)."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed - have > free:
        raise OutOfSpaceError(
            f"the pruned model needs {needed / 2**30:.2f} GiB at {where} ({(needed - have) / 2**30:.2f} GiB still to "
            f"write) and only {free / 2**30:.2f} GiB is free there; free some space or choose another output"
        )


# -- the run ---------------------------------------------------------------------------------------------
def prune_from_disk(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "wanda",
    sparsity: float | None = None,
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    after_block: Callable[[int], None] | None = None,
    **options: Any,
) -> OutOfCoreResult:
    """Prune the safetensors model in ``model_dir`` block by block into ``out`` without loading it whole.

    ``method``, ``sparsity`` and ``options`` are :func:`~secateurs.llm.prune_llm`'s (an
    :class:`~secateurs.llm.LLMPruneConfig`); the pruned weights are written with their zeros (mode
    ``bake`` or ``reconstruct``). ``device``: where each block is processed (``'cuda'``: the block and the
    calibration activations on the GPU, the rest on the CPU). A run interrupted after some blocks resumes
    from its work directory ``<out>.partial`` when called again with the same model, configuration and
    calibration (anything else is refused; delete the directory to start over). ``after_block(i)`` is called
    once block ``i`` is safely on disk.
    """
    start_time = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    LLMPruneConfig.check_keywords(options, "prune_from_disk()")
    config = LLMPruneConfig(method=method, sparsity=sparsity, **options)
    _refuse_unsupported(config)
    refuse_existing(out, overwrite)
    checkpoint = Checkpoint(model_dir)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model, container, blocks = skeleton(model_dir, checkpoint, config.blocks)
    run = _RunPlans.of(model, config)  # a scope reaching outside the blocks: refused now
    batches: list[Tensor] = []
    if config.needs:
        if calibration is None:
            raise ConfigError(f"{config.describe_needs(config.needs)} needs calibration data: pass calibration=...")
        segments, _ = calibration_segments(model, calibration, tokenizer, config)
        batches = list(segments.split(config.batch_size))
    work = out.with_name(out.name + ".partial")
    stamp = {"model": checkpoint.fingerprint(), "config": fingerprint(config.to_dict()),
             "calibration": fingerprint(torch.cat(batches)) if batches else None, "blocks": len(blocks)}  # fmt: skip
    check_space(work, sum(checkpoint.nbytes.values()), _written(work))  # before the work directory is made
    manifest = _resume_state(work, stamp)
    if config.allocation_.needs and manifest.get("observed") is None:  # OWL: a dense pass over every block first
        manifest["observed"] = _observe(model, container, blocks, checkpoint, config, run, batches, device, progress)
        _write_json(work / MANIFEST, manifest)
    run.observed = manifest.get("observed") or {}
    inputs = _capture(model, container, blocks, batches, checkpoint) if batches else None
    if inputs is not None and device != torch.device("cpu"):
        inputs = to_device_inputs(inputs, device)
    first = manifest["finished"] + 1
    if first > 0 and inputs is not None:
        _load_inputs(work / manifest["activations"], inputs)
    for i in progress_bar(range(first, len(blocks)), f"{config.criterion_.name} blocks (from disk)", progress):
        manifest["layers"] += _prune_one(model, container, blocks[i], i, checkpoint, config, run, inputs, device, work)
        previous = manifest.get("activations")
        if inputs is not None and i + 1 < len(blocks):
            manifest["activations"] = f"activations-{i:05d}.safetensors"
            _save_inputs(work / manifest["activations"], inputs)
        manifest["finished"] = i
        _write_json(work / MANIFEST, manifest)  # last: the block counts as done only once all of it is on disk
        if previous and previous != manifest.get("activations"):
            (work / previous).unlink(missing_ok=True)
        release_freed_memory()  # else the heap keeps every block's freed pages: 4.5 GiB resident for 8 GB read
        if after_block is not None:
            after_block(i)
    _finish(model, container, checkpoint, model_dir, work, out, overwrite)
    return OutOfCoreResult(str(out), len(blocks), first, time.perf_counter() - start_time, manifest["layers"])


def _refuse_unsupported(config: LLMPruneConfig) -> None:
    if config.runner_.name != "blocks":
        raise ConfigError(
            f"{config.method!r} runs on the whole model (runner={config.runner_.name!r}); out-of-core pruning goes "
            "one block at a time: use a block method (magnitude, wanda, sparsegpt ...)"
        )
    if config.mode_ not in ("bake", "reconstruct"):
        raise ConfigError(
            f"out-of-core pruning writes the pruned weights with their zeros; mode={config.mode_!r} keeps masks beside "
            "the weights: use mode='bake' (or 'reconstruct')"
        )
    if measures(config):
        raise ConfigError(
            "allocation 'sensitivity' without a profile measures one on the whole loaded model first, which "
            "out-of-core pruning never holds; measure it (secateurs analyze --calib ... --local) and pass "
            "allocation_options={'profile': ...} (CLI: --profile)"
        )


def _resume_state(work: Path, stamp: dict[str, Any]) -> dict[str, Any]:
    path = work / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("stamp") != stamp:
            raise StateError(
                f"{work} holds an interrupted run of another model, configuration or calibration; resume with the "
                "same arguments, or delete that directory to start over"
            )
        return manifest
    if work.exists() and any(work.iterdir()):
        raise StateError(f"{work} exists without a manifest (not a secateurs work directory?); delete or move it")
    work.mkdir(parents=True, exist_ok=True)
    return {"stamp": stamp, "finished": -1, "layers": [], "activations": None}


def _written(work: Path) -> int:
    return sum(p.stat().st_size for p in work.glob("block-*.safetensors")) if work.exists() else 0


@dataclass
class _RunPlans:
    """The whole run's targets (blocks on disk: meta), which an allocation sizes each block's layers against
    (ERK, OWL), each target's block, and the dense model's observations (OWL's outlier ratios)."""

    plans: list[Any]
    layer_of: dict[str, str]
    observed: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, config: LLMPruneConfig) -> _RunPlans:
        container, blocks, targets, _ = block_targets(model, config, allow_meta=True)
        owner = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
        return cls(config.plans(targets), {t.name: f"{container}.{owner[id(t.module)]}" for t in targets})

    def context(self, plans: list[Any]) -> Context:
        """A block's context: each of its plans sized against the same plan's targets over the whole run."""
        whole = {t.name: plan.targets for plan in self.plans for t in plan.targets}
        return Context(all_targets={id(p): whole[p.targets[0].name] for p in plans}, observed=self.observed,
                       layer_of=self.layer_of)  # fmt: skip


def _block_plans(model: nn.Module, block: nn.Module, config: LLMPruneConfig) -> list[Any]:
    """The plans of the block just read (its targets resolved on its real weights)."""
    owned = {id(m) for m in block.modules()}
    return config.plans([t for t in resolve(model, config.scope_, allow_meta=True) if id(t.module) in owned])


def _observe(
    model: nn.Module, container: str, blocks: list, checkpoint: Checkpoint, config: LLMPruneConfig, run: _RunPlans,
    batches: list[Tensor], device: torch.device, show: bool,
) -> dict[str, Any]:  # fmt: skip
    """The dense pass an observing allocation (OWL) needs before anything is pruned: every block read, observed
    and run over the activations, in turn. Its observations go into the manifest (plain data: a resumed run
    skips this pass), so an allocation whose observations are not plain data is refused."""
    allocation = config.allocation_
    watched = {t.name for t in config.observed_targets(run.plans)}
    inputs = _capture(model, container, blocks, batches, checkpoint)
    if device != torch.device("cpu"):
        inputs = to_device_inputs(inputs, device)
    observed: dict[str, Any] = {}
    for i in progress_bar(range(len(blocks)), f"{allocation.name} observations (from disk)", show):
        onload(model, f"{container}.{i}.", checkpoint, device)
        try:
            targets = [t for p in _block_plans(model, blocks[i], config) for t in p.targets if t.name in watched]
            if targets:
                activations, hessians = gather_block(blocks[i], i, targets, inputs, allocation.needs)
                evidence = Evidence(model=blocks[i], targets=targets, activations=activations, hessians=hessians)
                observed.update(allocation.observe(targets, evidence, run.layer_of))
            if i + 1 < len(blocks):
                propagate(blocks[i], i, inputs)
        finally:
            blocks[i].to("meta")
        release_freed_memory()
    if json.loads(json.dumps(observed, default=repr)) != observed:
        raise ConfigError(
            f"allocation {allocation.name!r} observes values that are not plain data (numbers, strings), which an "
            "out-of-core run keeps in its manifest to resume; prune in memory"
        )
    return observed


def _prune_one(
    model: nn.Module, container: str, block: nn.Module, index: int, checkpoint: Checkpoint, config: LLMPruneConfig,
    run: _RunPlans, inputs: BlockInputs | None, device: torch.device, work: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """Read block ``index``, prune it, propagate the activations, write its shard, free it."""
    from safetensors.torch import save_file

    prefix = f"{container}.{index}."
    onload(model, prefix, checkpoint, device)
    try:
        plans = _block_plans(model, block, config)
        targets = [t for plan in plans for t in plan.targets]
        check(plans, config, Data(batches=[inputs] if inputs is not None else []))
        context = run.context(plans)
        results, _ = prune_block(block, index, targets, plans, inputs, config, context, config.target_needs(plans))
        if inputs is not None:
            propagate(block, index, inputs)
        state = {prefix + k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        state = {k: v for k, v in state.items() if k in checkpoint.files}  # what the checkpoint stores, no more
        with atomic_path(work / f"block-{index:05d}.safetensors", overwrite=True) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        solved = {r.name: r for r in results}
        layers = []
        for t in targets:
            weight = state[t.name]
            r = solved.get(t.name)
            layers.append({"name": t.name, "sparsity": float((weight == 0).double().mean()),
                           "dampening": None if r is None else r.dampening,
                           "retries": 0 if r is None else r.retries})  # fmt: skip
        return layers
    finally:
        block.to("meta")  # free the block: its weights are on disk now


def _finish(
    model: nn.Module, container: str, checkpoint: Checkpoint, model_dir: Path, work: Path, out: Path, overwrite: bool
) -> None:
    """The tensors outside the blocks, the index and the model's other files; then the work directory becomes
    the output in one rename."""
    from safetensors.torch import save_file

    state = model.state_dict()
    rest = {k: state[k].detach().cpu().contiguous() for k in checkpoint.files if not k.startswith(container + ".")}
    with atomic_path(work / "rest.safetensors", overwrite=True) as tmp:
        save_file(rest, str(tmp), metadata={"format": "pt"})
    weight_map = {k: "rest.safetensors" for k in rest}
    for k in checkpoint.files:
        if k.startswith(container + "."):
            weight_map[k] = f"block-{int(k[len(container) + 1 :].split('.')[0]):05d}.safetensors"
    size = sum(checkpoint.nbytes.values())
    _write_json(work / INDEX, {"metadata": {"total_size": size}, "weight_map": weight_map})
    for entry in model_dir.iterdir():  # config, generation config, tokenizer
        if entry.is_file() and not entry.name.endswith(".safetensors") and entry.name != INDEX:
            shutil.copy2(entry, work / entry.name)
    for stale in work.glob("activations-*.safetensors"):
        stale.unlink()
    (work / MANIFEST).unlink()
    move_dir_into_place(work, out, overwrite)


__all__ = ["Checkpoint", "OutOfCoreResult", "OutOfSpaceError", "check_space", "prune_from_disk"]
