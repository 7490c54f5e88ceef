"""Layer sensitivity: prune one target at a time, alone, over a grid of sparsities, and measure.

Each *cell* (one target at one sparsity) is a :func:`secateurs.trial`: prune through the runners as
the front door does (any method, pattern, mode; channel removal for groups), measure the metric and the costs, and put
the model back exactly (Distiller's sensitivity analysis, done with the one pipeline instead of a
separate pruner). Targets are

- ``'layers'``: each weight tensor the scope selects (element, block or N:M patterns);
- ``'blocks'``: each repeated block (all its layers at once), whole-model metric or, with
  ``local=True``, the block's relative reconstruction error on its own captured dense inputs, so an
  LLM is analysed one block at a time without a forward pass of the whole model per cell;
- ``'groups'``: each group of coupled channels or heads, removed for real (``mode='remove'``),
  with measured parameters, MACs and latency: the latency table of a latency budget.

Cells are independent: they run in this process, in ``workers`` local processes
(``backend='processes'``), or as Ray tasks (``backend='ray'``, the ``ray`` extra). With ``out=dir``
every finished cell is appended to ``dir/cells.jsonl`` as it finishes, so an interrupted analysis
keeps what it finished and a rerun with the same settings only measures the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batches import default_loss, logits_of, model_device, model_inputs, run_model, take, to_device
from ..blocks import block_output, capture_inputs, find_blocks
from ..config import PruneConfig, _public
from ..errors import ConfigError
from ..evaluation import compare_latency, count_macs
from ..guards import outside_inference_mode
from ..io import write_text
from ..pipeline import Data
from ..progress import progress as progress_bar
from ..runners import run
from ..runners.blocks import prune_block_alone
from ..scope import ScopeSpec, resolve
from ..structural.graph import DependencyGraph
from ..structural.pipeline import candidate_groups
from ..threads import available_cores
from ..trials import trial
from .budget import solve_budget
from .expansion import relinearize as relinearized
from .expansion import solve_expansion
from .knapsack import BudgetError
from .profile import DEFAULT_GRID, Cell, Entry, SensitivityProfile, check_grid, check_metric, merged_cells

TARGETS = ("layers", "blocks", "groups")
COSTS = ("params", "macs", "latency")
BACKENDS = ("local", "processes", "ray")
Metric = Callable[[nn.Module], float]


class CellError(ConfigError):
    """A cell could not be measured (a NaN or non-scalar metric, a refused prune); the model is as it was."""


@dataclass
class _Spec:
    """Everything a cell needs, picklable for worker processes and Ray tasks."""

    method: str
    targets: str
    metric: Any  # a name or a callable
    costs: tuple[str, ...]
    options: dict[str, Any]
    calibration: list[Any]
    evaluation: list[Any]
    example_inputs: Any
    loss_fn: Any
    local: bool
    entries: list[Entry]
    block_index: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)  # dense MACs per module (mask modes)
    target_modules: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # entry -> (module, param)


# -- validation ------------------------------------------------------------------------------------
def _check(targets: str, metric: Any, costs: Sequence[str], backend: str, workers: int, local: bool) -> None:
    if targets not in TARGETS:
        raise ConfigError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    check_metric(metric)
    bad = [c for c in costs if c not in COSTS]
    if bad:
        raise ConfigError(f"costs must be among {', '.join(COSTS)}, got {bad[0]!r}")
    if "latency" in costs and targets != "groups":
        raise ConfigError("a latency cost needs targets='groups' (channel removal): masks do not change latency")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    if local and targets != "blocks":
        raise ConfigError("local=True (block reconstruction error) needs targets='blocks'")
    if local and (workers > 1 or backend != "local"):
        raise ConfigError(
            "local=True walks the blocks in order in one process (each block's inputs come from the one before); "
            "drop workers/backend, or use the whole-model metric (local=False) to run cells in parallel"
        )


def _own_keywords(targets: str, options: dict[str, Any]) -> None:
    """What every cell sets itself: its sparsity; for groups also the mode (removal) and the allocation (the
    one group). ``mode='remove'`` with groups says what the cells do anyway and is dropped."""
    if "sparsity" in options:
        raise ConfigError("sensitivity() sets each cell's sparsity from the grid: drop sparsity=, use sparsities=")
    if targets == "groups":
        if options.get("mode", "remove") != "remove":
            raise ConfigError(f"targets='groups' removes channels (mode='remove'); mode={options['mode']!r} does not "
                              "apply: drop mode=, or use targets='layers' for masks")  # fmt: skip
        options.pop("mode", None)
        if "allocation" in options:
            raise ConfigError("targets='groups' prunes one group per cell (its own allocation): drop allocation=")


# -- entries ---------------------------------------------------------------------------------------
def _entries(model: nn.Module, spec: _Spec) -> list[Entry]:
    options = spec.options
    if spec.targets == "groups":
        config = PruneConfig(method=spec.method, sparsity=0.5, mode="remove", **_prune_options(options))
        if spec.example_inputs is None:
            raise ConfigError("targets='groups' traces the model: pass example_inputs= (or calibration=)")
        graph = DependencyGraph(model, spec.example_inputs, gqa=config.structural_.gqa)
        groups = candidate_groups(graph, config.pattern_.kinds, config.scope_)
        return [Entry(g.name, "group", {g.name: [g.units]}, g.units) for g in groups]
    scoped = resolve(model, ScopeSpec.from_value(options.get("scope")))
    if spec.targets == "layers":
        return [Entry(t.module_name, "layer", {t.name: list(t.shape)}, t.numel) for t in scoped]
    container, blocks = find_blocks(model, options.get("blocks"))
    owner = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    entries = []
    for i in range(len(blocks)):
        inside = [t for t in scoped if owner.get(id(t.module)) == i]
        if inside:
            name = f"{container}.{i}" if container else str(i)
            spec.block_index[name] = i
            entries.append(Entry(name, "block", {t.name: list(t.shape) for t in inside}, sum(t.numel for t in inside)))
    if not entries:
        raise ConfigError(f"the scope selects no layer inside the blocks {container!r}")
    return entries


def _prune_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in ("blocks",) or v is not None}


# -- metrics ---------------------------------------------------------------------------------------
def _metric(model: nn.Module, spec: _Spec) -> float:
    metric = spec.metric
    if callable(metric):
        return metric(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if metric == "accuracy":
                right = total = 0
                for batch in spec.evaluation:
                    logits = logits_of(run_model(model, batch, "an evaluation batch"))
                    labels = batch[1].to(logits.device)
                    right += int((logits.argmax(-1) == labels).sum())
                    total += labels.numel()
                return right / max(total, 1)
            loss_fn = spec.loss_fn or default_loss
            losses = [float(loss_fn(model, batch)) for batch in spec.evaluation]
            mean = math.fsum(losses) / len(losses)
            return math.exp(mean) if metric == "perplexity" else mean
    finally:
        model.train(was_training)


def _checked(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise CellError(f"the metric returned a tensor of shape {list(value.shape)} at {where}; return a scalar")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CellError(f"the metric returned {type(value).__name__} at {where}; return a float")
    if not math.isfinite(value):
        raise CellError(f"the metric returned {value} at {where} (the model was left as it was); check the metric")
    return float(value)


# -- one cell --------------------------------------------------------------------------------------
def _nonzeros(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in _effective_weights(model))


def _effective_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as the forward pass sees it (a masked weight with its mask applied)."""
    out = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name in ("original",) or ".original" in name:
                continue
            out.append(p)
        params = getattr(module, "parametrizations", None)
        if params is not None:
            out += [getattr(module, n) for n in params]
    return out


def _measure_cell(
    model: nn.Module,
    spec: _Spec,
    entry: Entry,
    sparsity: float,
    dense: dict[str, Any],
    twin: nn.Module | None = None,
    inputs: Any = None,
) -> Cell:
    where = f"cell {entry.name!r} at sparsity {sparsity:g}"
    start = time.perf_counter()
    with trial(model):
        try:
            _prune_one(model, spec, entry, sparsity, inputs)
        except ConfigError as e:
            raise CellError(f"{where}: {e}") from e
        value = _local_error(model, spec, entry, inputs) if spec.local else _checked(_metric(model, spec), where)
        cell = Cell(entry.name, sparsity, value)
        if "params" in spec.costs:
            cell.params = _nonzeros(model)
        if "macs" in spec.costs and spec.example_inputs is not None:
            cell.macs = _macs(model, spec, entry, dense)
        if "latency" in spec.costs and twin is not None:
            speedup = compare_latency(twin, model, spec.example_inputs, repeats=dense.get("repeats", 15)).speedup
            cell.latency = 1.0 / speedup.median
    cell.seconds = time.perf_counter() - start
    return cell


def _prune_one(model: nn.Module, spec: _Spec, entry: Entry, sparsity: float, inputs: Any) -> None:
    """One cell's prune, through the runners as ``prune()`` does (the analysis sits below the front doors,
    which measure a profile on the fly with it)."""
    options = dict(spec.options)
    if spec.targets == "groups":
        structural = {"latency": False, **(options.pop("structural", None) or {})}
        config = PruneConfig(method=spec.method, mode="remove", allocation={entry.name: sparsity},
                             structural=structural, **options)  # fmt: skip
    else:
        scope = ScopeSpec.from_value(options.pop("scope", None))
        scope = {**scope.given(), "include": [entry.name]}
        runner = options.pop("runner", None)
        runner = "blocks" if spec.local else runner
        config = PruneConfig(method=spec.method, sparsity=sparsity, runner=runner, scope=scope, **options)
    data = Data.from_user(config, spec.calibration, spec.loss_fn, spec.example_inputs, False, True)
    if spec.local:
        prune_block_alone(model, config, data, spec.block_index[entry.name], inputs)
    else:
        run(model, config, data)


def _macs(model: nn.Module, spec: _Spec, entry: Entry, dense: dict[str, Any]) -> int:
    if spec.targets == "groups":
        return count_macs(model, spec.example_inputs).total
    saved = 0.0  # masks: each pruned layer's dense MACs scale with its density
    for module_name, param in spec.target_modules.get(entry.name, []):
        weight = getattr(model.get_submodule(module_name), param)
        zeros = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
        saved += spec.macs.get(module_name, 0) * zeros
    return round(dense["macs"] - saved)


def _local_error(model: nn.Module, spec: _Spec, entry: Entry, inputs: Any) -> float:
    """Relative squared error of the pruned block's outputs against its dense outputs, on its own inputs."""
    index = spec.block_index[entry.name]
    block = find_blocks(model, spec.options.get("blocks"))[1][index]
    error = norm = 0.0
    with torch.no_grad():
        for b, dense_out in enumerate(inputs.dense_outputs):
            out = block_output(inputs.call(index, b).invoke(block, inputs.hidden[b]))
            error += float((out.double() - dense_out.double()).pow(2).sum())
            norm += float(dense_out.double().pow(2).sum())
    return error / max(norm, 1e-300)


# -- running cells ---------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_cell(job: tuple[int, float]) -> dict[str, Any]:
    model, spec, dense = _WORKER["model"], _WORKER["spec"], _WORKER["dense"]
    entry = spec.entries[job[0]]
    twin = _WORKER.get("twin")
    return asdict(_measure_cell(model, spec, entry, job[1], dense, twin))


def _ray_cells(model: nn.Module, spec: _Spec, dense: dict[str, Any], jobs: list[tuple[int, float]], threads: int):
    torch.set_num_threads(threads)
    import copy

    twin = copy.deepcopy(model) if "latency" in spec.costs else None
    return [asdict(_measure_cell(model, spec, spec.entries[i], s, dense, twin)) for i, s in jobs]


def _run_local(model, spec, dense, jobs, twin, show):
    for i, s in progress_bar(jobs, "sensitivity cells", show):
        yield _measure_cell(model, spec, spec.entries[i], s, dense, twin)


def _run_processes(model, spec, dense, jobs, twin, workers, show):
    import multiprocessing

    threads = max(1, int(available_cores()) // workers)
    _WORKER.update(model=model, spec=spec, dense=dense, twin=twin)
    try:  # fork: the workers share the model and data as they are now, nothing is pickled
        with multiprocessing.get_context("fork").Pool(workers, _worker_init, (threads,)) as pool:
            for result in progress_bar(pool.imap_unordered(_worker_cell, jobs), "sensitivity cells", show, len(jobs)):
                yield Cell(**result)
    finally:
        _WORKER.clear()


def _run_ray(model, spec, dense, jobs, workers, show, address):
    try:
        import ray
    except ImportError as e:
        raise ConfigError("backend='ray' needs Ray: pip install 'secateurs[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_ray_cells)
    model_ref, spec_ref = ray.put(model), ray.put(spec)
    chunks = [jobs[k::workers] for k in range(workers) if jobs[k::workers]]
    pending = [remote.remote(model_ref, spec_ref, dense, chunk, 1) for chunk in chunks]
    bar = progress_bar(range(len(jobs)), "sensitivity cells (ray)", show)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for result in ray.get(done[0]):
            next(bar, None)
            yield Cell(**result)


# -- the analysis ----------------------------------------------------------------------------------
@outside_inference_mode
def sensitivity(
    model: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    method: str = "magnitude",
    sparsities: Iterable[float] = DEFAULT_GRID,
    targets: str = "layers",
    metric: str | Metric = "loss",
    evaluation: Iterable[Any] | None = None,
    costs: Sequence[str] = ("params", "macs"),
    example_inputs: Any = None,
    loss_fn: Callable | None = None,
    local: bool = False,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    latency_repeats: int = 15,
    progress: bool = True,
    **options: Any,
) -> SensitivityProfile:
    """Measure how much each target can lose: one :class:`Cell` per (target, sparsity), the model
    restored exactly after each. Returns a :class:`SensitivityProfile` (also saved as
    ``out/profile.json`` and ``out/profile.csv`` when ``out`` is given).

    Args:
        calibration: batches the pruning method reads (and the default metric's batches).
        method: any registered method (``magnitude``, ``wanda``, ``sparsegpt``, ``l1`` for channels ...).
        sparsities: the grid; dense (0) is the baseline.
        targets: ``'layers'``, ``'blocks'`` or ``'groups'`` (channel removal, ``mode='remove'``).
        metric: ``'loss'`` (default, on ``evaluation`` or the calibration batches), ``'perplexity'``,
            ``'accuracy'`` ((inputs, labels) batches), or ``callable(model) -> float`` (lower is
            better unless it is named ``accuracy``; set ``higher_is_better`` on the function to say so).
        costs: what each cell records besides the metric: ``params``, ``macs``, ``latency`` (groups only).
        local: with ``targets='blocks'``: score each block by its relative reconstruction error on its
            captured dense inputs (the fast LLM mode) instead of the whole-model metric.
        out: a directory for resumable results; an existing one with the same settings is resumed,
            one with other settings refused unless ``overwrite=True``.
        workers, backend: run cells in ``workers`` local processes (``'processes'``) or Ray tasks (``'ray'``).
        options: :func:`secateurs.prune` options for every cell (``pattern``, ``scope``, ``mode``, ``runner``,
            ``method_options``, ``structural`` ...).
    """
    PruneConfig.check_keywords(options, "sensitivity()")
    grid = check_grid(sparsities)
    costs = tuple(costs)
    _check(targets, metric, costs, backend, workers, local)
    _own_keywords(targets, options)
    batches = take(calibration, options.pop("max_batches", None))
    evaluation = take(evaluation, None) if evaluation is not None else batches
    if not callable(metric) and not local and not evaluation:
        raise ConfigError(f"metric {metric!r} needs batches: pass calibration= or evaluation=")
    if example_inputs is None and batches:
        from ..batches import first_sample

        example_inputs = first_sample(model_inputs(batches[0]))
    spec = _Spec(method, targets, metric, costs, dict(options), batches, evaluation, example_inputs, loss_fn, local, [])
    spec.entries = _entries(model, spec)
    higher = (metric == "accuracy") or bool(getattr(metric, "higher_is_better", False))
    name = "local_error" if local else (metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"))
    settings = {
        "method": method if isinstance(method, str) else _described(method),
        "targets": targets,
        "local": local,
        "options": _plain(options),
        "costs": list(costs),
        "weights": weights_digest(model),
        # a resumed analysis must score the same batches: another calibration (nsamples, seed, max_batches) is refused
        "batches": {
            "calibration": (seen := batches_digest(batches)),
            "evaluation": seen if evaluation is batches else batches_digest(evaluation),
        },
    }
    profile = SensitivityProfile(type(model).__name__, name, higher, 0.0, grid, spec.entries, settings=settings)
    done = _resume(out, profile, overwrite)
    if done is None:
        _dense(model, spec, profile, latency_repeats)
        if out is not None:
            _start_dir(out, profile, overwrite)
    else:
        profile.baseline, profile.dense = done.baseline, done.dense
        profile.cells = done.cells
        _prepare_macs(model, spec)
    jobs = [(k, s) for k, e in enumerate(spec.entries) for s in grid if profile.cell(e.name, s) is None]
    _run_jobs(model, spec, profile, jobs, out, workers, backend, ray_address, progress)
    profile.cells = sorted(
        merged_cells(profile.cells), key=lambda c: ([e.name for e in spec.entries].index(c.target), c.sparsity)
    )
    if out is not None:
        profile.save(Path(out) / "profile.json", overwrite=True)
        profile.save(Path(out) / "profile.csv", overwrite=True)
    return profile


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes, bytes): a resumed analysis must
    measure the very same weights, not only the same shapes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def batches_digest(batches: Sequence[Any]) -> dict[str, Any]:
    """How many batches and a fingerprint of their tensors (strided samples of each, as the distributed
    start-up check does: cheap on big calibration sets) and plain leaves (strings, numbers). Other objects
    (numpy arrays, custom types) count by type only, and a callable metric's own data is not seen."""
    from ..distributed import fingerprint_tensor

    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(fingerprint_tensor(value).encode())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                digest.update(f"{key}:".encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"[{len(value)}".encode())
            for item in value:
                walk(item)
        else:
            digest.update(repr(value).encode() if isinstance(value, (str, int, float, bool, type(None))) else
                          type(value).__name__.encode())  # fmt: skip

    for batch in batches:
        walk(batch)
    return {"count": len(batches), "digest": digest.hexdigest()[:16]}


def _described(method: Any) -> dict[str, Any]:
    """A criterion object as JSON-able data: its name and public fields (a resume must use the same ones)."""
    return {"name": getattr(method, "name", type(method).__name__), "options": _plain(_public(method))}


def _plain(value: Any) -> Any:
    """Options as JSON-able data (callables and tensors by their repr) for the resume check."""
    return json.loads(json.dumps(value, default=repr))


def _dense(model: nn.Module, spec: _Spec, profile: SensitivityProfile, repeats: int) -> None:
    if spec.local:
        profile.baseline = 0.0
    else:  # in a trial like every cell: a metric that recalibrates or fine-tunes must not change the model
        with trial(model):
            profile.baseline = _checked(_metric(model, spec), "the dense model")
    profile.dense = {"params": _nonzeros(model), "repeats": repeats}
    if spec.example_inputs is not None and "macs" in spec.costs:
        profile.dense["macs"] = _prepare_macs(model, spec)


def _prepare_macs(model: nn.Module, spec: _Spec) -> int:
    if spec.example_inputs is None or "macs" not in spec.costs:
        return 0
    counted = count_macs(model, spec.example_inputs)
    spec.macs = dict(counted.per_module)
    if spec.targets != "groups":
        scoped = resolve(model, ScopeSpec.from_value(spec.options.get("scope")))
        for e in spec.entries:
            spec.target_modules[e.name] = [(t.module_name, t.param_name) for t in scoped if t.name in e.shapes]
    return counted.total


def _run_jobs(model, spec, profile, jobs, out, workers, backend, address, show) -> None:
    if not jobs:
        return
    twin = None
    if "latency" in spec.costs:
        import copy

        twin = copy.deepcopy(model)
    if spec.local:
        runner = _run_local_blocks(model, spec, profile.dense, jobs, show)
    elif backend == "ray":
        runner = _run_ray(model, spec, profile.dense, jobs, workers, show, address)
    elif backend == "processes" and workers > 1:
        runner = _run_processes(model, spec, profile.dense, jobs, twin, workers, show)
    else:
        runner = _run_local(model, spec, profile.dense, jobs, twin, show)
    cells_file = Path(out) / "cells.jsonl" if out is not None else None
    for cell in runner:
        profile.cells.append(cell)
        if cells_file is not None:
            with open(cells_file, "a") as f:  # one line per finished cell: an interruption keeps them
                f.write(json.dumps(asdict(cell)) + "\n")
                f.flush()
                os.fsync(f.fileno())


def _run_local_blocks(model, spec, dense, jobs, show):
    """Local mode: capture the first block's inputs once, then walk the blocks with dense propagation."""
    _, blocks = find_blocks(model, spec.options.get("blocks"))
    home = model_device(model)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_inputs(model, blocks, [to_device(b, home) for b in spec.calibration])
        by_block: dict[int, list[tuple[int, float]]] = {}
        for k, s in jobs:
            by_block.setdefault(spec.block_index[spec.entries[k].name], []).append((k, s))
        bar = progress_bar(range(len(jobs)), "sensitivity cells (local)", show)
        last = max(by_block, default=-1)
        for i, block in enumerate(blocks[: last + 1]):  # past the last measured block, nothing is needed
            with torch.no_grad():
                outs = [
                    block_output(inputs.call(i, b).invoke(block, inputs.hidden[b])) for b in range(len(inputs.hidden))
                ]
            inputs.dense_outputs = outs
            for k, s in by_block.get(i, []):
                cell = _measure_cell(model, spec, spec.entries[k], s, dense, None, inputs)
                next(bar, None)
                yield cell
            if i < last:
                for b in range(len(inputs.hidden)):
                    inputs.hidden[b] = outs[b]
    finally:
        model.train(was_training)


# -- resumable output ------------------------------------------------------------------------------
def _header(profile: SensitivityProfile) -> dict[str, Any]:
    return {
        "model": profile.model,
        "metric": profile.metric,
        "grid": profile.grid,
        "settings": profile.settings,
        "entries": [asdict(e) for e in profile.entries],
    }


def _first_difference(key: str, theirs: Any, ours: Any) -> tuple[str, Any, Any]:
    """The first place two saved headers differ, as a dotted key (``settings.batches.calibration``)."""
    while isinstance(theirs, dict) and isinstance(ours, dict):
        sub = next((k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)), None)
        if sub is None:
            break
        key, theirs, ours = f"{key}.{sub}", theirs.get(sub), ours.get(sub)
    return key, theirs, ours


def _start_dir(out: str | os.PathLike, profile: SensitivityProfile, overwrite: bool) -> None:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    header = {**_header(profile), "baseline": profile.baseline, "dense": profile.dense}
    write_text(path / "analysis.json", json.dumps(header, indent=1) + "\n", overwrite=True)
    write_text(path / "cells.jsonl", "", overwrite=True)


def _resume(out: str | os.PathLike | None, profile: SensitivityProfile, overwrite: bool) -> SensitivityProfile | None:
    """The finished cells of an earlier run of the same analysis in ``out``; None to start afresh."""
    if out is None or not (Path(out) / "analysis.json").exists():
        if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
            raise ConfigError(f"{str(out)!r} exists and holds no sensitivity analysis; pick an empty directory")
        return None
    if overwrite:
        return None
    saved = json.loads((Path(out) / "analysis.json").read_text())
    mine = json.loads(json.dumps(_header(profile)))
    for key in mine:
        if saved.get(key) != mine[key]:
            where, theirs, ours = _first_difference(key, saved.get(key), mine[key])
            why = ""
            if where.startswith("settings.batches"):  # say what usually causes it before the advice to start afresh
                why = (" (other batches: another seed, nsamples or max_batches, or an unseeded shuffled DataLoader, "
                       "which gives other batches every run: pass a fixed list to resume; or a directory written "
                       "before the batches were recorded)")  # fmt: skip
            raise ConfigError(
                f"{str(out)!r} holds an analysis with another {where} ({str(theirs)[:120]} vs {str(ours)[:120]})"
                f"{why}; use another directory, delete it, or pass overwrite=True (--overwrite) to start afresh"
            )
    cells = []
    for line in (Path(out) / "cells.jsonl").read_text().splitlines():
        try:
            cells.append(Cell(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            break  # a line cut by an interruption: everything before it is whole
    done = SensitivityProfile(
        profile.model,
        profile.metric,
        profile.higher_is_better,
        saved["baseline"],
        profile.grid,
        profile.entries,
        merged_cells(cells),
        saved["dense"],
        profile.settings,
    )
    return done


# -- fitting a budget on the real model --------------------------------------------------------------
def fit_budget(
    profile: SensitivityProfile,
    budget: dict[str, float],
    measure: Callable[[dict], float],
    rounds: int = 3,
    tolerance: float = 0.02,
    relinearize: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Where the profile's costs are not exactly additive (channel removal shares weights between
    neighbouring groups; latency is measured): solve, let ``measure(sparsities)`` report the real
    total (e.g. latency of the pruned model), and re-solve, a few ``rounds`` (SPDY re-measures its
    candidates the same way). Each re-solve either

    - *relinearises* (the first ``relinearize`` re-solves): re-measures every entry's cost at dense
      and at each grid sparsity with all other entries at the last measured allocation, and solves
      the knapsack over the first-order expansion about it, asking the budget itself
      (:mod:`.expansion`, HALP-style); each such round costs ``#entries x (#grid + 1)`` extra
      ``measure`` calls at most (fewer where an entry already sits on dense or a grid point); or
    - *corrects* the budget asked of the last solver (the dense-context profile, or the last
      expansion) by the ratio of asked to achieved.

    Returns the per-entry sparsities of the measured round closest to the budget (marked ``chosen``
    in the history of (asked, predicted, achieved, how it was solved, extra measurements)): never a
    solution that was not measured."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"fit_budget: rounds must be an integer >= 1, got {rounds!r}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigError(f"fit_budget: tolerance must be a finite number >= 0, got {tolerance!r}")
    if isinstance(relinearize, bool) or not isinstance(relinearize, int) or relinearize < 0:
        raise ConfigError(
            f"fit_budget: relinearize must be an integer >= 0 (re-solves to relinearise), got {relinearize!r}"
        )
    ((kind, target),) = budget.items()
    if relinearize and kind == "sparsity":
        raise ConfigError(
            "fit_budget: relinearize applies to params, macs or latency budgets; a sparsity budget adds up"
        )
    asked, history, measured = float(target), [], []
    solver: Callable[[float], Any] = lambda value: solve_budget(profile, kind, value)  # noqa: E731
    allocated, how, extra = solver(asked), "profile", 0
    for round_ in range(rounds):
        achieved = float(measure(allocated.sparsities))
        if not math.isfinite(achieved) or achieved <= 0:
            raise ConfigError(
                f"fit_budget: measure() returned {achieved!r} for round {round_} ({kind}); it must return the "
                "pruned model's total as a finite positive number"
            )
        history.append({"asked": asked, "predicted": allocated.predicted, "achieved": achieved, "solved": how,
                        "measurements": extra})  # fmt: skip
        measured.append(allocated.sparsities)
        if abs(achieved - target) <= tolerance * abs(target) or round_ == rounds - 1:
            break
        if relinearize:
            relinearize -= 1
            expansion = relinearized(profile, kind, allocated.sparsities, measure, total=achieved)
            solver = lambda value, e=expansion: solve_expansion(profile, e, value)  # noqa: E731
            next_asked, how, extra = float(target), "relinearized", expansion.measurements
        else:
            next_asked, how, extra = asked * target / achieved, "corrected", 0
        try:  # a re-solve past the reachable range keeps the measured solutions (the history says so)
            allocated = solver(next_asked)
        except BudgetError:
            history[-1]["stopped"] = (
                f"the budget is outside the reachable range of the relinearised costs (after {extra} measurements)"
                if how == "relinearized"
                else "the corrected budget is outside the profile's reachable range"
            )
            break
        asked = next_asked
    best = min(range(len(history)), key=lambda i: (abs(history[i]["achieved"] - target), -i))
    history[best]["chosen"] = True
    return measured[best], history
